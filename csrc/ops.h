// gitfast._C: declarations shared by the CPU (ops.cpp) and CUDA (ops_cuda.cu) translation units.
//
// Ops (namespace `gitfast`, schemas in ops.cpp), all on tensors of shape [..., width], contiguous,
// one dtype (float32 / float16 / bfloat16), arithmetic in fp32:
//   layer_norm(x, w, b, eps)                 -> LayerNorm(x)
//   add_layer_norm(x, residual, w, b, eps)   -> (LayerNorm(x + residual), x + residual)
//   bias_act(x, bias?, activation)           -> act(x + bias), act in {quick_gelu, gelu}
//   mlp(x, w1, b1?, w2, b2?, activation)     -> act(x @ w1^T + b1) @ w2^T + b2
// This header stays light (no CUDA, no pybind) so both compilers parse it quickly.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

namespace gitfast {

enum class Activation : int { QuickGelu = 0, Gelu = 1 };

// Parses the schema's `str activation`; refuses anything else, naming it.
Activation parse_activation(c10::string_view name);

// Boundary checks (TORCH_CHECK with messages that name the op and the fix).
void check_layer_norm(const char* op, const at::Tensor& x, const at::Tensor* residual,
                      const at::Tensor& weight, const at::Tensor& bias);
void check_bias_act(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias);
void check_mlp(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
               const at::Tensor& w2, const std::optional<at::Tensor>& b2);

// In-place `h = act(h + bias)` on a contiguous [rows, width] tensor; one per device.
using BiasActInplace = void (*)(at::Tensor& h, const std::optional<at::Tensor>& bias, Activation act);

// The MLP shared by both devices: GEMM (ATen: MKL/oneDNN or cuBLAS), the device's fused
// bias + activation pass in place, then GEMM with the second bias folded in (addmm).
at::Tensor mlp_with(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                    const at::Tensor& w2, const std::optional<at::Tensor>& b2, Activation act,
                    BiasActInplace bias_act_inplace);

}  // namespace gitfast
