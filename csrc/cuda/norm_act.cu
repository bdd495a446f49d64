// gitfast._C, CUDA kernels of layer_norm / add_layer_norm and bias_act (mlp's fused middle pass).
// Schemas, input checks and the op entries live in ../bindings.cpp. Built only with a CUDA toolkit
// and a CUDA build of torch.
//
// Layout: contiguous [rows, width] tensors, fp32 / fp16 / bf16, arithmetic in fp32. Memory moves in
// 16-byte packs where the width allows (8 halves or 4 floats per access), one element at a time
// otherwise (odd widths such as 80 or 1030 take the widest pack that divides them). Kernels run on
// the current stream, allocate nothing but their outputs (through the caching allocator) and never
// synchronise, so they record into CUDA graphs.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "ops.h"

namespace gitfast {
namespace {

constexpr int kMaxThreads = 512;

// A group of VEC elements moved as one access (16 bytes at most).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_pack(const T* p, int64_t pack_index) {
  return reinterpret_cast<const Pack<T, VEC>*>(p)[pack_index];
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, int64_t pack_index, const Pack<T, VEC>& v) {
  reinterpret_cast<Pack<T, VEC>*>(p)[pack_index] = v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block, returned to every thread. `red` is 33 floats of shared memory; the trailing
// barrier lets the next call reuse it.
__device__ __forceinline__ float block_sum(float v, float* red) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  v = warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float t = lane < warps ? red[lane] : 0.0f;
    t = warp_sum(t);
    if (lane == 0) red[32] = t;
  }
  __syncthreads();
  const float total = red[32];
  __syncthreads();
  return total;
}

// -- add + LayerNorm: one block per row ----------------------------------------------------------
// Pass 1 adds (rounding the sum to T, as the reference stores it), writes `summed` and keeps the
// rounded row in shared memory as fp32; pass 2 takes squared deviations from the mean (two-pass
// moments, no cancellation); pass 3 normalises from shared memory. Each thread touches the same
// packs in every pass.
template <typename T, int VEC>
__global__ void add_layer_norm_kernel(const T* __restrict__ x, const T* __restrict__ residual,
                                      const T* __restrict__ weight, const T* __restrict__ bias, T* __restrict__ y,
                                      T* __restrict__ summed, int64_t width, float eps) {
  extern __shared__ float row[];  // [VEC][packs]: element k of pack p at k * packs + p, so a warp's
                                  // accesses are consecutive (no bank conflicts)
  __shared__ float red[33];
  const int64_t offset = static_cast<int64_t>(blockIdx.x) * width;
  const int64_t packs = width / VEC;

  float sum = 0.0f;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack<T, VEC> xv = load_pack<T, VEC>(x + offset, p);
    if (residual != nullptr) {
      const Pack<T, VEC> rv = load_pack<T, VEC>(residual + offset, p);
      Pack<T, VEC> sv;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        sv.v[k] = static_cast<T>(static_cast<float>(xv.v[k]) + static_cast<float>(rv.v[k]));
        const float s = static_cast<float>(sv.v[k]);
        row[k * packs + p] = s;
        sum += s;
      }
      store_pack<T, VEC>(summed + offset, p, sv);
    } else {
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float s = static_cast<float>(xv.v[k]);
        row[k * packs + p] = s;
        sum += s;
      }
    }
  }
  const float mean = block_sum(sum, red) / static_cast<float>(width);

  float sq = 0.0f;
  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float d = row[k * packs + p] - mean;
      sq += d * d;
    }
  }
  const float rstd = rsqrtf(block_sum(sq, red) / static_cast<float>(width) + eps);

  for (int64_t p = threadIdx.x; p < packs; p += blockDim.x) {
    const Pack<T, VEC> wv = load_pack<T, VEC>(weight, p);
    const Pack<T, VEC> bv = load_pack<T, VEC>(bias, p);
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float v = (row[k * packs + p] - mean) * rstd;
      out.v[k] = static_cast<T>(v * static_cast<float>(wv.v[k]) + static_cast<float>(bv.v[k]));
    }
    store_pack<T, VEC>(y + offset, p, out);
  }
}

// -- bias + activation ---------------------------------------------------------------------------
// quick-GELU, v * sigmoid(1.702 v).
// fp32 follows transformers' `x * torch.sigmoid(1.702 * x)` step for step, with torch's CUDA sigmoid
// (1 / (1 + expf(-z)), precise expf): fp32 captions must equal transformers' token for token, and
// __expf's few-ulp error flips near-ties. exp(-z) overflowing to inf gives 1/inf = 0, as in torch.
// Half precision keeps the fast form (e = __expf(-|z|) <= 1: no overflow, one division): its
// rounding to T dwarfs __expf's error.
template <typename T>
__device__ __forceinline__ float quick_gelu(float v) {
  const float z = 1.702f * v;
  if constexpr (std::is_same_v<T, float>) {
    return v * (1.0f / (1.0f + expf(-z)));
  } else {
    const float e = __expf(-fabsf(z));
    const float q = 1.0f / (1.0f + e);
    return v * (z < 0.0f ? e * q : q);
  }
}

__device__ __forceinline__ float gelu(float v) {
  return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));  // 1/sqrt(2)
}

// Thread (column pack c) loads its bias pack once and walks rows blockIdx.y, +gridDim.y, ...
// In place (x == y) is fine: each element is read, then written, by the same thread.
template <typename T, int VEC, Activation A, bool HAS_BIAS>
__global__ void bias_act_kernel(const T* x, const T* __restrict__ bias, T* y, int64_t rows, int64_t packs_per_row) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= packs_per_row) return;
  Pack<T, VEC> bv;
  if (HAS_BIAS) bv = load_pack<T, VEC>(bias, c);
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const int64_t p = r * packs_per_row + c;
    const Pack<T, VEC> xv = load_pack<T, VEC>(x, p);
    Pack<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      float v = static_cast<float>(xv.v[k]);
      if (HAS_BIAS) v += static_cast<float>(bv.v[k]);
      out.v[k] = static_cast<T>(A == Activation::QuickGelu ? quick_gelu<T>(v) : gelu(v));
    }
    store_pack<T, VEC>(y, p, out);
  }
}

// -- launch helpers ------------------------------------------------------------------------------

// Widest pack (16, 8, ..., 1 elements; at most 16 bytes) that divides the width and to which every
// pointer is aligned; rows then start on pack boundaries too.
template <typename T>
int pick_vec(int64_t width, std::initializer_list<const void*> ptrs) {
  for (int vec = 16 / static_cast<int>(sizeof(T)); vec > 1; vec /= 2) {
    if (width % vec != 0) continue;
    const auto bytes = static_cast<uintptr_t>(vec * sizeof(T));
    bool aligned = true;
    for (const void* p : ptrs) aligned = aligned && (p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0);
    if (aligned) return vec;
  }
  return 1;
}

// Calls f(T{}, std::integral_constant<int, VEC>{}) for the runtime vec (a power of two <= 16/sizeof(T)).
template <typename T, typename F>
void with_vec(int vec, F&& f) {
  switch (vec) {
    case 8: if constexpr (16 / sizeof(T) >= 8) { f(std::integral_constant<int, 8>{}); return; } break;
    case 4: f(std::integral_constant<int, 4>{}); return;
    case 2: f(std::integral_constant<int, 2>{}); return;
    default: f(std::integral_constant<int, 1>{}); return;
  }
  TORCH_CHECK(false, "gitfast: internal error, pack of ", vec, " elements");
}

template <typename F>
void with_cuda_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "gitfast: unsupported dtype ", t);
  }
}

int multiprocessors(int device) {
  static int count[64] = {0};  // per device; a benign race writes the same value
  if (device < 0 || device >= 64) device = 0;
  if (count[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    count[device] = n;
  }
  return count[device];
}

// The CUDA LayerNorm caches a row of fp32 in shared memory, within the default 48 KiB per block.
constexpr int64_t kMaxLayerNormWidth = 8192;

}  // namespace

// -- kernels called by the op entries ------------------------------------------------------------

namespace cuda_kernels {

void layer_norm(const char* op, const at::Tensor& x, const at::Tensor* residual, const at::Tensor& weight,
                const at::Tensor& bias, double eps, at::Tensor& y, at::Tensor* summed) {
  const int64_t width = x.size(-1);
  TORCH_CHECK(width <= kMaxLayerNormWidth, "gitfast.", op, ": rows of ", width, " elements exceed the CUDA kernel's ",
              kMaxLayerNormWidth, "; use gitfast.ops.add_layer_norm, which falls back to torch for them");
  const int64_t rows = x.numel() / width;
  if (rows == 0) return;
  TORCH_CHECK(rows <= 0x7fffffff, "gitfast.", op, ": too many rows (", rows, ") for one launch");
  const at::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_cuda_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    const T* rp = residual ? residual->const_data_ptr<T>() : nullptr;
    const T* wp = weight.const_data_ptr<T>();
    const T* bp = bias.const_data_ptr<T>();
    T* yp = y.mutable_data_ptr<T>();
    T* sp = summed ? summed->mutable_data_ptr<T>() : nullptr;
    const int vec = pick_vec<T>(width, {xp, rp, wp, bp, yp, sp});
    with_vec<T>(vec, [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      const int64_t packs = width / VEC;
      const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, (packs + 31) / 32 * 32));
      const size_t smem = static_cast<size_t>(width) * sizeof(float);
      add_layer_norm_kernel<T, VEC><<<static_cast<unsigned>(rows), threads, smem, stream>>>(
          xp, rp, wp, bp, yp, sp, width, static_cast<float>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void bias_act(const at::Tensor& x, const std::optional<at::Tensor>& bias, Activation act, at::Tensor& y) {
  const int64_t width = x.size(-1);
  const int64_t rows = x.numel() / width;
  if (rows == 0) return;
  const at::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = multiprocessors(x.get_device());
  with_cuda_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.const_data_ptr<T>();
    const T* bp = bias ? bias->const_data_ptr<T>() : nullptr;
    T* yp = y.mutable_data_ptr<T>();
    const int vec = pick_vec<T>(width, {xp, bp, yp});
    with_vec<T>(vec, [&](auto v) {
      constexpr int VEC = decltype(v)::value;
      const int64_t packs = width / VEC;
      const int threads = static_cast<int>(std::min<int64_t>(256, (packs + 31) / 32 * 32));
      const int64_t col_blocks = (packs + threads - 1) / threads;
      // enough blocks for ~8 per SM; each strides over the rows
      const int64_t row_blocks = std::max<int64_t>(1, std::min<int64_t>({rows, 65535, sms * 8 / col_blocks + 1}));
      const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(row_blocks));
      auto launch = [&](auto kernel) {
        kernel<<<grid, threads, 0, stream>>>(xp, bp, yp, rows, packs);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (act == Activation::QuickGelu) {
        bp ? launch(bias_act_kernel<T, VEC, Activation::QuickGelu, true>)
           : launch(bias_act_kernel<T, VEC, Activation::QuickGelu, false>);
      } else {
        bp ? launch(bias_act_kernel<T, VEC, Activation::Gelu, true>)
           : launch(bias_act_kernel<T, VEC, Activation::Gelu, false>);
      }
    });
  });
}

}  // namespace cuda_kernels
}  // namespace gitfast
