// gitfast._C, CPU: fp32 Linear layers at few rows (decode steps), y = act(x @ w^T + bias).
//
// Why: a decode step of B sequences runs every Linear on B rows, so it reads each weight once per
// step and the weight read is the step's cost. MKL's sgemm reads the weights at about its memory
// bandwidth at one row (a GEMV) but at half or less from two rows up (bench/RESULTS.md, 2026-12-07).
// Here every row of x is multiplied with a weight tile while the tile is in cache: the weight is
// read from memory once per call, whatever the row count, and the kernel stays at the one-row speed
// until the FMAs, not the reads, are the limit.
//
// Layout: x [M, K] and w [N, K] as nn.Linear stores them (no packed copy: the fp32 weights of
// git-base's decoder and head are 260 MB, and a second copy would double them). A tile is kCols
// weight rows (output columns) x up to kRows rows of x; threads split the output columns, each
// thread a contiguous run of weight rows, so its reads are one stream. Bias and the activation run
// over each thread's output columns, per row, after its tiles (norm_act.cpp's bias_act_row).
//
// Summation order: per output, W lanes of k (8 AVX2, 16 AVX-512) summed horizontally at the end;
// MKL's order differs, so results agree to fp32 rounding, not bitwise.
// ISA: widest_isa() of attention.cpp (avx512 | avx2 | generic, capped by GITFAST_CPU_ISA).
// Checks live in ../bindings.cpp.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "cpu/simd.h"
#include "ops.h"

namespace gitfast {
namespace {
constexpr int kCols = 4;          // weight rows (output columns) per tile
constexpr int kMaxRows = 4;       // the most rows of x any ISA's tile takes

}  // namespace

#if GITFAST_X86
GITFAST_TARGET_BEGIN("avx512f,avx2,fma")
GITFAST_QUIET_UNINITIALIZED_BEGIN
namespace avx512 {
namespace {
struct Vec {
  static constexpr int W = 16, kRegs = 32;
  __m512 x;
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.x, b.x, c.x)}; }
  float hsum() const { return _mm512_reduce_add_ps(x); }
};
#define GITFAST_TILE_ATTR
#include "linear_fp32_tile.h"
#undef GITFAST_TILE_ATTR
}  // namespace
}  // namespace avx512
GITFAST_QUIET_UNINITIALIZED_END
GITFAST_TARGET_END

GITFAST_TARGET_BEGIN("avx2,fma")
namespace avx2 {
namespace {
struct Vec {
  static constexpr int W = 8, kRegs = 16;
  __m256 x;
  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.x, b.x, c.x)}; }
  float hsum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
};
#define GITFAST_TILE_ATTR
#include "linear_fp32_tile.h"
#undef GITFAST_TILE_ATTR
}  // namespace
}  // namespace avx2
GITFAST_TARGET_END
#endif  // GITFAST_X86

// Portable C++ (any CPU): arrays of 8 floats, multiply then add (no fused FMA to rely on); GCC clones
// it per x86 level (simd.h), other compilers vectorise it for the build's baseline.
namespace generic {
namespace {
struct Vec {
  static constexpr int W = 8, kRegs = 16;
  float x[W];
  static Vec zero() { return Vec{}; }
  static Vec load(const float* p) {
    Vec r;
    std::memcpy(r.x, p, sizeof(r.x));
    return r;
  }
  static Vec fma(Vec a, Vec b, Vec c) {
    for (int i = 0; i < W; ++i) c.x[i] += a.x[i] * b.x[i];
    return c;
  }
  float hsum() const {
    float s = 0.0f;
    for (float v : x) s += v;
    return s;
  }
};
#define GITFAST_TILE_ATTR GITFAST_CLONES
#include "linear_fp32_tile.h"
#undef GITFAST_TILE_ATTR
}  // namespace
}  // namespace generic

namespace {

using TileFn = void (*)(const float* const*, int, const float* const*, int64_t, const float* const*, int, float*);

struct Fp32Path {
  const char* name;
  TileFn tile;
  int rows;  // rows of x per tile
};

const Fp32Path& chosen_path() {
  static const Fp32Path path = [] {
    const std::string isa = cpu_kernels::widest_isa();
#if GITFAST_X86
    if (isa == "avx512") return Fp32Path{"avx512", &avx512::tile, avx512::kRows};
    if (isa == "avx2") return Fp32Path{"avx2", &avx2::tile, avx2::kRows};
#endif
    return Fp32Path{"generic", &generic::tile, generic::kRows};
  }();
  return path;
}

// y[r, c0:c1] = act(y[r, c0:c1] + bias[c0:c1]) for every row r; act < 0: none
void epilogue(float* y, int64_t m, int64_t n, const float* bias, int act, int64_t c0, int64_t c1) {
  for (int64_t r = 0; r < m; ++r) {
    float* row = y + r * n + c0;
    if (act >= 0) {
      cpu_kernels::bias_act_row(row, bias != nullptr ? bias + c0 : nullptr, row, c1 - c0, static_cast<Activation>(act));
    } else if (bias != nullptr) {
      for (int64_t c = 0; c < c1 - c0; ++c) row[c] += bias[c0 + c];
    }
  }
}

}  // namespace

namespace cpu_kernels {

const char* linear_fp32_isa() { return chosen_path().name; }

void linear_fp32(const at::Tensor& x, const at::Tensor& w, const at::Tensor* bias, int act, at::Tensor& y) {
  const Fp32Path& path = chosen_path();
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  const float* bp = bias != nullptr ? bias->const_data_ptr<float>() : nullptr;
  float* yp = y.mutable_data_ptr<float>();
  const int64_t blocks = (n + kCols - 1) / kCols;
  // blocks per task: at least about 64 KB of weights, so a decode step's small layers still split
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, k * kCols));
  // the next tile's rows fetched per pass over x's row tiles: spread over the first passes, one each
  // from kCols passes up
  const int64_t passes = std::max<int64_t>(1, (m + path.rows - 1) / path.rows);
  const int fetch_per_pass = static_cast<int>(std::min<int64_t>(kCols, (kCols + passes - 1) / passes));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    float out[kMaxRows * kCols];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * kCols, cols = std::min<int64_t>(kCols, n - c0);
      const float* wr[kCols];
      for (int c = 0; c < kCols; ++c) wr[c] = wp + (c0 + std::min<int64_t>(c, cols - 1)) * k;  // past n: a repeat, dropped
      const float* next[kCols];  // the next tile's weight rows (past the weight's end: hints, harmless)
      for (int c = 0; c < kCols; ++c) next[c] = wp + (c0 + kCols + c) * k;
      int fetched = 0;
      for (int64_t r0 = 0; r0 < m; r0 += path.rows) {
        const int rows = static_cast<int>(std::min<int64_t>(path.rows, m - r0));
        const float* xr[kMaxRows];
        for (int i = 0; i < rows; ++i) xr[i] = xp + (r0 + i) * k;
        // this pass's share of the next tile's rows: all that are left in the last pass
        const int npf = r0 + rows >= m ? kCols - fetched : std::min(kCols - fetched, fetch_per_pass);
        path.tile(xr, rows, wr, k, next + fetched, npf, out);
        fetched += npf;
        for (int i = 0; i < rows; ++i) std::memcpy(yp + (r0 + i) * n + c0, out + i * kCols, cols * sizeof(float));
      }
    }
    epilogue(yp, m, n, bp, act, begin * kCols, std::min(n, end * kCols));
  });
}

}  // namespace cpu_kernels
}  // namespace gitfast
