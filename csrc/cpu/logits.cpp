// gitfast._C, CPU: bf16 activations x bf16 weights, fp32 accumulation: the LM head of bf16 models (fp32
// logits) and, with bf16 outputs, a bf16 model's Linear layers at one to four rows (decode steps).
//
// A bf16 model's logits are kept in fp32 (gitfast/ops.py, Logits: bf16 logits round to steps of
// 0.06-0.125 and their ties flip greedy choices). Products of two bf16 values are exact in fp32, so
// accumulating them in fp32 gives what an fp32 GEMM over the upcast tensors gives, up to summation
// order, while reading half the bytes: the head's weight (vocab x hidden, 47 MB at git-base) is read
// once per decode step, and that read is the step's largest.
//
// Weight layout (pack_bf16_cols): column tiles of 16 outputs, k in pairs, [tiles][K/2][16][2] bf16,
// zero-padded to a whole number of tile pairs and an even K. One 512-bit load then holds 16 columns x
// 2 k values: the operand of AVX512-BF16's VDPBF16PS, and two fp32 vectors after a shift and a mask
// on CPUs without it. Output tiles are split over threads; within one, rows of x go in chunks of up
// to 8, so a tile pair's weights (2 x 16 x K bf16: 48 KB at K = 768) are read from memory once and
// reused from cache by every chunk.
//
// Paths: "avx512bf16" (VDPBF16PS) where the CPU has it and GITFAST_CPU_ISA does not cap the kernels
// below avx512; otherwise portable C++ over the same layout (GCC clones it for AVX-512, AVX2 and
// baseline x86-64). Checks live in ../bindings.cpp.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/simd.h"
#include "ops.h"

namespace gitfast {
namespace {

constexpr int64_t kCols = 16;     // columns per tile
constexpr int64_t kTiles = 2;     // tiles per task unit (32 columns): two accumulator chains per row
constexpr int64_t kRowChunk = 8;  // rows of x per pass over a tile pair (16 accumulators)

// One row of pair_portable (the same sums in the same order): through the row loop below one row took
// 1.4-3x as long (AMD Zen 3, 3072 x 768: 160-200 against 107-121 us).
GITFAST_CLONES void pair_one_row(const float* xf, const uint32_t* w, int64_t kp, float* out) {
  float acc[kTiles * kCols] = {};
  for (int64_t t = 0; t < kTiles; ++t) {
    const uint32_t* wt = w + t * kp * kCols;
    float* a = acc + t * kCols;
    for (int64_t p = 0; p < kp; ++p) {
      const float x0 = xf[2 * p], x1 = xf[2 * p + 1];
      const uint32_t* wp = wt + p * kCols;
#pragma omp simd
      for (int64_t c = 0; c < kCols; ++c) {
        uint32_t lo = wp[c] << 16, hi = wp[c] & 0xFFFF0000u;
        float f0, f1;
        std::memcpy(&f0, &lo, sizeof f0);
        std::memcpy(&f1, &hi, sizeof f1);
        a[c] += x0 * f0 + x1 * f1;
      }
    }
  }
  std::copy(acc, acc + kTiles * kCols, out);
}

// out[r][c] for r < rows (<= kRowChunk), c < 32 of one tile pair, from x rows already widened to fp32
// (xf: rows x Kp). Each k pair of a tile is widened once for all rows (widening per row made 32 rows
// cost 1.55x the fp32 kernel's time on the same values, AMD Zen 3); every row's sums are the same
// expressions in the same order as one row alone.
GITFAST_CLONES void pair_portable(const float* xf, int64_t rows, const uint32_t* w, int64_t kp, float* out) {
  if (rows == 1) return pair_one_row(xf, w, kp, out);
  float acc[kRowChunk][kCols];
  for (int64_t t = 0; t < kTiles; ++t) {
    const uint32_t* wt = w + t * kp * kCols;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < kCols; ++c) acc[r][c] = 0.0f;
    for (int64_t p = 0; p < kp; ++p) {
      const uint32_t* wp = wt + p * kCols;
      float f0[kCols], f1[kCols];
#pragma omp simd
      for (int64_t c = 0; c < kCols; ++c) {
        uint32_t lo = wp[c] << 16, hi = wp[c] & 0xFFFF0000u;
        std::memcpy(&f0[c], &lo, sizeof(float));
        std::memcpy(&f1[c], &hi, sizeof(float));
      }
      for (int64_t r = 0; r < rows; ++r) {
        const float x0 = xf[r * 2 * kp + 2 * p], x1 = xf[r * 2 * kp + 2 * p + 1];
        float* a = acc[r];
#pragma omp simd
        for (int64_t c = 0; c < kCols; ++c) a[c] += x0 * f0[c] + x1 * f1[c];
      }
    }
    for (int64_t r = 0; r < rows; ++r) std::copy(acc[r], acc[r] + kCols, out + r * kTiles * kCols + t * kCols);
  }
}

}  // namespace

#if GITFAST_X86
GITFAST_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx512bf16")
namespace avx512bf16 {
namespace {

// R rows of x (bf16 pairs as 32-bit words: xw, row stride kp) against one tile pair.
template <int R>
void pair_rows(const uint32_t* xw, int64_t kp, const uint32_t* w, float* out) {
  __m512 acc[R][kTiles];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < kTiles; ++t) acc[r][t] = _mm512_setzero_ps();
  const uint32_t* w1 = w + kp * kCols;
  for (int64_t p = 0; p < kp; ++p) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(w + p * kCols);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(w1 + p * kCols);
    for (int r = 0; r < R; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(xw[r * kp + p]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < kTiles; ++t) _mm512_storeu_ps(out + r * kTiles * kCols + t * kCols, acc[r][t]);
}

void pair(const uint32_t* xw, int64_t rows, const uint32_t* w, int64_t kp, float* out) {
  switch (rows) {
    case 1: return pair_rows<1>(xw, kp, w, out);
    case 2: return pair_rows<2>(xw, kp, w, out);
    case 3: return pair_rows<3>(xw, kp, w, out);
    case 4: return pair_rows<4>(xw, kp, w, out);
    case 5: return pair_rows<5>(xw, kp, w, out);
    case 6: return pair_rows<6>(xw, kp, w, out);
    case 7: return pair_rows<7>(xw, kp, w, out);
    default: return pair_rows<8>(xw, kp, w, out);
  }
}

}  // namespace
}  // namespace avx512bf16
GITFAST_TARGET_END
#endif  // GITFAST_X86

namespace {

bool use_bf16_instructions() {
  static const bool yes = [] {
#if GITFAST_X86
    return std::strcmp(cpu_kernels::widest_isa(), "avx512") == 0 && GITFAST_CPU_SUPPORTS("avx512bf16");
#else
    return false;
#endif
  }();
  return yes;
}

}  // namespace

namespace cpu_kernels {

const char* logits_isa() { return use_bf16_instructions() ? "avx512bf16" : "portable"; }

void pack_bf16_cols(const at::Tensor& w, at::Tensor& packed) {
  const int64_t n = w.size(0), k = w.size(1), kp = packed.size(1), tiles = packed.size(0);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.const_data_ptr<c10::BFloat16>());
  uint16_t* dst = reinterpret_cast<uint16_t*>(packed.mutable_data_ptr<c10::BFloat16>());
  at::parallel_for(0, tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      uint16_t* tile = dst + t * kp * kCols * 2;
      for (int64_t p = 0; p < kp; ++p)
        for (int64_t c = 0; c < kCols; ++c)
          for (int64_t j = 0; j < 2; ++j) {
            const int64_t col = t * kCols + c, kk = 2 * p + j;
            tile[(p * kCols + c) * 2 + j] = (col < n && kk < k) ? src[col * k + kk] : uint16_t(0);
          }
    }
  });
}

void linear_bf16(const at::Tensor& x, const at::Tensor& packed, const at::Tensor* bias, at::Tensor& y) {
  const int64_t m = x.size(0), k = x.size(1), n = y.size(1), kp = packed.size(1);
  const int64_t units = packed.size(0) / kTiles;
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.const_data_ptr<c10::BFloat16>());
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(packed.const_data_ptr<c10::BFloat16>());
  const float* bp = bias ? bias->const_data_ptr<float>() : nullptr;
  float* yf = y.scalar_type() == at::kFloat ? y.mutable_data_ptr<float>() : nullptr;
  c10::BFloat16* yb = yf == nullptr ? y.mutable_data_ptr<c10::BFloat16>() : nullptr;
  const bool fast = use_bf16_instructions();
  // x once in the kernels' form: bf16 pairs as words, or widened to fp32 rows; zero-padded to an even K
  std::vector<uint32_t> xw(fast ? m * kp : 0);
  std::vector<float> xf(fast ? 0 : m * 2 * kp);
  for (int64_t r = 0; r < m; ++r) {
    if (fast) {
      std::memcpy(xw.data() + r * kp, xp + r * k, k * sizeof(uint16_t));  // little endian: k even low
    } else {
      cpu_kernels::row_to_f32(at::kBFloat16, xp + r * k, xf.data() + r * 2 * kp, k);
    }
  }
  // tile pairs per task: about 2048 (k pair x row) steps of work, at least one pair
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, kp * std::min<int64_t>(m, kRowChunk)));
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    float out[kRowChunk * kTiles * kCols];
    for (int64_t u = begin; u < end; ++u) {
      const uint32_t* w = wp + u * kTiles * kp * kCols;
      const int64_t col0 = u * kTiles * kCols, cols = std::min<int64_t>(kTiles * kCols, n - col0);
      for (int64_t r0 = 0; r0 < m; r0 += kRowChunk) {
        const int64_t rows = std::min<int64_t>(kRowChunk, m - r0);
#if GITFAST_X86
        if (fast) {
          avx512bf16::pair(xw.data() + r0 * kp, rows, w, kp, out);
        } else {
          pair_portable(xf.data() + r0 * 2 * kp, rows, w, kp, out);
        }
#else
        pair_portable(xf.data() + r0 * 2 * kp, rows, w, kp, out);
#endif
        for (int64_t r = 0; r < rows; ++r) {
          float* src = out + r * kTiles * kCols;
          if (bp != nullptr) {
            for (int64_t c = 0; c < cols; ++c) src[c] += bp[col0 + c];
          }
          if (yf != nullptr) {
            std::copy(src, src + cols, yf + (r0 + r) * n + col0);
          } else {
            cpu_kernels::row_from_f32(at::kBFloat16, src, yb + (r0 + r) * n + col0, cols);  // nearest even
          }
        }
      }
    }
  });
}

}  // namespace cpu_kernels
}  // namespace gitfast
