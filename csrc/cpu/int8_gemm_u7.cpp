// gitfast._C, CPU kernel of dynamic INT8's GEMM for 7-bit activations (gitfast/quantization.py,
// backend "cpu ext u7"):
//   acc [M, N] int32 = (q [M, K] uint8 - zero [M]) @ w [N, K]^T int8, exact for q <= 127;
//   colsum [N] int32 = sum_k w[n, k] (the caller's, computed once per weight);
// w is packed once (pack_u7_weight, layout below) and read by int8_mm_u7_packed.
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
// Layout: q's rows are read in place; a 4-row x 16-column "outer product" tile whose accumulators
// are output columns (no horizontal sums or scalar epilogue per tile: 1.09-1.26x faster on git-base's
// image GEMMs, one Zen 3 thread, than the dot-product 2 x 4 tile it replaced, whose sums cost ~15%
// at K = 768); threads split the weight's column blocks; q's rows are walked in passes that stay in
// L2. ISA: widest_isa() (avx2 on AVX2 and AVX-512 CPUs; generic elsewhere).

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/simd.h"
#include "ops.h"

namespace gitfast {
namespace {

constexpr int64_t kQPassBytes = 256 * 1024;  // q rows walked per pass over the weights: ~L2/2

// The packed ("outer product") layout of int8_mm_u7_packed: packed [ceil(N/16), ceil(K/4), 16, 4] int8,
// packed[b][j][c][i] = w[16b + c][4j + i], zeros past N and K. One k-quad of a 16-column block is two
// ymm (8 columns x 4 k each): VPMADDUBSW against q's 4 bytes broadcast, then VPMADDWD by ones, leave
// 8 int32 sums, one per output column, so the accumulators are the output columns themselves (no
// horizontal sums per tile).
constexpr int64_t kPackCols = 16;  // output columns per packed block
constexpr int64_t kQuad = 4;       // k values per packed group (VPMADDWD's 4 bytes per int32 lane)
constexpr int kPackRows = 4;       // q rows per register tile: 4 x 16 columns, 8 accumulators

// out[r * ldo + c] = sum_k a[r][k] * w[c][k] - zero[r] * colsum[c] for a 4-row x 16-column tile,
// `b` the block's packed weight (ceil(k/4) quads), colsum the block's 16 (zero past N): the portable
// path and the reference for the vector one.
void packed_tile_generic(const uint8_t* const* a, const int8_t* b, int64_t k, const int32_t* zero,
                         const int32_t* colsum, int32_t* out, int64_t ldo) {
  for (int r = 0; r < kPackRows; ++r) {
    for (int64_t c = 0; c < kPackCols; ++c) {
      int32_t s = 0;
      for (int64_t i = 0; i < k; ++i)
        s += static_cast<int32_t>(a[r][i]) * b[(i / kQuad * kPackCols + c) * kQuad + i % kQuad];
      out[r * ldo + c] = s - zero[r] * colsum[c];
    }
  }
}

}  // namespace

#if GITFAST_X86
GITFAST_TARGET_BEGIN("avx2")
namespace {

// q's 4 bytes at k-quad `j` of row `a` in every int32 lane; the last quad of a row whose K is not a
// multiple of 4 is read byte by byte (zeros after), so q is never read past its end.
GITFAST_INLINE __m256i quad_of(const uint8_t* a, int64_t j, int64_t k) {
  int32_t v = 0;
  std::memcpy(&v, a + j * kQuad, static_cast<size_t>(std::min<int64_t>(kQuad, k - j * kQuad)));
  return _mm256_set1_epi32(v);
}

// The whole k-quads (bytes = 4 * quads > 0) in assembly, as int8_gemm.cpp's tile: GCC 12 adds a
// register copy per accumulator per quad around the intrinsics. Registers: ymm8-9 the two weight
// vectors, ymm10 int16 ones, ymm11-12 and ymm13-14 one row's broadcast and products each (alternate
// rows, so neighbouring rows' work overlaps).
#define GITFAST_U7_ROW(row, x, y, c0, c1)                         \
  "vpbroadcastd (%[" #row "],%[at]), %%" #x "\n\t"                \
  "vpmaddubsw %%ymm8, %%" #x ", %%" #y "\n\t"                     \
  "vpmaddubsw %%ymm9, %%" #x ", %%" #x "\n\t"                     \
  "vpmaddwd %%ymm10, %%" #y ", %%" #y "\n\t"                      \
  "vpmaddwd %%ymm10, %%" #x ", %%" #x "\n\t"                      \
  "vpaddd %%" #y ", %[" #c0 "], %[" #c0 "]\n\t"                   \
  "vpaddd %%" #x ", %[" #c1 "], %[" #c1 "]\n\t"
void quads_avx2(const uint8_t* const* a, const int8_t* b, int64_t bytes, __m256i& c00, __m256i& c01, __m256i& c10,
                __m256i& c11, __m256i& c20, __m256i& c21, __m256i& c30, __m256i& c31) {
  const __m256i ones = _mm256_set1_epi16(1);
  int64_t at = 0;
  asm volatile(
      "vmovdqa %[ones], %%ymm10\n\t"
      "1:\n\t"
      "vmovdqu (%[b]), %%ymm8\n\t"
      "vmovdqu 32(%[b]), %%ymm9\n\t"
      GITFAST_U7_ROW(a0, ymm11, ymm12, c00, c01)
      GITFAST_U7_ROW(a1, ymm13, ymm14, c10, c11)
      GITFAST_U7_ROW(a2, ymm11, ymm12, c20, c21)
      GITFAST_U7_ROW(a3, ymm13, ymm14, c30, c31)
      "add $64, %[b]\n\t"
      "add $4, %[at]\n\t"
      "cmp %[bytes], %[at]\n\t"
      "jb 1b\n\t"
      : [c00] "+x"(c00), [c01] "+x"(c01), [c10] "+x"(c10), [c11] "+x"(c11), [c20] "+x"(c20), [c21] "+x"(c21),
        [c30] "+x"(c30), [c31] "+x"(c31), [at] "+r"(at), [b] "+r"(b)
      : [a0] "r"(a[0]), [a1] "r"(a[1]), [a2] "r"(a[2]), [a3] "r"(a[3]), [bytes] "r"(bytes), [ones] "m"(ones)
      : "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "memory", "cc");
}
#undef GITFAST_U7_ROW

// packed_tile_generic's tile: per k-quad 2 weight vectors, 4 broadcasts, 8 VPMADDUBSW + 8 VPMADDWD +
// 8 VPADDD for 256 products (the dot-product tile's ratio); the whole quads in quads_avx2, a last
// partial one in `step`, then the zero points taken back in vectors.
void packed_tile_avx2(const uint8_t* const* a, const int8_t* b, int64_t k, const int32_t* zero,
                      const int32_t* colsum, int32_t* out, int64_t ldo) {
  static_assert(kPackRows == 4 && kPackCols == 16, "the tile below is 4 rows x 2 vectors");
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  const int64_t whole = k / kQuad, quads = (k + kQuad - 1) / kQuad;
  const uint8_t *a0 = a[0], *a1 = a[1], *a2 = a[2], *a3 = a[3];
  auto step = [&](__m256i x0, __m256i x1, __m256i x2, __m256i x3, const int8_t* bq) {
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bq));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bq + 32));
    c00 = _mm256_add_epi32(c00, _mm256_madd_epi16(_mm256_maddubs_epi16(x0, b0), ones));
    c01 = _mm256_add_epi32(c01, _mm256_madd_epi16(_mm256_maddubs_epi16(x0, b1), ones));
    c10 = _mm256_add_epi32(c10, _mm256_madd_epi16(_mm256_maddubs_epi16(x1, b0), ones));
    c11 = _mm256_add_epi32(c11, _mm256_madd_epi16(_mm256_maddubs_epi16(x1, b1), ones));
    c20 = _mm256_add_epi32(c20, _mm256_madd_epi16(_mm256_maddubs_epi16(x2, b0), ones));
    c21 = _mm256_add_epi32(c21, _mm256_madd_epi16(_mm256_maddubs_epi16(x2, b1), ones));
    c30 = _mm256_add_epi32(c30, _mm256_madd_epi16(_mm256_maddubs_epi16(x3, b0), ones));
    c31 = _mm256_add_epi32(c31, _mm256_madd_epi16(_mm256_maddubs_epi16(x3, b1), ones));
  };
  if (whole > 0) quads_avx2(a, b, whole * kQuad, c00, c01, c10, c11, c20, c21, c30, c31);
  if (whole < quads)
    step(quad_of(a0, whole, k), quad_of(a1, whole, k), quad_of(a2, whole, k), quad_of(a3, whole, k),
         b + whole * kQuad * kPackCols);
  const __m256i s0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(colsum));
  const __m256i s1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(colsum + 8));
  const __m256i acc[kPackRows][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
  for (int r = 0; r < kPackRows; ++r) {
    const __m256i z = _mm256_set1_epi32(zero[r]);
    __m256i* o = reinterpret_cast<__m256i*>(out + r * ldo);
    _mm256_storeu_si256(o, _mm256_sub_epi32(acc[r][0], _mm256_mullo_epi32(z, s0)));
    _mm256_storeu_si256(o + 1, _mm256_sub_epi32(acc[r][1], _mm256_mullo_epi32(z, s1)));
  }
}

}  // namespace
GITFAST_TARGET_END
#endif  // GITFAST_X86

namespace {

using PackedTileFn = void (*)(const uint8_t* const*, const int8_t*, int64_t, const int32_t*, const int32_t*,
                              int32_t*, int64_t);

struct U7Path {
  const char* name;
  PackedTileFn packed_tile;
};

const U7Path& chosen_path() {
  static const U7Path path = [] {
    const std::string isa = cpu_kernels::widest_isa();
#if GITFAST_X86
    // AVX-512 CPUs have AVX2
    if (isa == "avx512" || isa == "avx2") return U7Path{"avx2", &packed_tile_avx2};
#endif
    return U7Path{"generic", &packed_tile_generic};
  }();
  return path;
}

}  // namespace

namespace cpu_kernels {

const char* int8_u7_isa() { return chosen_path().name; }

void pack_u7_weight(const at::Tensor& w, at::Tensor& packed) {
  const int64_t n = w.size(0), k = w.size(1), quads = packed.size(1);
  const int8_t* wp = w.const_data_ptr<int8_t>();
  int8_t* pp = packed.mutable_data_ptr<int8_t>();
  std::memset(pp, 0, static_cast<size_t>(packed.numel()));
  for (int64_t c = 0; c < n; ++c) {
    int8_t* block = pp + c / kPackCols * quads * kQuad * kPackCols + c % kPackCols * kQuad;
    for (int64_t i = 0; i < k; ++i) block[(i / kQuad * kPackCols) * kQuad + i % kQuad] = wp[c * k + i];
  }
}

void int8_mm_u7_packed(const at::Tensor& q, const at::Tensor& zero, const at::Tensor& packed,
                       const at::Tensor& colsum, at::Tensor& out) {
  const PackedTileFn tile = chosen_path().packed_tile;
  const int64_t m = q.size(0), k = q.size(1), n = out.size(1), blocks = packed.size(0);
  const int64_t block_bytes = packed.size(1) * kQuad * kPackCols;
  const uint8_t* qp = q.const_data_ptr<uint8_t>();
  const int32_t* zp = zero.const_data_ptr<int32_t>();
  const int8_t* pp = packed.const_data_ptr<int8_t>();
  int32_t* op = out.mutable_data_ptr<int32_t>();
  std::vector<int32_t> cs(static_cast<size_t>(blocks * kPackCols), 0);  // zeros past N, as the packing
  std::memcpy(cs.data(), colsum.const_data_ptr<int32_t>(), static_cast<size_t>(n) * sizeof(int32_t));

  const int64_t rows_per_pass =
      std::max<int64_t>(kPackRows, kQPassBytes / std::max<int64_t>(k, 1) / kPackRows * kPackRows);
  at::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / (k * kPackCols)), [&](int64_t begin, int64_t end) {
    for (int64_t r0 = 0; r0 < m; r0 += rows_per_pass) {
      const int64_t r1 = std::min(m, r0 + rows_per_pass);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t c0 = blk * kPackCols, cols = std::min(kPackCols, n - c0);
        for (int64_t r = r0; r < r1; r += kPackRows) {
          const uint8_t* a[kPackRows];
          int32_t z[kPackRows];
          for (int i = 0; i < kPackRows; ++i) {  // past m: the last row again, its results dropped
            const int64_t row = std::min<int64_t>(r + i, m - 1);
            a[i] = qp + row * k;
            z[i] = zp[row];
          }
          const int64_t rows = std::min<int64_t>(kPackRows, m - r);
          if (rows == kPackRows && cols == kPackCols) {
            tile(a, pp + blk * block_bytes, k, z, cs.data() + c0, op + r * n + c0, n);
            continue;
          }
          int32_t part[kPackRows * kPackCols];  // a partial tile: through a buffer
          tile(a, pp + blk * block_bytes, k, z, cs.data() + c0, part, kPackCols);
          for (int64_t i = 0; i < rows; ++i)
            std::memcpy(op + (r + i) * n + c0, part + i * kPackCols, static_cast<size_t>(cols) * sizeof(int32_t));
        }
      }
    }
  });
}

}  // namespace cpu_kernels
}  // namespace gitfast
