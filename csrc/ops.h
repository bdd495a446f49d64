// gitfast._C: what the bindings (bindings.cpp: schemas, input checks, one entry per op) share with
// the per-device kernels (cpu/*.cpp, cuda/*.cu).
//
// Ops (namespace `gitfast`), all on tensors of shape [..., width], contiguous, one dtype
// (float32 / float16 / bfloat16), arithmetic in fp32:
//   layer_norm(x, w, b, eps)                 -> LayerNorm(x)
//   add_layer_norm(x, residual, w, b, eps)   -> (LayerNorm(x + residual), x + residual)
//   bias_act(x, bias?, activation)           -> act(x + bias), act in {quick_gelu, gelu}
//   mlp(x, w1, b1?, w2, b2?, activation)     -> act(x @ w1^T + b1) @ w2^T + b2
// Kernels get inputs the bindings have checked (dtype, shapes, contiguity, one device) and write
// into outputs the bindings allocated. This header stays light (no CUDA, no pybind) so both
// compilers parse it quickly.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace gitfast {

enum class Activation : int { QuickGelu = 0, Gelu = 1 };

// One device's kernels, with the same signatures on every device.
//   layer_norm: y = LayerNorm(x (+ residual)); with a residual, `summed` receives x + residual.
//               `op` names the calling op in the kernel's own limit errors.
//   bias_act:   y = act(x + bias); y may be x (in place).
namespace cpu_kernels {
void layer_norm(const char* op, const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
                const at::Tensor& bias, double eps, at::Tensor& y, at::Tensor* summed);
void bias_act(const at::Tensor& x, const std::optional<at::Tensor>& bias, Activation act, at::Tensor& y);
}  // namespace cpu_kernels

namespace cuda_kernels {  // defined only in builds with CUDA (GITFAST_WITH_CUDA=1)
void layer_norm(const char* op, const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
                const at::Tensor& bias, double eps, at::Tensor& y, at::Tensor* summed);
void bias_act(const at::Tensor& x, const std::optional<at::Tensor>& bias, Activation act, at::Tensor& y);
}  // namespace cuda_kernels

}  // namespace gitfast
