// gitfast._C, CPU kernels of dynamic INT8's two passes around the int8 GEMM (gitfast/quantization.py):
// quantize_rows (activations -> int8 with one scale per row, i.e. per token), quantize_rows_u7 (the
// same to 0..127 with a scale and zero point per row, for int8_mm_u7_packed), dequantize_rows
// (the GEMM's int32 / fp32 accumulators -> act(acc * row scale * column scale + bias) in the output
// dtype) and requantize_rows_u7 (dequantize_rows then quantize_rows_u7 row by row: the next 7-bit
// layer's input without the [rows, width] float tensor between them). One pass over the data each,
// rows split over threads; fp32 arithmetic. Checks live in ../bindings.cpp.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>

#include "cpu/simd.h"
#include "ops.h"

namespace gitfast {
namespace {

// Rows per task: about 32k elements, as norm_act.cpp (a decode step's few rows run inline).
int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, 32768 / width); }

GITFAST_CLONES float max_abs(const float* v, int64_t n) {
  float m = 0.0f;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(v[i]));
  return m;
}

// q = round-half-even(v * inv): adding and removing 1.5 * 2^23 rounds |v * inv| <= 127 exactly as
// nearbyint does, without a libm call, so the loop vectorises.
GITFAST_CLONES void quantize_row(const float* v, float inv, int8_t* q, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) q[i] = static_cast<int8_t>(static_cast<int32_t>((v[i] * inv + 12582912.0f) - 12582912.0f));
}

// The loops below are written with ?: rather than std::min / std::max, which GCC 12 left scalar
// here (a branch per value: 13.5 ms for a 1576 x 3072 row pass where quantize_rows takes 4.1).
GITFAST_CLONES void min_max(const float* v, int64_t n, float& lo, float& hi) {
  float a = 0.0f, b = 0.0f;  // 0 is always representable: a row's padding and ReLU zeros stay exact
#pragma omp simd reduction(min : a) reduction(max : b)
  for (int64_t i = 0; i < n; ++i) {
    a = v[i] < a ? v[i] : a;
    b = v[i] > b ? v[i] : b;
  }
  lo = a;
  hi = b;
}

// q = clamp(round-half-even(v * inv) + z, 0, 127), rounded as quantize_row.
GITFAST_CLONES void quantize_row_u7(const float* v, float inv, float z, uint8_t* q, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float r = ((v[i] * inv + 12582912.0f) - 12582912.0f) + z;
    r = r < 0.0f ? 0.0f : r;
    r = r > 127.0f ? 127.0f : r;
    q[i] = static_cast<uint8_t>(static_cast<int32_t>(r));
  }
}

GITFAST_CLONES void scale_row(const int32_t* acc, float s, const float* col, float* y, int64_t n) {
  if (col != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = static_cast<float>(acc[i]) * s * col[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = static_cast<float>(acc[i]) * s;
  }
}

GITFAST_CLONES void scale_row(const float* acc, float s, const float* col, float* y, int64_t n) {
  if (col != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = acc[i] * s * col[i];
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] = acc[i] * s;
  }
}

// fn(r, row, n) for each row r of x ([..., n]) as fp32, rows split over threads: x's own memory for
// float32, a per-thread fp32 copy of the row for float16 / bfloat16.
template <typename Fn>
void for_each_row_f32(const at::Tensor& x, const Fn& fn) {
  const int64_t n = x.size(-1), rows = x.numel() / n;
  const at::ScalarType t = x.scalar_type();
  const char* xp = static_cast<const char*>(x.const_data_ptr());
  const int64_t row_bytes = n * static_cast<int64_t>(x.element_size());
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> buf(t == at::kFloat ? nullptr : new float[n]);
    for (int64_t r = begin; r < end; ++r) {
      const float* v = reinterpret_cast<const float*>(xp + r * row_bytes);
      if (t != at::kFloat) {
        cpu_kernels::row_to_f32(t, xp + r * row_bytes, buf.get(), n);
        v = buf.get();
      }
      fn(r, v, n);
    }
  });
}

// quantize_rows_u7's per-row step, shared by requantize_rows_u7: the row's range (widened to hold 0),
// its scale and zero point, then q.
class U7Rows {
 public:
  U7Rows(at::Tensor& q, at::Tensor& scale, at::Tensor& zero)
      : q_(q.mutable_data_ptr<uint8_t>()), scale_(scale.mutable_data_ptr<float>()), zero_(zero.mutable_data_ptr<int32_t>()) {}

  void row(int64_t r, const float* v, int64_t n) const {
    float lo, hi;
    min_max(v, n, lo, hi);
    const float span = hi - lo, inv = span > 0.0f ? 127.0f / span : 0.0f;
    const float z = (-lo * inv + 12582912.0f) - 12582912.0f;
    scale_[r] = span / 127.0f;
    zero_[r] = static_cast<int32_t>(z);
    quantize_row_u7(v, inv, z, q_ + r * n, n);
  }

 private:
  uint8_t* q_;
  float* scale_;
  int32_t* zero_;
};

// dequantize_rows' per-row step, shared by requantize_rows_u7: one fp32 row of
// act(acc * row scale * column scale + bias).
class Dequantizer {
 public:
  Dequantizer(const at::Tensor& acc, const at::Tensor& row_scale, const at::Tensor* col_scale, const at::Tensor* bias,
              int act)
      : n(acc.size(-1)), rows(acc.numel() / n), acc_(acc), rs_(row_scale.const_data_ptr<float>()),
        cs_(col_scale ? col_scale->const_data_ptr<float>() : nullptr), bias_(bias ? new float[n] : nullptr), act_(act) {
    if (bias) cpu_kernels::row_to_f32(bias->scalar_type(), bias->const_data_ptr(), bias_.get(), n);
  }

  void row(int64_t r, float* v) const {
    if (acc_.scalar_type() == at::kInt) {
      scale_row(acc_.const_data_ptr<int32_t>() + r * n, rs_[r], cs_, v, n);
    } else {
      scale_row(acc_.const_data_ptr<float>() + r * n, rs_[r], cs_, v, n);
    }
    if (act_ >= 0) {
      cpu_kernels::bias_act_row(v, bias_.get(), v, n, static_cast<Activation>(act_));
    } else if (bias_) {
      const float* b = bias_.get();
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) v[i] += b[i];
    }
  }

  const int64_t n, rows;

 private:
  const at::Tensor& acc_;
  const float* rs_;
  const float* cs_;
  std::unique_ptr<float[]> bias_;
  const int act_;
};

}  // namespace

namespace cpu_kernels {

void quantize_rows(const at::Tensor& x, at::Tensor& q, at::Tensor& scale) {
  int8_t* qp = q.mutable_data_ptr<int8_t>();
  float* sp = scale.mutable_data_ptr<float>();
  for_each_row_f32(x, [&](int64_t r, const float* v, int64_t n) {
    const float m = max_abs(v, n);
    sp[r] = m / 127.0f;
    quantize_row(v, m > 0.0f ? 127.0f / m : 0.0f, qp + r * n, n);
  });
}

void quantize_rows_u7(const at::Tensor& x, at::Tensor& q, at::Tensor& scale, at::Tensor& zero) {
  U7Rows out(q, scale, zero);
  for_each_row_f32(x, [&](int64_t r, const float* v, int64_t n) { out.row(r, v, n); });
}

void dequantize_rows(const at::Tensor& acc, const at::Tensor& row_scale, const at::Tensor* col_scale,
                     const at::Tensor* bias, int act, at::Tensor& y) {
  const Dequantizer dq(acc, row_scale, col_scale, bias, act);
  const at::ScalarType yt = y.scalar_type();
  char* yp = static_cast<char*>(y.mutable_data_ptr());
  const int64_t y_row_bytes = dq.n * static_cast<int64_t>(y.element_size());
  at::parallel_for(0, dq.rows, grain_rows(dq.n), [&](int64_t begin, int64_t end) {
    if (yt == at::kFloat) {  // straight into the output row: no scratch row to copy out
      for (int64_t r = begin; r < end; ++r) dq.row(r, reinterpret_cast<float*>(yp + r * y_row_bytes));
      return;
    }
    std::unique_ptr<float[]> buf(new float[dq.n]);
    for (int64_t r = begin; r < end; ++r) {
      dq.row(r, buf.get());
      row_from_f32(yt, buf.get(), yp + r * y_row_bytes, dq.n);
    }
  });
}

void requantize_rows_u7(const at::Tensor& acc, const at::Tensor& row_scale, const at::Tensor* col_scale,
                        const at::Tensor* bias, int act, at::ScalarType dtype, at::Tensor& q, at::Tensor& scale,
                        at::Tensor& zero) {
  const Dequantizer dq(acc, row_scale, col_scale, bias, act);
  U7Rows out(q, scale, zero);
  const int64_t n = dq.n;
  at::parallel_for(0, dq.rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> buf(new float[n]);
    // dequantize_rows' output in a narrower dtype is what quantize_rows_u7 would read back: round here too
    std::unique_ptr<uint16_t[]> narrow(dtype == at::kFloat ? nullptr : new uint16_t[n]);
    for (int64_t r = begin; r < end; ++r) {
      dq.row(r, buf.get());
      if (narrow) {
        row_from_f32(dtype, buf.get(), narrow.get(), n);
        row_to_f32(dtype, narrow.get(), buf.get(), n);
      }
      out.row(r, buf.get(), n);
    }
  });
}

}  // namespace cpu_kernels
}  // namespace gitfast
