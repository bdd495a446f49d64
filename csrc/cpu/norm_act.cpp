// gitfast._C, CPU kernels of layer_norm / add_layer_norm and bias_act (mlp's fused middle pass).
// Schemas, input checks and the op entries live in ../bindings.cpp.
//
// CPU kernels work one row at a time, rows split over threads with at::parallel_for. Inner loops are
// plain float code (no libm calls, no data-dependent branches) marked `omp simd`, so -O3 vectorises
// them; on x86-64 Linux every hot function is compiled for AVX-512, AVX2+FMA and baseline SSE2
// (target_clones) and the loader picks the one the CPU supports, so one build is portable and fast.
// Arithmetic is fp32: half rows are converted to fp32 (F16C where the CPU has it) and rounded once
// on the way out.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

#include "cpu/simd.h"
#include "ops.h"

namespace gitfast {
namespace {

// Every op stages a row in fp32 (half rows are converted into per-task buffers, fp32 rows are
// used in place), runs fp32 loops over it, and converts back. Each loop is one simple pass over
// an L1-resident row, which GCC vectorises fully; the half conversions are passes of their own.

GITFAST_INLINE float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
GITFAST_INLINE uint32_t bits_from_f32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// ---- half <-> float conversions of a row, all rounding to nearest even like torch ----

GITFAST_CLONES void bf16_to_f32(const uint16_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = f32_from_bits(static_cast<uint32_t>(src[i]) << 16);
}

GITFAST_CLONES void f32_to_bf16(const float* src, uint16_t* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = bits_from_f32(src[i]);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    dst[i] = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);  // NaN stays NaN
  }
}

// IEEE half in integer and float arithmetic only, for CPUs without F16C.
GITFAST_CLONES void f16_to_f32_portable(const uint16_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t h = src[i];
    const uint32_t sign = (h & 0x8000u) << 16;
    const uint32_t em = h & 0x7fffu;                               // exponent and mantissa bits
    const float normal = f32_from_bits((em << 13) + 0x38000000u);  // rebias the exponent by 127 - 15
    const float inf_nan = f32_from_bits((em << 13) | 0x7f800000u);
    const float subnormal = static_cast<float>(static_cast<int32_t>(em)) * 5.9604644775390625e-8f;  // * 2^-24
    const float mag = em < 0x400u ? subnormal : (em >= 0x7c00u ? inf_nan : normal);
    dst[i] = f32_from_bits(sign | bits_from_f32(mag));
  }
}

GITFAST_CLONES void f32_to_f16_portable(const float* src, uint16_t* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = bits_from_f32(src[i]);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7fffffffu;
    // normal halves: drop 13 mantissa bits rounding to nearest even and rebias the exponent; a
    // carry out of the mantissa bumps the exponent, as it should
    const uint32_t normal = (a - 0x38000000u + 0xfffu + ((a >> 13) & 1u)) >> 13;
    // subnormal halves: adding 0.5 puts the 2^-24 grid on the float's last mantissa bit, so the
    // FPU's own rounding does the work; what lies above 0.5's bits is the half's mantissa
    const uint32_t subnormal = bits_from_f32(f32_from_bits(a) + 0.5f) - 0x3f000000u;
    const uint32_t mag = a > 0x7f800000u    ? 0x7e00u   // NaN
                         : a >= 0x477ff000u ? 0x7c00u   // >= 65520 rounds to inf
                         : a >= 0x38800000u ? normal    // >= 2^-14, the smallest normal half
                                            : subnormal;
    dst[i] = static_cast<uint16_t>(sign | mag);
  }
}

#if GITFAST_X86
// F16C does 8 conversions per instruction; the portable loops above take several times longer.
__attribute__((target("avx,f16c"))) void f16_to_f32_f16c(const uint16_t* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  }
  for (; i < n; ++i) dst[i] = _cvtsh_ss(src[i]);
}

__attribute__((target("avx,f16c"))) void f32_to_f16_f16c(const float* src, uint16_t* dst, int64_t n) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), kNearest));
  }
  for (; i < n; ++i) dst[i] = _cvtss_sh(src[i], kNearest);
}

bool cpu_has_f16c() {
  static const bool yes = GITFAST_CPU_SUPPORTS("avx") && GITFAST_CPU_SUPPORTS("f16c");
  return yes;
}
#endif

void f16_to_f32(const uint16_t* src, float* dst, int64_t n) {
#if GITFAST_X86
  if (cpu_has_f16c()) return f16_to_f32_f16c(src, dst, n);
#endif
  f16_to_f32_portable(src, dst, n);
}

void f32_to_f16(const float* src, uint16_t* dst, int64_t n) {
#if GITFAST_X86
  if (cpu_has_f16c()) return f32_to_f16_f16c(src, dst, n);
#endif
  f32_to_f16_portable(src, dst, n);
}

// Storage formats: the element type in memory and its row conversions.
struct F32 {
  using raw = float;
};
struct F16 {
  using raw = uint16_t;
  static void to_f32(const uint16_t* s, float* d, int64_t n) { f16_to_f32(s, d, n); }
  static void from_f32(const float* s, uint16_t* d, int64_t n) { f32_to_f16(s, d, n); }
};
struct BF16 {
  using raw = uint16_t;
  static void to_f32(const uint16_t* s, float* d, int64_t n) { bf16_to_f32(s, d, n); }
  static void from_f32(const float* s, uint16_t* d, int64_t n) { f32_to_bf16(s, d, n); }
};

// ---- fp32 row math ----

// e^x for x <= 0 (every use here): 2^n * e^r with n = round(x / ln2), r = x - n*ln2 (ln2 split in
// two, Cody-Waite, so r is exact) and e^r from the Cephes expf polynomial on |r| <= ln2/2 (about
// 1 ulp). Branch-free and libm-free so the loops around it vectorise.
GITFAST_INLINE float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;  // keeps 2^n a normal float; e^-87 is below every use's resolution
  const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // log2(e); 1.5*2^23 rounds to integer
  float r = x - n * 0.693359375f;                                  // ln2, high bits (exact product)
  r = r - n * -2.12194440e-4f;                                     // ln2, the rest
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// v * sigmoid(z), z = 1.702 v. With e = e^-|z| the exponential cannot overflow, and sigmoid(z) is
// 1/(1+e) for z >= 0 and e/(1+e) below: one division per element (the expensive instruction here).
GITFAST_INLINE float quick_gelu(float v) {
  const float z = 1.702f * v;
  const float e = exp_nonpositive(z < 0.0f ? z : -z);
  const float q = 1.0f / (1.0f + e);
  return v * (z < 0.0f ? e * q : q);
}

// Exact GELU, 0.5 v (1 + erf(v / sqrt 2)). erfc(a), a = |v| / sqrt 2, from Abramowitz & Stegun 7.1.26
// (|error| <= 1.5e-7, the same formula torch's own vectorised CPU erf uses); 1 + erf(v/sqrt2) is then
// erfc(a) for v < 0 and 2 - erfc(a) otherwise, which avoids the cancellation of 1 - (1 - erfc).
GITFAST_INLINE float gelu(float v) {
  const float a = (v < 0.0f ? -v : v) * 0.70710678f;  // 1/sqrt(2)
  const float t = 1.0f / (1.0f + 0.3275911f * a);
  float p = 1.061405429f;
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const float erfc_a = p * t * exp_nonpositive(-a * a);
  return 0.5f * v * (v < 0.0f ? erfc_a : 2.0f - erfc_a);
}

// out = a + b; returns the sum of out's elements (the LayerNorm mean's numerator, for free)
GITFAST_CLONES float add_sum_f32(const float* a, const float* b, float* out, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    out[i] = a[i] + b[i];
    sum += out[i];
  }
  return sum;
}

GITFAST_CLONES float sum_f32(const float* v, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += v[i];
  return sum;
}

// y = LayerNorm(v) * w + b given sum(v), with two-pass moments (the mean, then squared deviations
// from it: no cancellation); y may be v. A non-null `copy` receives v in the same last pass.
GITFAST_CLONES void layer_norm_f32(const float* v, float sum, const float* w, const float* b, float* y, float* copy,
                                   int64_t n, float eps) {
  const float mean = sum / static_cast<float>(n);
  float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
  for (int64_t i = 0; i < n; ++i) {
    const float d = v[i] - mean;
    sq += d * d;
  }
  const float rstd = 1.0f / std::sqrt(sq / static_cast<float>(n) + eps);
  if (copy == nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = (v[i] - mean) * rstd * w[i] + b[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      copy[i] = v[i];
      y[i] = (v[i] - mean) * rstd * w[i] + b[i];
    }
  }
}

// y = act(x + bias) (bias may be null); y may be x.
GITFAST_CLONES void bias_act_f32(const float* x, const float* bias, float* y, int64_t n, Activation act) {
  if (act == Activation::QuickGelu) {
    if (bias != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) y[i] = quick_gelu(x[i] + bias[i]);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) y[i] = quick_gelu(x[i]);
    }
  } else {
    if (bias != nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) y[i] = gelu(x[i] + bias[i]);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) y[i] = gelu(x[i]);
    }
  }
}

// ---- row loops per storage format (one parallel task = rows [begin, end)) ----

// Per-task fp32 scratch of `rows` rows of n floats.
struct Scratch {
  std::unique_ptr<float[]> mem;
  Scratch(int64_t rows, int64_t n) : mem(new float[rows * n]) {}
  float* row(int64_t i, int64_t n) const { return mem.get() + i * n; }
};

// summed = x + r rounded to the storage type, normed = LayerNorm(summed): the reference adds in
// the storage type and normalises that stored sum, and so do these.
void layer_norm_rows(F32, const float* x, const float* r, const float* w, const float* b, float* y, float* s,
                     int64_t n, float eps, int64_t begin, int64_t end) {
  if (r == nullptr) {
    for (int64_t row = begin; row < end; ++row) {
      layer_norm_f32(x + row * n, sum_f32(x + row * n, n), w, b, y + row * n, nullptr, n, eps);
    }
    return;
  }
  // x + r is staged in an L1-resident row and stored to s beside y in the last pass: s is written
  // once, never read back (0.28-0.30 -> 0.21-0.24 ms at 434 x 768 fp32 on one core)
  Scratch buf(1, n);
  float* t = buf.row(0, n);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t o = row * n;
    layer_norm_f32(t, add_sum_f32(x + o, r + o, t, n), w, b, y + o, s + o, n, eps);
  }
}

template <typename S>
void layer_norm_rows(S, const uint16_t* x, const uint16_t* r, const uint16_t* w, const uint16_t* b, uint16_t* y,
                     uint16_t* s, int64_t n, float eps, int64_t begin, int64_t end) {
  Scratch buf(4, n);
  float *wf = buf.row(0, n), *bf = buf.row(1, n), *v = buf.row(2, n), *t = buf.row(3, n);
  S::to_f32(w, wf, n);
  S::to_f32(b, bf, n);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t o = row * n;
    S::to_f32(x + o, v, n);
    if (r != nullptr) {
      S::to_f32(r + o, t, n);
      add_sum_f32(v, t, v, n);
      S::from_f32(v, s + o, n);
      S::to_f32(s + o, v, n);  // normalise the rounded sum
    }
    layer_norm_f32(v, sum_f32(v, n), wf, bf, v, nullptr, n, eps);
    S::from_f32(v, y + o, n);
  }
}

void bias_act_rows(F32, const float* x, const float* bias, float* y, int64_t n, Activation act, int64_t begin,
                   int64_t end) {
  for (int64_t row = begin; row < end; ++row) bias_act_f32(x + row * n, bias, y + row * n, n, act);
}

template <typename S>
void bias_act_rows(S, const uint16_t* x, const uint16_t* bias, uint16_t* y, int64_t n, Activation act,
                   int64_t begin, int64_t end) {
  Scratch buf(2, n);
  float *bf = buf.row(0, n), *v = buf.row(1, n);
  if (bias != nullptr) S::to_f32(bias, bf, n);
  for (int64_t row = begin; row < end; ++row) {
    S::to_f32(x + row * n, v, n);
    bias_act_f32(v, bias != nullptr ? bf : nullptr, v, n, act);
    S::from_f32(v, y + row * n, n);
  }
}

// Calls f with the storage tag (F32 / F16 / BF16) of a dtype already checked to be supported.
template <typename F>
void with_storage(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(F32{}); break;
    case at::kHalf: f(F16{}); break;
    case at::kBFloat16: f(BF16{}); break;
    default: TORCH_CHECK(false, "gitfast: unsupported dtype ", t);
  }
}

template <typename R>
const R* in(const at::Tensor& t) { return static_cast<const R*>(t.const_data_ptr()); }
template <typename R>
R* out(at::Tensor& t) { return static_cast<R*>(t.mutable_data_ptr()); }

// Rows per task: about 32k elements, enough work to amortise handing a chunk to a thread.
int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, 32768 / width); }

}  // namespace

namespace cpu_kernels {

void layer_norm(const char* /*op*/, const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
                const at::Tensor& bias, double eps, at::Tensor& y, at::Tensor* summed) {
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  with_storage(x.scalar_type(), [&](auto tag) {
    using R = typename decltype(tag)::raw;
    const R* xp = in<R>(x);
    const R* rp = residual ? in<R>(*residual) : nullptr;
    const R* wp = in<R>(weight);
    const R* bp = in<R>(bias);
    R* yp = out<R>(y);
    R* sp = summed ? out<R>(*summed) : nullptr;
    at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
      layer_norm_rows(tag, xp, rp, wp, bp, yp, sp, n, static_cast<float>(eps), begin, end);
    });
  });
}

void row_to_f32(at::ScalarType t, const void* src, float* dst, int64_t n) {
  switch (t) {
    case at::kFloat: std::memcpy(dst, src, n * sizeof(float)); break;
    case at::kHalf: f16_to_f32(static_cast<const uint16_t*>(src), dst, n); break;
    case at::kBFloat16: bf16_to_f32(static_cast<const uint16_t*>(src), dst, n); break;
    default: TORCH_CHECK(false, "gitfast: unsupported dtype ", t);
  }
}

void row_from_f32(at::ScalarType t, const float* src, void* dst, int64_t n) {
  switch (t) {
    case at::kFloat: std::memcpy(dst, src, n * sizeof(float)); break;
    case at::kHalf: f32_to_f16(src, static_cast<uint16_t*>(dst), n); break;
    case at::kBFloat16: f32_to_bf16(src, static_cast<uint16_t*>(dst), n); break;
    default: TORCH_CHECK(false, "gitfast: unsupported dtype ", t);
  }
}

void bias_act_row(const float* x, const float* bias, float* y, int64_t n, Activation act) {
  bias_act_f32(x, bias, y, n, act);
}

void bias_act(const at::Tensor& x, const std::optional<at::Tensor>& bias, Activation act, at::Tensor& y) {
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  with_storage(x.scalar_type(), [&](auto tag) {
    using R = typename decltype(tag)::raw;
    const R* xp = in<R>(x);
    const R* bp = bias ? in<R>(*bias) : nullptr;
    R* yp = out<R>(y);
    at::parallel_for(0, rows, grain_rows(n),
                     [&](int64_t begin, int64_t end) { bias_act_rows(tag, xp, bp, yp, n, act, begin, end); });
  });
}

}  // namespace cpu_kernels
}  // namespace gitfast
