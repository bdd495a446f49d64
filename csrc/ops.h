// gitfast._C: what the bindings (bindings.cpp: schemas, input checks, one entry per op) share with
// the per-device kernels (cpu/*.cpp, cuda/*.cu).
//
// Ops (namespace `gitfast`), all on tensors of shape [..., width], contiguous, one dtype
// (float32 / float16 / bfloat16), arithmetic in fp32:
//   layer_norm(x, w, b, eps)                 -> LayerNorm(x)
//   add_layer_norm(x, residual, w, b, eps)   -> (LayerNorm(x + residual), x + residual)
//   bias_act(x, bias?, activation)           -> act(x + bias), act in {quick_gelu, gelu}
//   mlp(x, w1, b1?, w2, b2?, activation)     -> act(x @ w1^T + b1) @ w2^T + b2
// dynamic INT8's per-row (per-token) quantize / dequantize passes around an int8 GEMM (CPU only):
//   quantize_rows, dequantize_rows, int8_mm (the exact int8 GEMM between them), int8_isa,
//   quantize_rows_u7, pack_u7_weight and int8_mm_u7_packed (7-bit activations, a faster GEMM
//   without VNNI, over a weight packed once), int8_u7_isa
// and GIT attention on the CPU (cpu/attention.cpp; contracts of kernels/api.py):
//   git_attention, paged_decode_attention, paged_prefill_attention, cpu_isa
// and the bf16 LM head with fp32 logits (cpu/logits.cpp): pack_bf16_cols, linear_bf16, logits_isa
// and fp32 Linear layers at few rows (cpu/linear_fp32.cpp): linear_fp32, linear_fp32_isa
// Kernels get inputs the bindings have checked (dtype, shapes, contiguity, one device) and write
// into outputs the bindings allocated. This header stays light (no CUDA, no pybind) so both
// compilers parse it quickly.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

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

// fp32 row helpers of norm_act.cpp, shared with quant.cpp: dtype conversions (float32 / float16 /
// bfloat16 rows, rounding to nearest even) and y = act(x + bias) on one fp32 row (bias may be null).
void row_to_f32(at::ScalarType t, const void* src, float* dst, int64_t n);
void row_from_f32(at::ScalarType t, const float* src, void* dst, int64_t n);
void bias_act_row(const float* x, const float* bias, float* y, int64_t n, Activation act);

// Dynamic INT8 (CPU only, quant.cpp).
//   quantize_rows:   q[m, :] = round(x[m, :] * 127 / max|x[m, :]|) as int8, scale[m] = max|x[m, :]| / 127
//                    (0 for an all-zero row, whose q is 0)
//   dequantize_rows: y[m, n] = act(acc[m, n] * row_scale[m] * col_scale[n] + bias[n]), acc int32 or
//                    fp32, col_scale / bias optional, act < 0 for none; y in its own dtype
void quantize_rows(const at::Tensor& x, at::Tensor& q, at::Tensor& scale);
void dequantize_rows(const at::Tensor& acc, const at::Tensor& row_scale, const at::Tensor* col_scale,
                     const at::Tensor* bias, int act, at::Tensor& y);
//   int8_mm:         acc [M, N] int32 = q [M, K] int8 @ w [N, K]^T int8, exact (int8_gemm.cpp)
//   int8_isa:        "avx512", "avx2" or "generic": cpu_isa's choice
void int8_mm(const at::Tensor& q, const at::Tensor& w, at::Tensor& acc);
const char* int8_isa();
//   quantize_rows_u7: q[m, :] = clamp(round(x[m, :] / scale[m]) + zero[m], 0, 127) as uint8, with
//                    lo = min(x[m, :], 0), hi = max(x[m, :], 0), scale = (hi - lo) / 127, zero =
//                    round(-lo / scale) (0 and 0 for an all-zero row)
//   pack_u7_weight:  w [N, K] int8 -> packed [ceil(N/16), ceil(K/4), 16, 4] int8 (zeros past N and K),
//                    packed[b][j][c][i] = w[16b + c][4j + i]: the layout int8_mm_u7_packed reads
//   int8_mm_u7_packed: acc [M, N] int32 = (q [M, K] uint8 - zero [M]) @ w [N, K]^T int8 from w packed,
//                    exact for q <= 127; colsum [N] int32 = w's row sums (acc's N = colsum's length;
//                    int8_gemm_u7.cpp: VPMADDUBSW where the CPU has AVX2)
//   int8_u7_isa:     "avx2" or "generic"
//   requantize_rows_u7: quantize_rows_u7 of dequantize_rows' output in `dtype` (rounded to it as that
//                    output would be), row by row, without the float tensor between them: the same bits
void quantize_rows_u7(const at::Tensor& x, at::Tensor& q, at::Tensor& scale, at::Tensor& zero);
void requantize_rows_u7(const at::Tensor& acc, const at::Tensor& row_scale, const at::Tensor* col_scale,
                        const at::Tensor* bias, int act, at::ScalarType dtype, at::Tensor& q, at::Tensor& scale,
                        at::Tensor& zero);
void pack_u7_weight(const at::Tensor& w, at::Tensor& packed);
void int8_mm_u7_packed(const at::Tensor& q, const at::Tensor& zero, const at::Tensor& packed,
                       const at::Tensor& colsum, at::Tensor& acc);
const char* int8_u7_isa();
//   int8_mm_vnni:    acc [M, N] int32 = q [M, K] int8 @ w [N, K]^T int8, exact, from w packed by
//                    pack_u7_weight, colsum [N] int32 = w's row sums (int8_gemm_vnni.cpp: VPDPBUSD on
//                    q + 128 where the CPU has VNNI)
//   int8_vnni_isa:   "avx512vnni", "avxvnni", "avx2" (VNNI's products in AVX2) or "generic"
void int8_mm_vnni(const at::Tensor& q, const at::Tensor& packed, const at::Tensor& colsum, at::Tensor& acc);
const char* int8_vnni_isa();

// Attention (CPU only). q/k/v/caches: last dim contiguous, any leading strides; index tensors
// contiguous int32 (image_counts [B], one per sequence); out: q's shape and dtype.
//   git_attention:   q, k, v [N, H, D] packed varlen, cu_seqlens [B + 1]
//   paged_attention: q [N, H, D] new tokens (cu_seqlens_q [B + 1]) at the end of context_lens[b]
//                    cached tokens each, caches [num_blocks, block_size, H, D], block_tables [B, W];
//                    decode is one new token per sequence, no image tokens (an empty context -> 0)
void git_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
                   const at::Tensor& image_counts, double sm_scale, at::Tensor& out);
void paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q, const at::Tensor& context_lens,
                     const at::Tensor& image_counts, double sm_scale, at::Tensor& out);
//   write_kv_cache: rows k[i], v[i] ([N, H, D], rows dense) into cache slot slot_mapping[i] (int64,
//                   block * block_size + offset; negative: skipped) of contiguous caches
void write_kv_cache(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                    const at::Tensor& slot_mapping);
// The vector ISA the attention kernels run ("avx512", "avx2" or "generic"): the widest this CPU
// has (capped by GITFAST_CPU_ISA) until set_cpu_isa picks another of fit_isa_names (widest first).
// The int8 GEMM and the bf16 kernel follow widest_isa, which never changes.
const char* cpu_isa();
const char* widest_isa();
std::vector<std::string> fit_isa_names();
void set_cpu_isa(const std::string& name);

// bf16 x bf16 -> fp32 for the LM head of bf16 models (logits.cpp).
//   pack_bf16_cols:  w [N, K] bf16 -> packed [T, ceil(K/2), 16, 2] bf16 (T: 16-column tiles, even;
//                    zero padding), the layout linear_bf16 reads
//   linear_bf16:     y [M, N] = x [M, K] bf16 @ w^T + bias (fp32, optional), fp32 accumulation; y fp32,
//                    or bf16 (rounded to nearest even once, at the end)
//   logits_isa:      "avx512bf16" or "portable", chosen once (from widest_isa)
void pack_bf16_cols(const at::Tensor& w, at::Tensor& packed);
void linear_bf16(const at::Tensor& x, const at::Tensor& packed, const at::Tensor* bias, at::Tensor& y);
const char* logits_isa();

// fp32 Linear at few rows (decode steps; linear_fp32.cpp).
//   linear_fp32:     y [M, N] = act(x [M, K] @ w [N, K]^T + bias) (bias optional, act < 0 for none;
//                    else an Activation), fp32, weights read as stored
//   linear_fp32_isa: "avx512", "avx2" or "generic": widest_isa's
void linear_fp32(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias, int act, at::Tensor& y);
const char* linear_fp32_isa();
}  // namespace cpu_kernels

namespace cuda_kernels {  // defined only in builds with CUDA (GITFAST_WITH_CUDA=1)
void layer_norm(const char* op, const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
                const at::Tensor& bias, double eps, at::Tensor& y, at::Tensor* summed);
void bias_act(const at::Tensor& x, const std::optional<at::Tensor>& bias, Activation act, at::Tensor& y);
}  // namespace cuda_kernels

}  // namespace gitfast
