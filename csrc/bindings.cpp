// gitfast._C, bindings: the op schemas, one device-agnostic entry per op (input checks at the
// boundary, output allocation, then the kernel of the inputs' device), the per-device registrations
// and the Python module whose import registers everything as torch.ops.gitfast.*.
//
// Each entry is registered for every device key that has kernels (CPU always, CUDA in builds with
// CUDA), never as a composite: gitfast/ops.py asks the dispatcher which devices have kernels.

#include <Python.h>

#include <ATen/core/enum_tag.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/mm.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "ops.h"

#ifndef GITFAST_WITH_CUDA
#define GITFAST_WITH_CUDA 0
#endif
// setup.py generates this header (build/gitfast_generated) with why CUDA kernels are in or out.
#if __has_include("gitfast_build_info.h")
#include "gitfast_build_info.h"
#endif
#ifndef GITFAST_CUDA_BUILD_NOTE
#define GITFAST_CUDA_BUILD_NOTE "built without setup.py's build info"
#endif

namespace gitfast {
namespace {

// ---------------------------------------------------------------------------------------------
// Boundary checks (TORCH_CHECK with messages that name the op and the fix)
// ---------------------------------------------------------------------------------------------

// Parses the schema's `str activation`; refuses anything else, naming it.
Activation parse_activation(c10::string_view name) {
  if (name == "quick_gelu") return Activation::QuickGelu;
  if (name == "gelu") return Activation::Gelu;
  TORCH_CHECK_VALUE(false, "gitfast: unsupported activation '", std::string(name),
                    "'; expected 'quick_gelu' or 'gelu'");
}

void check_input(const char* op, const at::Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, "gitfast.", op, ": x has dtype ",
              t, "; supported dtypes are float32, float16 and bfloat16");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "gitfast.", op,
              ": x must have shape [..., width] with width > 0, got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "gitfast.", op, ": x must be contiguous; call x.contiguous() first");
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "gitfast.", op, ": ", name, " is on ", t.device(), " but x is on ",
              x.device(), "; move both to one device");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "gitfast.", op, ": ", name, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type(), "; cast both to one dtype (e.g. ", name, ".to(x.dtype))");
  TORCH_CHECK(t.is_contiguous(), "gitfast.", op, ": ", name, " must be contiguous; call .contiguous() first");
}

void check_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, int64_t n) {
  check_like(op, name, t, x);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "gitfast.", op, ": ", name, " must have shape [", n,
              "] to match the width of x, got ", t.sizes());
}

void check_layer_norm(const char* op, const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
                      const at::Tensor& bias) {
  check_input(op, x);
  if (residual != nullptr) {
    check_like(op, "residual", *residual, x);
    TORCH_CHECK(residual->sizes() == x.sizes(), "gitfast.", op, ": residual has shape ", residual->sizes(),
                " but x has ", x.sizes(), "; they must match");
  }
  check_vector(op, "weight", weight, x, x.size(-1));
  check_vector(op, "bias", bias, x, x.size(-1));
}

void check_bias_act(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& bias) {
  check_input(op, x);
  if (bias) check_vector(op, "bias", *bias, x, x.size(-1));
}

void check_mlp(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
               const std::optional<at::Tensor>& b2) {
  check_input("mlp", x);
  check_like("mlp", "fc1_weight", w1, x);
  check_like("mlp", "fc2_weight", w2, x);
  TORCH_CHECK(w1.dim() == 2 && w1.size(1) == x.size(-1), "gitfast.mlp: fc1_weight must have shape [hidden, ",
              x.size(-1), "] (nn.Linear layout, in-features = width of x), got ", w1.sizes());
  TORCH_CHECK(w2.dim() == 2 && w2.size(1) == w1.size(0), "gitfast.mlp: fc2_weight must have shape [out, ",
              w1.size(0), "] (in-features = rows of fc1_weight), got ", w2.sizes());
  if (b1) check_vector("mlp", "fc1_bias", *b1, x, w1.size(0));
  if (b2) check_vector("mlp", "fc2_bias", *b2, x, w2.size(0));
}

// ---------------------------------------------------------------------------------------------
// Kernels of a device
// ---------------------------------------------------------------------------------------------

struct Kernels {
  decltype(&cpu_kernels::layer_norm) layer_norm;
  decltype(&cpu_kernels::bias_act) bias_act;
};

// The kernels for tensors on x's device (the checks have put every input there).
const Kernels& kernels_for(const char* op, const at::Tensor& x) {
  static const Kernels cpu{&cpu_kernels::layer_norm, &cpu_kernels::bias_act};
#if GITFAST_WITH_CUDA
  static const Kernels cuda{&cuda_kernels::layer_norm, &cuda_kernels::bias_act};
  if (x.is_cuda()) return cuda;
#endif
  TORCH_CHECK(x.is_cpu(), "gitfast.", op, ": no kernel for tensors on ", x.device());
  return cpu;
}

// ---------------------------------------------------------------------------------------------
// Op entries, one per op for every device
// ---------------------------------------------------------------------------------------------

at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_layer_norm("layer_norm", x, nullptr, weight, bias);
  const Kernels& k = kernels_for("layer_norm", x);
  at::Tensor y = at::empty_like(x);
  k.layer_norm("layer_norm", x, nullptr, weight, bias, eps, y, nullptr);
  return y;
}

std::tuple<at::Tensor, at::Tensor> add_layer_norm(const at::Tensor& x, const at::Tensor& residual,
                                                  const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_layer_norm("add_layer_norm", x, &residual, weight, bias);
  const Kernels& k = kernels_for("add_layer_norm", x);
  at::Tensor y = at::empty_like(x);
  at::Tensor s = at::empty_like(x);
  k.layer_norm("add_layer_norm", x, &residual, weight, bias, eps, y, &s);
  return {y, s};
}

at::Tensor bias_act(const at::Tensor& x, const std::optional<at::Tensor>& bias, c10::string_view activation) {
  const Activation act = parse_activation(activation);
  check_bias_act("bias_act", x, bias);
  const Kernels& k = kernels_for("bias_act", x);
  at::Tensor y = at::empty_like(x);
  k.bias_act(x, bias, act, y);
  return y;
}

// GEMM (ATen: MKL/oneDNN or cuBLAS), the device's fused bias + activation pass in place, then GEMM
// with the second bias folded in (addmm).
at::Tensor mlp(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1, const at::Tensor& w2,
               const std::optional<at::Tensor>& b2, c10::string_view activation) {
  const Activation act = parse_activation(activation);
  check_mlp(x, w1, b1, w2, b2);
  const Kernels& k = kernels_for("mlp", x);
  const c10::OptionalDeviceGuard guard(x.is_cpu() ? std::nullopt : std::optional<c10::Device>(x.device()));
  const int64_t width = x.size(-1);
  const at::Tensor x2 = x.view({x.numel() / width, width});  // numel/width, not -1: rows may be 0
  // fp32 on CUDA: fc1 exactly as nn.Linear computes it (addmm, the bias in cuBLASLt's epilogue), so
  // fp32 stays bitwise transformers'; half keeps the bias in the fused activation pass.
  const bool as_linear = b1 && x.is_cuda() && x.scalar_type() == at::kFloat;
  at::Tensor h = as_linear ? at::addmm(*b1, x2, w1.t()) : at::mm(x2, w1.t());
  k.bias_act(h, as_linear ? std::nullopt : b1, act, h);
  at::Tensor out = b2 ? at::addmm(*b2, h, w2.t()) : at::mm(h, w2.t());
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = w2.size(0);
  return out.view(shape);
}

// ---------------------------------------------------------------------------------------------
// Dynamic INT8's row passes (CPU kernels only)
// ---------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x) {
  check_input("quantize_rows", x);
  TORCH_CHECK(x.is_cpu(), "gitfast.quantize_rows: CPU kernels only; x is on ", x.device());
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kChar));
  std::vector<int64_t> rows(x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor scale = at::empty(rows, x.options().dtype(at::kFloat));
  if (x.numel() > 0) {
    cpu_kernels::quantize_rows(x, q, scale);
  } else {
    scale.zero_();  // rows of width 0 (or none): scale 0, as for an all-zero row
  }
  return {q, scale};
}

// A per-row or per-column float32 vector of `n` entries (scales, biases), checked with one message.
void check_f32_vector(const at::Tensor& t, int64_t n, const char* op, const char* name) {
  TORCH_CHECK(t.is_cpu() && t.is_contiguous() && t.scalar_type() == at::kFloat && t.numel() == n, "gitfast.", op, ": ",
              name, " must be a contiguous float32 CPU tensor of ", n, " entries, got ", t.scalar_type(), " ",
              t.sizes());
}

// dequantize_rows' and requantize_rows_u7's arguments, checked with the op's name; returns the activation
// (-1 for none).
int check_dequantize(const char* op, const at::Tensor& acc, const at::Tensor& row_scale,
                     const std::optional<at::Tensor>& col_scale, const std::optional<at::Tensor>& bias,
                     std::optional<c10::string_view> activation, at::ScalarType dtype) {
  TORCH_CHECK(acc.is_cpu() && acc.dim() == 2 && acc.is_contiguous() &&
                  (acc.scalar_type() == at::kInt || acc.scalar_type() == at::kFloat),
              "gitfast.", op, ": acc must be a contiguous 2-D int32 or float32 CPU tensor, got ", acc.scalar_type(),
              " ", acc.sizes(), " on ", acc.device());
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, "gitfast.", op, ": dtype ", dtype,
              " is not float32, float16 or bfloat16");
  const int64_t m = acc.size(0), n = acc.size(1);
  check_f32_vector(row_scale, m, op, "row_scale");
  if (col_scale) check_f32_vector(*col_scale, n, op, "col_scale");
  if (bias) {
    const auto t = bias->scalar_type();
    TORCH_CHECK((t == at::kFloat || t == at::kHalf || t == at::kBFloat16) && bias->is_contiguous() &&
                    bias->numel() == n && bias->is_cpu(),
                "gitfast.", op, ": bias must be a contiguous float CPU tensor of ", n, " entries, got ", t, " ",
                bias->sizes());
  }
  return activation ? static_cast<int>(parse_activation(*activation)) : -1;
}

at::Tensor dequantize_rows(const at::Tensor& acc, const at::Tensor& row_scale, const std::optional<at::Tensor>& col_scale,
                           const std::optional<at::Tensor>& bias, std::optional<c10::string_view> activation,
                           at::ScalarType dtype) {
  const int act = check_dequantize("dequantize_rows", acc, row_scale, col_scale, bias, activation, dtype);
  at::Tensor y = at::empty(acc.sizes(), acc.options().dtype(dtype));
  if (acc.numel() > 0) {
    cpu_kernels::dequantize_rows(acc, row_scale, col_scale ? &*col_scale : nullptr, bias ? &*bias : nullptr, act, y);
  }
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> requantize_rows_u7(
    const at::Tensor& acc, const at::Tensor& row_scale, const std::optional<at::Tensor>& col_scale,
    const std::optional<at::Tensor>& bias, std::optional<c10::string_view> activation, at::ScalarType dtype) {
  const int act = check_dequantize("requantize_rows_u7", acc, row_scale, col_scale, bias, activation, dtype);
  at::Tensor q = at::empty(acc.sizes(), acc.options().dtype(at::kByte));
  at::Tensor scale = at::empty({acc.size(0)}, acc.options().dtype(at::kFloat));
  at::Tensor zero = at::empty({acc.size(0)}, acc.options().dtype(at::kInt));
  if (acc.numel() > 0) {
    cpu_kernels::requantize_rows_u7(acc, row_scale, col_scale ? &*col_scale : nullptr, bias ? &*bias : nullptr, act,
                                    dtype, q, scale, zero);
  } else {
    scale.zero_();  // rows of width 0 (or none): as quantize_rows_u7
    zero.zero_();
  }
  return {q, scale, zero};
}

// ---------------------------------------------------------------------------------------------
// Attention (CPU kernels only): checks, index tensors made contiguous int32, then the kernel
// ---------------------------------------------------------------------------------------------

constexpr int64_t kMaxAttentionHeadDim = 256;  // the CPU kernel's register/scratch sizing

void check_attention_q(const char* op, const at::Tensor& q) {
  const auto t = q.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, "gitfast.", op, ": q has dtype ", t,
              "; supported dtypes are float32, float16 and bfloat16");
  TORCH_CHECK(q.dim() == 3, "gitfast.", op, ": q must have shape [tokens, heads, head_dim], got ", q.sizes());
  TORCH_CHECK(q.size(2) >= 1 && q.size(2) <= kMaxAttentionHeadDim, "gitfast.", op, ": head_dim ", q.size(2),
              " is outside the CPU kernel's 1..", kMaxAttentionHeadDim);
  TORCH_CHECK(q.is_cpu(), "gitfast.", op, ": gitfast._C has CPU attention kernels only; q is on ", q.device(),
              " (use gitfast.kernels for CUDA)");
}

void check_same_kind(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), "gitfast.", op, ": ", name, " is on ", t.device(), " but q is on ",
              q.device(), "; move both to one device");
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "gitfast.", op, ": ", name, " has dtype ", t.scalar_type(),
              " but q has ", q.scalar_type(), "; cast both to one dtype");
}

// Kernels read rows through leading strides; only the last dim must be dense.
at::Tensor rows_dense(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Index tensors as the kernels read them: contiguous int32 on the CPU (a strided view or an int64
// tensor is copied, never read as raw memory).
at::Tensor index_tensor(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.is_cpu(), "gitfast.", op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(!at::isFloatingType(t.scalar_type()) && t.scalar_type() != at::kBool, "gitfast.", op, ": ", name,
              " must hold integers, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "gitfast.", op, ": ", name, " must have ", dim, " dims, got ", t.sizes());
  return t.to(at::kInt).contiguous();
}

// One image-token count per sequence: the tensor (per sequence, or 0-dim for all) or the int.
at::Tensor image_counts_of(const char* op, const std::optional<at::Tensor>& counts, int64_t num_image_tokens,
                           int64_t batch) {
  if (!counts) return at::full({batch}, num_image_tokens, at::TensorOptions().dtype(at::kInt));
  if (counts->dim() == 0) {
    return at::full({batch}, index_tensor(op, "num_image_tokens", *counts, 0).item<int32_t>(),
                    at::TensorOptions().dtype(at::kInt));
  }
  at::Tensor c = index_tensor(op, "num_image_tokens", *counts, 1);
  TORCH_CHECK(c.numel() == batch, "gitfast.", op, ": num_image_tokens has ", c.numel(), " entries for ", batch,
              " sequences");
  return c;
}

double scale_or_default(const std::optional<double>& sm_scale, const at::Tensor& q) {
  return sm_scale ? *sm_scale : 1.0 / std::sqrt(static_cast<double>(q.size(2)));
}

// cu_seqlens [B + 1]: starts at 0 or later, never decreases, ends within `tokens`.
at::Tensor cu_seqlens_of(const char* op, const char* name, const at::Tensor& cu_seqlens, int64_t tokens) {
  at::Tensor cu = index_tensor(op, name, cu_seqlens, 1);
  TORCH_CHECK(cu.numel() >= 1, "gitfast.", op, ": ", name, " must hold B + 1 offsets, got none");
  const int32_t* c = cu.const_data_ptr<int32_t>();
  TORCH_CHECK(c[0] >= 0 && c[cu.numel() - 1] <= tokens, "gitfast.", op, ": ", name, " spans [", c[0], ", ",
              c[cu.numel() - 1], ") but q has ", tokens, " tokens");
  for (int64_t b = 0; b + 1 < cu.numel(); ++b) {
    TORCH_CHECK(c[b] <= c[b + 1], "gitfast.", op, ": ", name, " decreases at ", b, " (", c[b], " > ", c[b + 1], ")");
  }
  return cu;
}

at::Tensor git_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
                         const std::optional<at::Tensor>& num_image_tokens_per_seq, int64_t num_image_tokens,
                         std::optional<double> sm_scale) {
  const char* op = "git_attention";
  check_attention_q(op, q);
  check_same_kind(op, "k", k, q);
  check_same_kind(op, "v", v, q);
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "gitfast.", op, ": q, k, v must have one shape "
              "[tokens, heads, head_dim], got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const at::Tensor cu = cu_seqlens_of(op, "cu_seqlens", cu_seqlens, q.size(0));
  const at::Tensor counts = image_counts_of(op, num_image_tokens_per_seq, num_image_tokens, cu.numel() - 1);
  at::Tensor out = at::empty(q.sizes(), q.options());
  cpu_kernels::git_attention(rows_dense(q), rows_dense(k), rows_dense(v), cu, counts, scale_or_default(sm_scale, q),
                             out);
  return out;
}

// The paged checks both paged ops share; returns the int32 tables and context lengths.
std::tuple<at::Tensor, at::Tensor> check_paged(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                                               const at::Tensor& v_cache, const at::Tensor& block_tables,
                                               const at::Tensor& context_lens) {
  check_attention_q(op, q);
  check_same_kind(op, "k_cache", k_cache, q);
  check_same_kind(op, "v_cache", v_cache, q);
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(2) == q.size(1) && k_cache.size(3) == q.size(2) &&
                  v_cache.sizes() == k_cache.sizes(),
              "gitfast.", op, ": caches must have shape [num_blocks, block_size, ", q.size(1), ", ", q.size(2),
              "] (heads and head_dim of q), got ", k_cache.sizes(), " and ", v_cache.sizes());
  at::Tensor tables = index_tensor(op, "block_tables", block_tables, 2);
  at::Tensor lens = index_tensor(op, "context_lens", context_lens, 1);
  TORCH_CHECK(tables.size(0) == lens.numel(), "gitfast.", op, ": block_tables has ", tables.size(0),
              " rows for ", lens.numel(), " sequences");
  // every table entry a context reaches must name a block of the pool: a bad one would be read
  const int64_t bs = k_cache.size(1), width = tables.size(1), blocks = k_cache.size(0);
  const int32_t* t = tables.const_data_ptr<int32_t>();
  const int32_t* l = lens.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < lens.numel(); ++b) {
    TORCH_CHECK(l[b] >= 0 && l[b] <= width * bs, "gitfast.", op, ": context_lens[", b, "] = ", l[b],
                " is outside 0..", width * bs, " (block_tables width x block_size)");
    for (int64_t i = 0; i < (l[b] + bs - 1) / bs; ++i) {
      TORCH_CHECK(t[b * width + i] >= 0 && t[b * width + i] < blocks, "gitfast.", op, ": block_tables[", b, ", ",
                  i, "] = ", t[b * width + i], " is not a block of the ", blocks, "-block cache");
    }
  }
  return {tables, lens};
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens,
                                  std::optional<double> sm_scale) {
  const char* op = "paged_decode_attention";
  auto [tables, lens] = check_paged(op, q, k_cache, v_cache, block_tables, context_lens);
  TORCH_CHECK(q.size(0) == lens.numel(), "gitfast.", op, ": q has ", q.size(0), " rows for ", lens.numel(),
              " sequences");
  const at::TensorOptions i32 = at::TensorOptions().dtype(at::kInt);
  at::Tensor out = at::empty(q.sizes(), q.options());
  cpu_kernels::paged_attention(rows_dense(q), rows_dense(k_cache), rows_dense(v_cache), tables,
                               at::arange(lens.numel() + 1, i32), lens, at::zeros({lens.numel()}, i32),
                               scale_or_default(sm_scale, q), out);
  return out;
}

at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q,
                                   const at::Tensor& context_lens,
                                   const std::optional<at::Tensor>& num_image_tokens_per_seq, int64_t num_image_tokens,
                                   std::optional<double> sm_scale) {
  const char* op = "paged_prefill_attention";
  auto [tables, lens] = check_paged(op, q, k_cache, v_cache, block_tables, context_lens);
  const at::Tensor cu = cu_seqlens_of(op, "cu_seqlens_q", cu_seqlens_q, q.size(0));
  TORCH_CHECK(cu.numel() == lens.numel() + 1, "gitfast.", op, ": cu_seqlens_q has ", cu.numel(),
              " offsets for ", lens.numel(), " sequences (expected B + 1)");
  const int32_t* c = cu.const_data_ptr<int32_t>();
  const int32_t* l = lens.const_data_ptr<int32_t>();
  for (int64_t b = 0; b < lens.numel(); ++b) {
    TORCH_CHECK(c[b + 1] - c[b] <= l[b], "gitfast.", op, ": sequence ", b, " has ", c[b + 1] - c[b],
                " new tokens but context_lens[", b, "] = ", l[b], " (the new tokens are the last of the context)");
  }
  const at::Tensor counts = image_counts_of(op, num_image_tokens_per_seq, num_image_tokens, lens.numel());
  at::Tensor out = at::empty(q.sizes(), q.options());
  cpu_kernels::paged_attention(rows_dense(q), rows_dense(k_cache), rows_dense(v_cache), tables, cu, lens, counts,
                               scale_or_default(sm_scale, q), out);
  return out;
}

void write_kv_cache(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                    const at::Tensor& slot_mapping) {
  const char* op = "write_kv_cache";
  check_attention_q(op, k);
  check_same_kind(op, "v", v, k);
  check_same_kind(op, "k_cache", k_cache, k);
  check_same_kind(op, "v_cache", v_cache, k);
  TORCH_CHECK(v.sizes() == k.sizes(), "gitfast.", op, ": k and v must have one shape, got ", k.sizes(), " and ",
              v.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2) &&
                  v_cache.sizes() == k_cache.sizes() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "gitfast.", op, ": caches must be contiguous [num_blocks, block_size, ", k.size(1), ", ", k.size(2),
              "], got ", k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(k.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(2) == 1 && v.stride(1) == v.size(2),
              "gitfast.", op, ": each token's [heads, head_dim] of k and v must be dense");
  TORCH_CHECK(slot_mapping.is_cpu() && slot_mapping.dim() == 1 && slot_mapping.numel() == k.size(0) &&
                  !at::isFloatingType(slot_mapping.scalar_type()) && slot_mapping.scalar_type() != at::kBool,
              "gitfast.", op, ": slot_mapping must be an integer CPU tensor of ", k.size(0), " slots, got ",
              slot_mapping.scalar_type(), " ", slot_mapping.sizes());
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t capacity = k_cache.size(0) * k_cache.size(1);
  const int64_t* sp = slots.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < slots.numel(); ++i) {
    TORCH_CHECK(sp[i] < capacity, "gitfast.", op, ": slot_mapping[", i, "] = ", sp[i], " is past the cache's ",
                capacity, " slots");
  }
  cpu_kernels::write_kv_cache(k, v, k_cache, v_cache, slots);
}

std::string cpu_isa() { return cpu_kernels::cpu_isa(); }
std::vector<std::string> cpu_isas() { return cpu_kernels::fit_isa_names(); }
void set_cpu_isa(std::string name) { cpu_kernels::set_cpu_isa(name); }

at::Tensor int8_mm(const at::Tensor& q, const at::Tensor& w) {
  TORCH_CHECK(q.is_cpu() && q.dim() == 2 && q.is_contiguous() && q.scalar_type() == at::kChar,
              "gitfast.int8_mm: q must be a contiguous 2-D int8 CPU tensor, got ", q.scalar_type(), " ", q.sizes(),
              " on ", q.device());
  TORCH_CHECK(w.is_cpu() && w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kChar &&
                  w.size(1) == q.size(1),
              "gitfast.int8_mm: w must be a contiguous [N, ", q.size(1), "] int8 CPU tensor, got ", w.scalar_type(),
              " ", w.sizes(), " on ", w.device());
  at::Tensor acc = at::empty({q.size(0), w.size(0)}, q.options().dtype(at::kInt));
  if (acc.numel() == 0) return acc;
  if (q.size(1) == 0) return acc.zero_();
  cpu_kernels::int8_mm(q, w, acc);
  return acc;
}

std::string int8_isa() { return cpu_kernels::int8_isa(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_rows_u7(const at::Tensor& x) {
  check_input("quantize_rows_u7", x);
  TORCH_CHECK(x.is_cpu(), "gitfast.quantize_rows_u7: CPU kernels only; x is on ", x.device());
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(at::kByte));
  std::vector<int64_t> rows(x.sizes().begin(), x.sizes().end() - 1);
  at::Tensor scale = at::empty(rows, x.options().dtype(at::kFloat));
  at::Tensor zero = at::empty(rows, x.options().dtype(at::kInt));
  if (x.numel() > 0) {
    cpu_kernels::quantize_rows_u7(x, q, scale, zero);
  } else {  // rows of width 0 (or none): scale 0 and zero point 0, as for an all-zero row
    scale.zero_();
    zero.zero_();
  }
  return {q, scale, zero};
}

// The 7-bit GEMMs' activations: q [M, K] uint8 and its per-row zero points [M] int32.
void check_u7_rows(const char* op, const at::Tensor& q, const at::Tensor& zero) {
  TORCH_CHECK(q.is_cpu() && q.dim() == 2 && q.is_contiguous() && q.scalar_type() == at::kByte,
              "gitfast.", op, ": q must be a contiguous 2-D uint8 CPU tensor, got ", q.scalar_type(), " ", q.sizes(),
              " on ", q.device());
  TORCH_CHECK(zero.is_cpu() && zero.is_contiguous() && zero.scalar_type() == at::kInt && zero.dim() == 1 &&
                  zero.size(0) == q.size(0),
              "gitfast.", op, ": zero must be a contiguous [", q.size(0), "] int32 CPU tensor, got ",
              zero.scalar_type(), " ", zero.sizes());
}

// Whether every byte of q is at most 127: one OR over the bytes, 8 at a time (the compiler widens the
// loop). at::max on uint8 took 7.3 ms for a 2561 x 768 q here (AMD Zen 3), 7% of an INT8 caption run.
bool u7_only(const at::Tensor& q) {
  const auto* p = q.const_data_ptr<uint8_t>();
  const int64_t n = q.numel();
  uint64_t bits = 0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t word;
    std::memcpy(&word, p + i, sizeof(word));
    bits |= word;
  }
  for (; i < n; ++i) bits |= p[i];
  return (bits & 0x8080808080808080ULL) == 0;
}

std::string int8_u7_isa() { return cpu_kernels::int8_u7_isa(); }

at::Tensor pack_u7_weight(const at::Tensor& w) {
  TORCH_CHECK(w.is_cpu() && w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kChar,
              "gitfast.pack_u7_weight: w must be a contiguous 2-D int8 CPU tensor, got ", w.scalar_type(), " ",
              w.sizes(), " on ", w.device());
  at::Tensor packed = at::empty({(w.size(0) + 15) / 16, (w.size(1) + 3) / 4, 16, 4}, w.options());
  if (packed.numel() > 0) cpu_kernels::pack_u7_weight(w, packed);
  return packed;
}

// The packed GEMMs' weight and row sums: colsum [N] int32, packed pack_u7_weight's
// [ceil(N/16), ceil(K/4), 16, 4] int8 for N = colsum's length and K = q's.
void check_packed(const char* op, const at::Tensor& q, const at::Tensor& packed, const at::Tensor& colsum) {
  TORCH_CHECK(colsum.is_cpu() && colsum.dim() == 1 && colsum.is_contiguous() && colsum.scalar_type() == at::kInt,
              "gitfast.", op, ": colsum must be a contiguous 1-D int32 CPU tensor, got ", colsum.scalar_type(), " ",
              colsum.sizes());
  const int64_t n = colsum.size(0);
  const std::vector<int64_t> want{(n + 15) / 16, (q.size(1) + 3) / 4, 16, 4};
  TORCH_CHECK(packed.is_cpu() && packed.is_contiguous() && packed.scalar_type() == at::kChar &&
                  packed.sizes() == at::IntArrayRef(want),
              "gitfast.", op, ": packed must be pack_u7_weight's contiguous ", at::IntArrayRef(want),
              " int8 CPU tensor (N = colsum's ", n, ", K = q's ", q.size(1), "), got ", packed.scalar_type(), " ",
              packed.sizes());
}

at::Tensor int8_mm_u7_packed(const at::Tensor& q, const at::Tensor& zero, const at::Tensor& packed,
                             const at::Tensor& colsum) {
  const char* op = "int8_mm_u7_packed";
  check_u7_rows(op, q, zero);
  check_packed(op, q, packed, colsum);
  at::Tensor acc = at::empty({q.size(0), colsum.size(0)}, q.options().dtype(at::kInt));
  if (acc.numel() == 0) return acc;
  if (q.size(1) == 0) return acc.zero_();
  // 128..255 would saturate VPMADDUBSW's int16 pair sums: a wrong answer, so refused (one pass over q)
  TORCH_CHECK(u7_only(q), "gitfast.", op, ": q holds values above 127 (7-bit activations only)");
  cpu_kernels::int8_mm_u7_packed(q, zero, packed, colsum, acc);
  return acc;
}

std::string int8_vnni_isa() { return cpu_kernels::int8_vnni_isa(); }

at::Tensor int8_mm_vnni(const at::Tensor& q, const at::Tensor& packed, const at::Tensor& colsum) {
  const char* op = "int8_mm_vnni";
  TORCH_CHECK(q.is_cpu() && q.dim() == 2 && q.is_contiguous() && q.scalar_type() == at::kChar,
              "gitfast.", op, ": q must be a contiguous 2-D int8 CPU tensor, got ", q.scalar_type(), " ", q.sizes(),
              " on ", q.device());
  check_packed(op, q, packed, colsum);
  // int32 sums of (q + 128) * w stay exact up to K = 65536 (255 * 128 * 65536 < 2^31)
  TORCH_CHECK(q.size(1) <= 65536, "gitfast.", op, ": K = ", q.size(1), " is above 65536, where int32 sums overflow");
  at::Tensor acc = at::empty({q.size(0), colsum.size(0)}, q.options().dtype(at::kInt));
  if (acc.numel() == 0) return acc;
  if (q.size(1) == 0) return acc.zero_();
  cpu_kernels::int8_mm_vnni(q, packed, colsum, acc);
  return acc;
}

// ---------------------------------------------------------------------------------------------
// The bf16 LM head with fp32 logits (CPU kernels only)
// ---------------------------------------------------------------------------------------------

at::Tensor pack_bf16_cols(const at::Tensor& w) {
  TORCH_CHECK(w.is_cpu() && w.dim() == 2 && w.is_contiguous() && w.scalar_type() == at::kBFloat16,
              "gitfast.pack_bf16_cols: w must be a contiguous 2-D bfloat16 CPU tensor, got ", w.scalar_type(), " ",
              w.sizes(), " on ", w.device());
  const int64_t tiles = (w.size(0) + 31) / 32 * 2, kp = (w.size(1) + 1) / 2;
  at::Tensor packed = at::empty({tiles, kp, 16, 2}, w.options());
  if (packed.numel() > 0) cpu_kernels::pack_bf16_cols(w, packed);
  return packed;
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed, int64_t n, const std::optional<at::Tensor>& bias,
                       bool fp32_out) {
  const char* op = "linear_bf16";
  TORCH_CHECK(x.is_cpu() && x.dim() >= 1 && x.is_contiguous() && x.scalar_type() == at::kBFloat16, "gitfast.", op,
              ": x must be a contiguous bfloat16 CPU tensor, got ", x.scalar_type(), " ", x.sizes(), " on ", x.device());
  const int64_t k = x.size(-1);
  TORCH_CHECK(packed.is_cpu() && packed.is_contiguous() && packed.scalar_type() == at::kBFloat16 && packed.dim() == 4 &&
                  packed.size(2) == 16 && packed.size(3) == 2 && packed.size(0) % 2 == 0 && packed.size(1) == (k + 1) / 2,
              "gitfast.", op, ": packed must come from pack_bf16_cols of a [N, ", k, "] weight, got ",
              packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(n >= 0 && n <= packed.size(0) * 16 && n > (packed.size(0) - 2) * 16, "gitfast.", op, ": n = ", n,
              " does not match the packed weight's ", packed.size(0), " column tiles");
  if (bias) check_f32_vector(*bias, n, op, "bias");
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = n;
  at::Tensor y = at::empty(shape, x.options().dtype(fp32_out ? at::kFloat : at::kBFloat16));
  int64_t m = 1;  // rows: the leading dimensions (not numel / K, which is 0 rows for K = 0)
  for (int64_t d = 0; d + 1 < x.dim(); ++d) m *= x.size(d);
  if (m > 0 && n > 0) {
    at::Tensor y2 = y.view({m, n});
    cpu_kernels::linear_bf16(x.view({m, k}), packed, bias ? &*bias : nullptr, y2);
  }
  return y;
}

std::string logits_isa() { return cpu_kernels::logits_isa(); }

// ---------------------------------------------------------------------------------------------
// fp32 Linear at few rows (CPU kernels only)
// ---------------------------------------------------------------------------------------------

at::Tensor linear_fp32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                       std::optional<c10::string_view> activation) {
  const char* op = "linear_fp32";
  const int act = activation ? static_cast<int>(parse_activation(*activation)) : -1;
  TORCH_CHECK(x.is_cpu() && x.dim() >= 1 && x.is_contiguous() && x.scalar_type() == at::kFloat, "gitfast.", op,
              ": x must be a contiguous float32 CPU tensor, got ", x.scalar_type(), " ", x.sizes(), " on ", x.device());
  const int64_t k = x.size(-1), n = w.dim() == 2 ? w.size(0) : -1;
  TORCH_CHECK(w.is_cpu() && w.dim() == 2 && w.size(1) == k && w.is_contiguous() && w.scalar_type() == at::kFloat,
              "gitfast.", op, ": w must be a contiguous [N, ", k, "] float32 CPU tensor, got ", w.scalar_type(), " ",
              w.sizes(), " on ", w.device());
  if (bias) check_f32_vector(*bias, n, op, "bias");
  std::vector<int64_t> shape = x.sizes().vec();
  shape.back() = n;
  at::Tensor y = at::empty(shape, x.options());
  const int64_t m = y.numel() / std::max<int64_t>(n, 1);  // from y: with K = 0, x has no elements to count
  if (m > 0 && n > 0) {
    at::Tensor y2 = y.view({m, n});
    cpu_kernels::linear_fp32(x.view({m, k}), w, bias ? &*bias : nullptr, act, y2);
  }
  return y;
}

std::string linear_fp32_isa() { return cpu_kernels::linear_fp32_isa(); }

}  // namespace
}  // namespace gitfast

// ---------------------------------------------------------------------------------------------
// Registration. FRAGMENT, not TORCH_LIBRARY: Python code may add ops to the same namespace.
// ---------------------------------------------------------------------------------------------
TORCH_LIBRARY_FRAGMENT(gitfast, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("layer_norm(Tensor x, Tensor weight, Tensor bias, float eps) -> Tensor", tags);
  m.def("add_layer_norm(Tensor x, Tensor residual, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor)",
        tags);
  m.def("bias_act(Tensor x, Tensor? bias, str activation) -> Tensor", tags);
  m.def("mlp(Tensor x, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
        "str activation) -> Tensor",
        tags);
  // Attention: num_image_tokens is per sequence when the tensor is given (0-dim: for all), else the int.
  m.def("git_attention(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, Tensor? num_image_tokens_per_seq, "
        "int num_image_tokens, float? sm_scale) -> Tensor",
        tags);
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float? sm_scale) -> Tensor",
        tags);
  m.def("paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor cu_seqlens_q, Tensor context_lens, Tensor? num_image_tokens_per_seq, int num_image_tokens, "
        "float? sm_scale) -> Tensor",
        tags);
  m.def("quantize_rows(Tensor x) -> (Tensor, Tensor)", tags);
  m.def("dequantize_rows(Tensor acc, Tensor row_scale, Tensor? col_scale, Tensor? bias, str? activation, "
        "ScalarType dtype) -> Tensor",
        tags);
  m.def("requantize_rows_u7(Tensor acc, Tensor row_scale, Tensor? col_scale, Tensor? bias, str? activation, "
        "ScalarType dtype) -> (Tensor, Tensor, Tensor)",
        tags);
  m.def("write_kv_cache(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()",
        tags);
  m.def("cpu_isa() -> str", &gitfast::cpu_isa);  // no tensors: one kernel for every dispatch key
  m.def("cpu_isas() -> str[]", &gitfast::cpu_isas);
  m.def("set_cpu_isa(str name) -> ()", &gitfast::set_cpu_isa);
  m.def("int8_mm(Tensor q, Tensor w) -> Tensor", tags);
  m.def("int8_isa() -> str", &gitfast::int8_isa);
  m.def("quantize_rows_u7(Tensor x) -> (Tensor, Tensor, Tensor)", tags);
  m.def("int8_u7_isa() -> str", &gitfast::int8_u7_isa);
  m.def("pack_u7_weight(Tensor w) -> Tensor", tags);
  m.def("int8_mm_u7_packed(Tensor q, Tensor zero, Tensor packed, Tensor colsum) -> Tensor", tags);
  m.def("int8_vnni_isa() -> str", &gitfast::int8_vnni_isa);
  m.def("int8_mm_vnni(Tensor q, Tensor packed, Tensor colsum) -> Tensor", tags);
  m.def("pack_bf16_cols(Tensor w) -> Tensor", tags);
  m.def("linear_bf16(Tensor x, Tensor packed, int n, Tensor? bias, bool fp32_out=True) -> Tensor", tags);
  m.def("logits_isa() -> str", &gitfast::logits_isa);
  m.def("linear_fp32(Tensor x, Tensor w, Tensor? bias, str? activation=None) -> Tensor", tags);
  m.def("linear_fp32_isa() -> str", &gitfast::linear_fp32_isa);
}

// The same entries for every device: they pick the device's kernels themselves.
#define GITFAST_IMPL_ALL(m)                           \
  m.impl("layer_norm", &gitfast::layer_norm);         \
  m.impl("add_layer_norm", &gitfast::add_layer_norm); \
  m.impl("bias_act", &gitfast::bias_act);             \
  m.impl("mlp", &gitfast::mlp)

TORCH_LIBRARY_IMPL(gitfast, CPU, m) {
  GITFAST_IMPL_ALL(m);
  m.impl("git_attention", &gitfast::git_attention);
  m.impl("paged_decode_attention", &gitfast::paged_decode_attention);
  m.impl("paged_prefill_attention", &gitfast::paged_prefill_attention);
  m.impl("write_kv_cache", &gitfast::write_kv_cache);
  m.impl("quantize_rows", &gitfast::quantize_rows);
  m.impl("dequantize_rows", &gitfast::dequantize_rows);
  m.impl("int8_mm", &gitfast::int8_mm);
  m.impl("quantize_rows_u7", &gitfast::quantize_rows_u7);
  m.impl("requantize_rows_u7", &gitfast::requantize_rows_u7);
  m.impl("pack_u7_weight", &gitfast::pack_u7_weight);
  m.impl("int8_mm_u7_packed", &gitfast::int8_mm_u7_packed);
  m.impl("int8_mm_vnni", &gitfast::int8_mm_vnni);
  m.impl("pack_bf16_cols", &gitfast::pack_bf16_cols);
  m.impl("linear_bf16", &gitfast::linear_bf16);
  m.impl("linear_fp32", &gitfast::linear_fp32);
}
#if GITFAST_WITH_CUDA
TORCH_LIBRARY_IMPL(gitfast, CUDA, m) { GITFAST_IMPL_ALL(m); }
#endif

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "gitfast's compiled ops; importing registers them as torch.ops.gitfast.*", -1,
                               nullptr};
  PyObject* mod = PyModule_Create(&module);
  // with_cuda: whether CUDA kernels were compiled in; cuda_build_note: why (or with which toolkit),
  // so a CPU-only extension under a CUDA build of torch is told apart at run time
  if (mod != nullptr && (PyModule_AddIntConstant(mod, "with_cuda", GITFAST_WITH_CUDA) != 0 ||
                         PyModule_AddStringConstant(mod, "cuda_build_note", GITFAST_CUDA_BUILD_NOTE) != 0)) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
