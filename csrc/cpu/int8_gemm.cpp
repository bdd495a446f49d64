// gitfast._C, CPU kernel of dynamic INT8's GEMM (gitfast/quantization.py, backend "cpu ext"):
//   acc [M, N] int32 = q [M, K] int8 @ w [N, K]^T int8, exact.
//
// Why: without VNNI (AVX2-only CPUs such as AMD Zen 3) torch._int_mm ran about 20x slower than an
// fp32 matmul of the same integers, and oneDNN's u8 x s8 path saturates its 16-bit pair sums (wrong
// integers); fbgemm, which transformers' dynamic INT8 uses, quantizes activations per tensor. Here
// both operands are widened to int16 and multiplied with VPMADDWD (pairs of int16 products summed
// into int32: exact, |product| <= 127 * 127), 16 (AVX2) or 32 (AVX-512) products per instruction,
// against 8 or 16 for an fp32 FMA, and the weights are read as one byte each.
//
// Layout and blocking: q is widened once into an int16 copy with K padded to a whole vector (zeros);
// the weights are widened a block of kCols rows at a time into a per-thread buffer and reused for
// every row of q; a register tile of 2 rows x 4 columns keeps 8 accumulators. Threads split the
// weight's rows (the output's columns); rows of q are walked in tiles that stay in L2.
// ISA: widest_isa() of attention.cpp (avx512 | avx2 | generic, capped by GITFAST_CPU_ISA).

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/simd.h"
#include "ops.h"

namespace gitfast {
namespace {

constexpr int kCols = 4;          // weight rows (output columns) per register tile
constexpr int kRowsTile = 2;      // q rows per register tile (3 measured slower: 17.5 vs 11.9 ms)
constexpr int64_t kQTileBytes = 256 * 1024;  // q rows walked per pass over a weight block: ~L2/2

// Widens src[0:n] into dst[0:padded] (zeros past n).
void widen(const int8_t* src, int16_t* dst, int64_t n, int64_t padded) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  std::fill(dst + n, dst + padded, int16_t{0});
}

// One register tile, plain C++ (the portable path and the reference for the vector ones):
// out[r][c] = sum_k a[r][k] * b[c][k] over `padded` int16 values.
void tile_generic(const int16_t* const* a, const int16_t* const* b, int64_t padded, int32_t out[kRowsTile][kCols]) {
  for (int r = 0; r < kRowsTile; ++r) {
    for (int c = 0; c < kCols; ++c) {
      int32_t s = 0;
      for (int64_t k = 0; k < padded; ++k) s += static_cast<int32_t>(a[r][k]) * b[c][k];
      out[r][c] = s;
    }
  }
}

}  // namespace

#if GITFAST_X86
GITFAST_TARGET_BEGIN("avx512f,avx512bw,avx2")
GITFAST_QUIET_UNINITIALIZED_BEGIN
namespace {
constexpr int64_t kVec512 = 32;  // int16 per zmm

void tile_avx512(const int16_t* const* a, const int16_t* const* b, int64_t padded, int32_t out[kRowsTile][kCols]) {
  __m512i acc[kRowsTile][kCols];
  for (int r = 0; r < kRowsTile; ++r)
    for (int c = 0; c < kCols; ++c) acc[r][c] = _mm512_setzero_si512();
  for (int64_t k = 0; k < padded; k += kVec512) {
    __m512i x[kRowsTile];
    for (int r = 0; r < kRowsTile; ++r) x[r] = _mm512_loadu_si512(a[r] + k);
    for (int c = 0; c < kCols; ++c) {
      const __m512i w = _mm512_loadu_si512(b[c] + k);
      for (int r = 0; r < kRowsTile; ++r) acc[r][c] = _mm512_add_epi32(acc[r][c], _mm512_madd_epi16(x[r], w));
    }
  }
  for (int r = 0; r < kRowsTile; ++r)
    for (int c = 0; c < kCols; ++c) out[r][c] = _mm512_reduce_add_epi32(acc[r][c]);
}
}  // namespace
GITFAST_QUIET_UNINITIALIZED_END
GITFAST_TARGET_END

GITFAST_TARGET_BEGIN("avx2")
namespace {
constexpr int64_t kVec256 = 16;  // int16 per ymm

int32_t hsum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// The loop is written in assembly: from the intrinsics, GCC 12 reloaded each weight vector once per
// row and copied all eight accumulators every iteration (37 instructions where 25 do), which held
// the tile to 55 GMAC/s in L1 on AMD Zen 3 against 70 for this loop (the bound there is about 72:
// VPMADDWD and VPADDD share three vector pipes). Registers: ymm8-9 q's rows, ymm10 one weight
// vector, ymm11-14 products; `padded` is a whole number of vectors.
void tile_avx2(const int16_t* const* a, const int16_t* const* b, int64_t padded, int32_t out[kRowsTile][kCols]) {
  static_assert(kRowsTile == 2 && kCols == 4, "the assembly below is a 2 x 4 tile");
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00, c13 = c00;
  const int64_t bytes = padded * static_cast<int64_t>(sizeof(int16_t));
  int64_t at = 0;
  if (bytes > 0)  // the loop tests at its end
  asm volatile(
      "1:\n\t"
      "vmovdqu (%[a0],%[at]), %%ymm8\n\t"
      "vmovdqu (%[a1],%[at]), %%ymm9\n\t"
      "vmovdqu (%[b0],%[at]), %%ymm10\n\t"
      "vpmaddwd %%ymm10, %%ymm8, %%ymm11\n\t"
      "vpmaddwd %%ymm10, %%ymm9, %%ymm12\n\t"
      "vpaddd %%ymm11, %[c00], %[c00]\n\t"
      "vpaddd %%ymm12, %[c10], %[c10]\n\t"
      "vmovdqu (%[b1],%[at]), %%ymm10\n\t"
      "vpmaddwd %%ymm10, %%ymm8, %%ymm13\n\t"
      "vpmaddwd %%ymm10, %%ymm9, %%ymm14\n\t"
      "vpaddd %%ymm13, %[c01], %[c01]\n\t"
      "vpaddd %%ymm14, %[c11], %[c11]\n\t"
      "vmovdqu (%[b2],%[at]), %%ymm10\n\t"
      "vpmaddwd %%ymm10, %%ymm8, %%ymm11\n\t"
      "vpmaddwd %%ymm10, %%ymm9, %%ymm12\n\t"
      "vpaddd %%ymm11, %[c02], %[c02]\n\t"
      "vpaddd %%ymm12, %[c12], %[c12]\n\t"
      "vmovdqu (%[b3],%[at]), %%ymm10\n\t"
      "vpmaddwd %%ymm10, %%ymm8, %%ymm13\n\t"
      "vpmaddwd %%ymm10, %%ymm9, %%ymm14\n\t"
      "vpaddd %%ymm13, %[c03], %[c03]\n\t"
      "vpaddd %%ymm14, %[c13], %[c13]\n\t"
      "add $32, %[at]\n\t"
      "cmp %[bytes], %[at]\n\t"
      "jb 1b\n\t"
      : [c00] "+x"(c00), [c01] "+x"(c01), [c02] "+x"(c02), [c03] "+x"(c03), [c10] "+x"(c10), [c11] "+x"(c11),
        [c12] "+x"(c12), [c13] "+x"(c13), [at] "+r"(at)
      : [a0] "r"(a[0]), [a1] "r"(a[1]), [b0] "r"(b[0]), [b1] "r"(b[1]), [b2] "r"(b[2]), [b3] "r"(b[3]),
        [bytes] "r"(bytes)
      : "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "memory", "cc");
  const __m256i acc[kRowsTile][kCols] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}};
  for (int r = 0; r < kRowsTile; ++r)
    for (int c = 0; c < kCols; ++c) out[r][c] = hsum(acc[r][c]);
}

// The same tile for a few rows of q (decode steps), reading the weights as int8 and widening them
// in registers: no per-call widened copy, whose writing and re-reading cost as much as the products
// when each weight is used for one or two rows. `k` is the real K: past its last whole vector the
// weights are read one by one (q's int16 rows are zero-padded, the weight rows are not).
void narrow_avx2(const int16_t* const* a, const int8_t* const* b, int64_t k, int32_t out[kRowsTile][kCols]) {
  __m256i acc[kRowsTile][kCols];
  for (int r = 0; r < kRowsTile; ++r)
    for (int c = 0; c < kCols; ++c) acc[r][c] = _mm256_setzero_si256();
  const int64_t whole = k / kVec256 * kVec256;
  for (int64_t i = 0; i < whole; i += kVec256) {
    __m256i x[kRowsTile];
    for (int r = 0; r < kRowsTile; ++r) x[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a[r] + i));
    for (int c = 0; c < kCols; ++c) {
      const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b[c] + i)));
      for (int r = 0; r < kRowsTile; ++r) acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(x[r], w));
    }
  }
  for (int r = 0; r < kRowsTile; ++r) {
    for (int c = 0; c < kCols; ++c) {
      int32_t s = hsum(acc[r][c]);
      for (int64_t i = whole; i < k; ++i) s += static_cast<int32_t>(a[r][i]) * b[c][i];
      out[r][c] = s;
    }
  }
}
}  // namespace
GITFAST_TARGET_END
#endif  // GITFAST_X86

namespace {

using TileFn = void (*)(const int16_t* const*, const int16_t* const*, int64_t, int32_t[kRowsTile][kCols]);
using NarrowFn = void (*)(const int16_t* const*, const int8_t* const*, int64_t, int32_t[kRowsTile][kCols]);

struct Int8Path {
  const char* name;
  TileFn tile;
  int64_t vec;       // int16 per vector: K is padded to a multiple of it
  NarrowFn narrow;   // up to kNarrowRows rows of q: int8 weights widened in registers (or null)
};

// Rows of q up to which the weights are widened in registers rather than into a buffer: AMD Zen 3,
// one thread, 768 -> 3072, each against fbgemm's dynamic INT8 Linear in the same run (the wide path
// with its assembly tile): 0.97 vs 1.32x its time at 2 rows, 1.19 vs 1.30x at 4, 1.37 vs 1.49x at
// 8, 1.60 vs 1.37x at 16.
constexpr int64_t kNarrowRows = 8;

const Int8Path& chosen_path() {
  static const Int8Path path = [] {
    const std::string isa = cpu_kernels::widest_isa();
#if GITFAST_X86
    // AVX-512 CPUs have AVX2: its narrow tile serves their few-row calls too
    if (isa == "avx512") return Int8Path{"avx512", &tile_avx512, kVec512, &narrow_avx2};
    if (isa == "avx2") return Int8Path{"avx2", &tile_avx2, kVec256, &narrow_avx2};
#endif
    return Int8Path{"generic", &tile_generic, 1, nullptr};
  }();
  return path;
}

}  // namespace

namespace cpu_kernels {

const char* int8_isa() { return chosen_path().name; }

void int8_mm(const at::Tensor& q, const at::Tensor& w, at::Tensor& out) {
  const Int8Path& path = chosen_path();
  const int64_t m = q.size(0), k = q.size(1), n = w.size(0);
  const int64_t padded = (k + path.vec - 1) / path.vec * path.vec;
  const int8_t* qp = q.const_data_ptr<int8_t>();
  const int8_t* wp = w.const_data_ptr<int8_t>();
  int32_t* op = out.mutable_data_ptr<int32_t>();

  // q widened once (whole register tiles of rows: zero rows complete the last one)
  const int64_t m_tiles = (m + kRowsTile - 1) / kRowsTile * kRowsTile;
  std::vector<int16_t> q16(static_cast<size_t>(m_tiles * padded));
  at::parallel_for(0, m_tiles, std::max<int64_t>(1, 32768 / padded), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (r < m) {
        widen(qp + r * k, q16.data() + r * padded, k, padded);
      } else {
        std::fill_n(q16.data() + r * padded, padded, int16_t{0});
      }
    }
  });
  const int64_t blocks = (n + kCols - 1) / kCols;
  if (m <= kNarrowRows && path.narrow != nullptr) {
    at::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / (k * kCols)), [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t c0 = blk * kCols, cols = std::min<int64_t>(kCols, n - c0);
        const int8_t* b[kCols];
        for (int c = 0; c < kCols; ++c) b[c] = wp + (c0 + std::min<int64_t>(c, cols - 1)) * k;  // past n: a repeat, dropped
        for (int64_t r = 0; r < m_tiles; r += kRowsTile) {
          const int16_t* a[kRowsTile];
          for (int i = 0; i < kRowsTile; ++i) a[i] = q16.data() + (r + i) * padded;
          int32_t tile[kRowsTile][kCols];
          path.narrow(a, b, k, tile);
          for (int i = 0; i < kRowsTile && r + i < m; ++i) {
            std::memcpy(op + (r + i) * n + c0, tile[i], static_cast<size_t>(cols) * sizeof(int32_t));
          }
        }
      }
    });
    return;
  }
  const int64_t rows_per_pass = std::max<int64_t>(kRowsTile, kQTileBytes / (2 * padded) / kRowsTile * kRowsTile);
  // a grain of a few weight blocks: a decode step's small GEMMs still use every thread
  at::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / (padded * kCols)), [&](int64_t begin, int64_t end) {
    std::vector<int16_t> w16(static_cast<size_t>(kCols * padded));
    const int16_t* b[kCols];
    for (int c = 0; c < kCols; ++c) b[c] = w16.data() + c * padded;
    // passes over q's rows outside, weight blocks inside: a pass's rows stay in L2 while this
    // thread's blocks stream by (each block is widened again per pass: 1/rows_per_pass of the work)
    for (int64_t r0 = 0; r0 < m_tiles; r0 += rows_per_pass) {
      const int64_t r1 = std::min(m_tiles, r0 + rows_per_pass);
      for (int64_t blk = begin; blk < end; ++blk) {
        const int64_t c0 = blk * kCols, cols = std::min<int64_t>(kCols, n - c0);
        for (int c = 0; c < kCols; ++c) {
          if (c < cols) {
            widen(wp + (c0 + c) * k, w16.data() + c * padded, k, padded);
          } else {
            std::fill_n(w16.data() + c * padded, padded, int16_t{0});
          }
        }
        for (int64_t r = r0; r < r1; r += kRowsTile) {
          const int16_t* a[kRowsTile];
          for (int i = 0; i < kRowsTile; ++i) a[i] = q16.data() + (r + i) * padded;
          int32_t tile[kRowsTile][kCols];
          path.tile(a, b, padded, tile);
          for (int i = 0; i < kRowsTile && r + i < m; ++i) {
            std::memcpy(op + (r + i) * n + c0, tile[i], static_cast<size_t>(cols) * sizeof(int32_t));
          }
        }
      }
    }
  });
}

}  // namespace cpu_kernels
}  // namespace gitfast
