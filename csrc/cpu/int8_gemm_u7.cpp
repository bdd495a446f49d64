// gitfast._C, CPU kernel of dynamic INT8's GEMM for 7-bit activations (gitfast/quantization.py,
// backend "cpu ext u7"):
//   acc [M, N] int32 = (q [M, K] uint8 - zero [M]) @ w [N, K]^T int8, exact for q <= 127;
//   colsum [N] int32 = sum_k w[n, k] (the caller's, computed once per weight).
//
// Why: on a CPU without VNNI the exact 8-bit x 8-bit kernel (int8_gemm.cpp) needs one VPMADDWD and
// one VPADDD per 16 products. VPMADDUBSW multiplies unsigned by signed bytes and adds neighbouring
// pairs into int16, 32 products per instruction, exact only while each pair sum fits int16: with
// activations quantized to 7 bits (0..127, one scale and zero point per row) and 8-bit weights a
// pair sum is at most 2 * 127 * 128 = 32512 < 32767, so VPMADDUBSW + VPMADDWD (by ones, into int32)
// + VPADDD give 32 exact products: 3 instructions where the 8-bit kernel needs 4. The zero point is
// taken back per row and column: sum_k (q - z) w = sum_k q w - z * colsum.
// The price is the activations' precision (7 bits, asymmetric, per token, instead of 8 bits
// symmetric), which is why this is a backend of its own, chosen by measurement after the exact 8-bit
// ones and recorded in resume settings; quantize_rows_u7 (quant.cpp) makes q and zero.
//
// Layout: q's rows are read in place; the last K % 32 values one by one. A register tile of 2 rows
// x 4 weight rows keeps 8 accumulators; threads split the weight's rows; q's rows are walked in
// passes that stay in L2. ISA: widest_isa() (avx2 on AVX2 and AVX-512 CPUs; generic elsewhere).

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/simd.h"
#include "ops.h"

namespace gitfast {
namespace {

constexpr int kCols = 4;       // weight rows (output columns) per register tile
constexpr int kRowsTile = 2;   // q rows per register tile
constexpr int64_t kVec = 32;   // bytes per ymm
constexpr int64_t kQPassBytes = 256 * 1024;  // q rows walked per pass over the weights: ~L2/2

// out[r][c] = sum_k a[r][k] * b[c][k] over the first k values (a unsigned, b signed): the portable
// path and the reference for the vector one.
void tile_generic(const uint8_t* const* a, const int8_t* const* b, int64_t k, int32_t out[kRowsTile][kCols]) {
  for (int r = 0; r < kRowsTile; ++r) {
    for (int c = 0; c < kCols; ++c) {
      int32_t s = 0;
      for (int64_t i = 0; i < k; ++i) s += static_cast<int32_t>(a[r][i]) * b[c][i];
      out[r][c] = s;
    }
  }
}

}  // namespace

#if GITFAST_X86
GITFAST_TARGET_BEGIN("avx2")
namespace {

// The four column sums of one row's accumulators, in column order (VPHADDD pairs them up twice,
// then the two 128-bit halves are added): 5 instructions where four separate sums take 28.
__m128i row_sums(__m256i c0, __m256i c1, __m256i c2, __m256i c3) {
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(c0, c1), _mm256_hadd_epi32(c2, c3));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

// The whole vectors of the tile in assembly, as int8_gemm.cpp's tile and for the same reason (GCC 12
// reloads and copies around the intrinsics). Registers: ymm8-9 q's rows, ymm10 one weight vector,
// ymm11-14 products, ymm15 int16 ones; `bytes` is a whole number of vectors.
void tile_avx2(const uint8_t* const* a, const int8_t* const* b, int64_t k, int32_t out[kRowsTile][kCols]) {
  static_assert(kRowsTile == 2 && kCols == 4, "the assembly below is a 2 x 4 tile");
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00, c13 = c00;
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t bytes = k / kVec * kVec;
  int64_t at = 0;
  if (bytes > 0)  // the loop tests at its end
  asm volatile(
      "vmovdqa %[ones], %%ymm15\n\t"
      "1:\n\t"
      "vmovdqu (%[a0],%[at]), %%ymm8\n\t"
      "vmovdqu (%[a1],%[at]), %%ymm9\n\t"
      "vmovdqu (%[b0],%[at]), %%ymm10\n\t"
      "vpmaddubsw %%ymm10, %%ymm8, %%ymm11\n\t"
      "vpmaddubsw %%ymm10, %%ymm9, %%ymm12\n\t"
      "vpmaddwd %%ymm15, %%ymm11, %%ymm11\n\t"
      "vpmaddwd %%ymm15, %%ymm12, %%ymm12\n\t"
      "vpaddd %%ymm11, %[c00], %[c00]\n\t"
      "vpaddd %%ymm12, %[c10], %[c10]\n\t"
      "vmovdqu (%[b1],%[at]), %%ymm10\n\t"
      "vpmaddubsw %%ymm10, %%ymm8, %%ymm13\n\t"
      "vpmaddubsw %%ymm10, %%ymm9, %%ymm14\n\t"
      "vpmaddwd %%ymm15, %%ymm13, %%ymm13\n\t"
      "vpmaddwd %%ymm15, %%ymm14, %%ymm14\n\t"
      "vpaddd %%ymm13, %[c01], %[c01]\n\t"
      "vpaddd %%ymm14, %[c11], %[c11]\n\t"
      "vmovdqu (%[b2],%[at]), %%ymm10\n\t"
      "vpmaddubsw %%ymm10, %%ymm8, %%ymm11\n\t"
      "vpmaddubsw %%ymm10, %%ymm9, %%ymm12\n\t"
      "vpmaddwd %%ymm15, %%ymm11, %%ymm11\n\t"
      "vpmaddwd %%ymm15, %%ymm12, %%ymm12\n\t"
      "vpaddd %%ymm11, %[c02], %[c02]\n\t"
      "vpaddd %%ymm12, %[c12], %[c12]\n\t"
      "vmovdqu (%[b3],%[at]), %%ymm10\n\t"
      "vpmaddubsw %%ymm10, %%ymm8, %%ymm13\n\t"
      "vpmaddubsw %%ymm10, %%ymm9, %%ymm14\n\t"
      "vpmaddwd %%ymm15, %%ymm13, %%ymm13\n\t"
      "vpmaddwd %%ymm15, %%ymm14, %%ymm14\n\t"
      "vpaddd %%ymm13, %[c03], %[c03]\n\t"
      "vpaddd %%ymm14, %[c13], %[c13]\n\t"
      "add $32, %[at]\n\t"
      "cmp %[bytes], %[at]\n\t"
      "jb 1b\n\t"
      : [c00] "+x"(c00), [c01] "+x"(c01), [c02] "+x"(c02), [c03] "+x"(c03), [c10] "+x"(c10), [c11] "+x"(c11),
        [c12] "+x"(c12), [c13] "+x"(c13), [at] "+r"(at)
      : [a0] "r"(a[0]), [a1] "r"(a[1]), [b0] "r"(b[0]), [b1] "r"(b[1]), [b2] "r"(b[2]), [b3] "r"(b[3]),
        [bytes] "r"(bytes), [ones] "m"(ones)
      : "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory", "cc");
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out[0]), row_sums(c00, c01, c02, c03));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out[1]), row_sums(c10, c11, c12, c13));
  for (int64_t i = bytes; i < k; ++i) {  // K % 32 last values
    for (int r = 0; r < kRowsTile; ++r)
      for (int c = 0; c < kCols; ++c) out[r][c] += static_cast<int32_t>(a[r][i]) * b[c][i];
  }
}

}  // namespace
GITFAST_TARGET_END
#endif  // GITFAST_X86

namespace {

using TileFn = void (*)(const uint8_t* const*, const int8_t* const*, int64_t, int32_t[kRowsTile][kCols]);

struct U7Path {
  const char* name;
  TileFn tile;
};

const U7Path& chosen_path() {
  static const U7Path path = [] {
    const std::string isa = cpu_kernels::widest_isa();
#if GITFAST_X86
    if (isa == "avx512" || isa == "avx2") return U7Path{"avx2", &tile_avx2};  // AVX-512 CPUs have AVX2
#endif
    return U7Path{"generic", &tile_generic};
  }();
  return path;
}

}  // namespace

namespace cpu_kernels {

const char* int8_u7_isa() { return chosen_path().name; }

void int8_mm_u7(const at::Tensor& q, const at::Tensor& zero, const at::Tensor& w, const at::Tensor& colsum,
                at::Tensor& out) {
  const U7Path& path = chosen_path();
  const int64_t m = q.size(0), k = q.size(1), n = w.size(0);
  const uint8_t* qp = q.const_data_ptr<uint8_t>();
  const int32_t* zp = zero.const_data_ptr<int32_t>();
  const int8_t* wp = w.const_data_ptr<int8_t>();
  const int32_t* cs = colsum.const_data_ptr<int32_t>();
  int32_t* op = out.mutable_data_ptr<int32_t>();

  const int64_t blocks = (n + kCols - 1) / kCols;
  const int64_t rows_per_pass = std::max<int64_t>(kRowsTile, kQPassBytes / std::max<int64_t>(k, 1) / kRowsTile * kRowsTile);
  // a grain of a few weight blocks: a decode step's small GEMMs still use every thread
  at::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / (k * kCols)), [&](int64_t begin, int64_t end) {
    for (int64_t r0 = 0; r0 < m; r0 += rows_per_pass) {
      const int64_t r1 = std::min(m, r0 + rows_per_pass);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t c0 = blk * kCols, cols = std::min<int64_t>(kCols, n - c0);
        const int8_t* b[kCols];
        for (int c = 0; c < kCols; ++c) b[c] = wp + (c0 + std::min<int64_t>(c, cols - 1)) * k;  // past n: a repeat, dropped
        for (int64_t r = r0; r < r1; r += kRowsTile) {
          const uint8_t* a[kRowsTile];
          for (int i = 0; i < kRowsTile; ++i) a[i] = qp + std::min<int64_t>(r + i, m - 1) * k;  // past m: likewise
          int32_t tile[kRowsTile][kCols];
          path.tile(a, b, k, tile);
          for (int i = 0; i < kRowsTile && r + i < m; ++i) {
            for (int c = 0; c < cols; ++c) op[(r + i) * n + c0 + c] = tile[i][c] - zp[r + i] * cs[c0 + c];
          }
        }
      }
    }
  });
}

}  // namespace cpu_kernels
}  // namespace gitfast
