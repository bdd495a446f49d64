// gitfast._C, CPU attention with GIT's mask: git_attention (varlen, packed [N, H, D]) and paged
// decode / prefill over a block-table KV cache [num_blocks, block_size, H, D]. The contracts are
// kernels/api.py's (Triton) and kernels/reference.py's: per sequence, key j is visible to the
// query at absolute position i iff j < min(max(P, i + 1), L), P = the image-token count clamped to
// [0, L]. Checks live in ../bindings.cpp.
//
// Work item = (sequence, head), items split over threads (at::parallel_for). An item packs its L
// keys transposed (Kt [Dp][Lp]) and its values (V [Lp][Dp]) into fp32 scratch, which does the
// block-table gather, the bf16/fp16 -> fp32 conversion and the zero padding once; then blocks of
// query rows run attention_block.h: scores by FMA over the head dim into key tiles of 32, online
// softmax in base 2, o += p V. A decode item (one query that sees every key) runs attend_rows
// instead: a dot product per key, one softmax pass, o = sum p V, over rows read where they lie in the
// cache (fp32, or bf16 widened in registers: 1.5-1.9x packing them first, at git-base's decode shapes);
// fp16 rows, or a head dim off the vector width, are converted into fp32 scratch rows first. fp32
// throughout, one rounding to the output dtype. write_kv_cache stores new K/V rows into their cache
// slots.
//
// The block kernel is compiled for AVX-512, AVX2+FMA and portable C++; the CPU (or
// GITFAST_CPU_ISA=avx512|avx2|generic, read once at the first call) picks one at run time.

#include <ATen/Parallel.h>
#include <c10/util/StringUtil.h>

#include <atomic>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/simd.h"
#include "ops.h"


namespace gitfast {
namespace {

constexpr int kTile = 32;        // keys per tile: a multiple of every ISA's vector width
constexpr int kMaxHeadDim = 256;  // bindings refuse wider heads (register/scratch sizing)
constexpr int kPadDim = 16;       // head dims are zero-padded to a multiple of this (every W divides it)
constexpr int kMaxRows = 4;       // the most query rows any ISA's block takes
constexpr int kMaxFullRows = 8;   // the most query rows any ISA's all-keys block takes (attend_full)

}  // namespace

// ---- the block kernel, once per ISA ----------------------------------------------------------

#if GITFAST_X86
GITFAST_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
GITFAST_QUIET_UNINITIALIZED_BEGIN
namespace avx512 {
namespace {
struct Vec {
  static constexpr int W = 16, kRegs = 32;
  __m512 x;
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec load(const uint16_t* bf16) {  // 16 bf16 values widened (exactly) to fp32
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(bf16)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, x); }
  static Vec broadcast(float f) { return {_mm512_set1_ps(f)}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm512_fmadd_ps(a.x, b.x, c.x)}; }
  static Vec mul(Vec a, Vec b) { return {_mm512_mul_ps(a.x, b.x)}; }
  static Vec add(Vec a, Vec b) { return {_mm512_add_ps(a.x, b.x)}; }
  static Vec sub(Vec a, Vec b) { return {_mm512_sub_ps(a.x, b.x)}; }
  static Vec max(Vec a, Vec b) { return {_mm512_max_ps(a.x, b.x)}; }
  float hmax() const { return _mm512_reduce_max_ps(x); }
  float hsum() const { return _mm512_reduce_add_ps(x); }
  // lanes >= valid become -inf
  static Vec mask_from(Vec s, int valid) {
    if (valid >= W) return s;
    const __mmask16 keep = valid <= 0 ? 0 : static_cast<__mmask16>((1u << valid) - 1u);
    return {_mm512_mask_blend_ps(keep, _mm512_set1_ps(-std::numeric_limits<float>::infinity()), s.x)};
  }
  // 2^x for x <= 0 (-inf -> 0): 2^n * 2^f, n = round(x), |f| <= 1/2, 2^f by its degree-6 Taylor
  // polynomial (relative error ~1e-7); scalef applies 2^n and flushes x < -150 to 0.
  static Vec exp2(Vec v) {
    const __m512 x = _mm512_max_ps(v.x, _mm512_set1_ps(-160.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.5403530e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));  // ln 2
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return {_mm512_scalef_ps(p, n)};
  }
};
#include "attention_block.h"
}  // namespace
}  // namespace avx512
GITFAST_QUIET_UNINITIALIZED_END
GITFAST_TARGET_END

GITFAST_TARGET_BEGIN("avx2,fma,f16c")
namespace avx2 {
namespace {
struct Vec {
  static constexpr int W = 8, kRegs = 16;
  __m256 x;
  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec load(const uint16_t* bf16) {  // 8 bf16 values widened (exactly) to fp32
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bf16)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
  }
  void store(float* p) const { _mm256_storeu_ps(p, x); }
  static Vec broadcast(float f) { return {_mm256_set1_ps(f)}; }
  static Vec fma(Vec a, Vec b, Vec c) { return {_mm256_fmadd_ps(a.x, b.x, c.x)}; }
  static Vec mul(Vec a, Vec b) { return {_mm256_mul_ps(a.x, b.x)}; }
  static Vec add(Vec a, Vec b) { return {_mm256_add_ps(a.x, b.x)}; }
  static Vec sub(Vec a, Vec b) { return {_mm256_sub_ps(a.x, b.x)}; }
  static Vec max(Vec a, Vec b) { return {_mm256_max_ps(a.x, b.x)}; }
  float hmax() const {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
  }
  float hsum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  static Vec mask_from(Vec s, int valid) {
    if (valid >= W) return s;
    const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 keep = _mm256_cmp_ps(lane, _mm256_set1_ps(static_cast<float>(valid)), _CMP_LT_OQ);
    return {_mm256_blendv_ps(_mm256_set1_ps(-std::numeric_limits<float>::infinity()), s.x, keep)};
  }
  // as avx512's; 2^n built in the exponent bits, lanes below -126 (masked keys among them) -> 0
  static Vec exp2(Vec v) {
    const __m256 x = _mm256_max_ps(v.x, _mm256_set1_ps(-126.0f));
    const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(x, n);
    __m256 p = _mm256_set1_ps(1.5403530e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504109e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022651e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718e-1f));  // ln 2
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    return {_mm256_and_ps(r, _mm256_cmp_ps(v.x, _mm256_set1_ps(-126.0f), _CMP_GE_OQ))};
  }
};
#include "attention_block.h"
}  // namespace
}  // namespace avx2
GITFAST_TARGET_END
#endif  // GITFAST_X86

// Portable C++ (any CPU): arrays of 8 floats the compiler vectorises for the build's baseline.
namespace generic {
namespace {
struct Vec {
  static constexpr int W = 8, kRegs = 16;
  float x[W];
  static Vec zero() { return broadcast(0.0f); }
  static Vec load(const float* p) {
    Vec r;
    std::memcpy(r.x, p, sizeof(r.x));
    return r;
  }
  static Vec load(const uint16_t* bf16) {
    Vec r;
    for (int i = 0; i < W; ++i) {
      const uint32_t u = static_cast<uint32_t>(bf16[i]) << 16;
      std::memcpy(&r.x[i], &u, sizeof(float));
    }
    return r;
  }
  void store(float* p) const { std::memcpy(p, x, sizeof(x)); }
  static Vec broadcast(float f) {
    Vec r;
    for (float& v : r.x) v = f;
    return r;
  }
  template <typename F>
  static Vec map(Vec a, Vec b, F f) {
    Vec r;
    for (int i = 0; i < W; ++i) r.x[i] = f(a.x[i], b.x[i]);
    return r;
  }
  static Vec fma(Vec a, Vec b, Vec c) {
    Vec r;
    for (int i = 0; i < W; ++i) r.x[i] = std::fma(a.x[i], b.x[i], c.x[i]);
    return r;
  }
  static Vec mul(Vec a, Vec b) { return map(a, b, [](float u, float v) { return u * v; }); }
  static Vec add(Vec a, Vec b) { return map(a, b, [](float u, float v) { return u + v; }); }
  static Vec sub(Vec a, Vec b) { return map(a, b, [](float u, float v) { return u - v; }); }
  static Vec max(Vec a, Vec b) { return map(a, b, [](float u, float v) { return u > v ? u : v; }); }
  float hmax() const { return *std::max_element(x, x + W); }
  float hsum() const {
    float s = 0.0f;
    for (float v : x) s += v;
    return s;
  }
  static Vec mask_from(Vec s, int valid) {
    for (int i = std::max(valid, 0); i < W; ++i) s.x[i] = -std::numeric_limits<float>::infinity();
    return s;
  }
  static Vec exp2(Vec v) {
    for (float& e : v.x) e = std::exp2(e);
    return v;
  }
};
#include "attention_block.h"
}  // namespace
}  // namespace generic

namespace {

// ---- ISA choice ------------------------------------------------------------------------------

using BlockFn = void (*)(const float*, const float*, const float*, const int*, int, int64_t, int, float*);
using FullFn = void (*)(const float*, const float*, const float*, int64_t, int64_t, int64_t, float*, float*);
using RowsF32Fn = void (*)(const float* const*, const float* const*, const float*, int64_t, int, float*, float*);
using RowsBf16Fn = void (*)(const uint16_t* const*, const uint16_t* const*, const float*, int64_t, int, float*, float*);
template <typename T>
using HeadsFn = void (*)(const T* const*, const T* const*, int64_t, int, const float*, int64_t, int64_t, int, float*,
                         int64_t, float*, float*);

struct Isa {
  const char* name;
  BlockFn block;
  RowsF32Fn rows_f32;    // a decode item: fp32 rows, in the cache or packed
  RowsBf16Fn rows_bf16;  // a decode item: bf16 rows, in the cache
  HeadsFn<float> heads_f32;       // a decode step's heads of one sequence at once: fp32 rows in the cache
  HeadsFn<uint16_t> heads_bf16;   // the same over bf16 rows
  FullFn full;           // a block of queries that see every key (all image tokens)
  int width;  // floats per vector
  int rows;   // query rows per block
  int full_rows;  // query rows per attend_full block
};

// The ISAs this CPU runs, widest first, capped by GITFAST_CPU_ISA (avx512 | avx2 | generic); read once.
const std::vector<const Isa*>& fit_isas() {
  static const Isa portable{"generic", &generic::attend_block, &generic::attend_rows_f32,
                            &generic::attend_rows_bf16, &generic::attend_heads_f32, &generic::attend_heads_bf16,
                            &generic::attend_full, generic::Vec::W, generic::kRows, generic::kFullRows};
#if GITFAST_X86
  static const Isa v4{"avx512", &avx512::attend_block, &avx512::attend_rows_f32,
                      &avx512::attend_rows_bf16, &avx512::attend_heads_f32, &avx512::attend_heads_bf16,
                      &avx512::attend_full, avx512::Vec::W, avx512::kRows, avx512::kFullRows};
  static const Isa v3{"avx2", &avx2::attend_block, &avx2::attend_rows_f32, &avx2::attend_rows_bf16,
                      &avx2::attend_heads_f32, &avx2::attend_heads_bf16, &avx2::attend_full, avx2::Vec::W,
                      avx2::kRows, avx2::kFullRows};
#endif
  static const std::vector<const Isa*> fit = [] {
    std::vector<const Isa*> out;
#if GITFAST_X86
    const bool has512 = GITFAST_CPU_SUPPORTS("avx512f") && GITFAST_CPU_SUPPORTS("avx512bw") &&
                        GITFAST_CPU_SUPPORTS("avx512vl") && GITFAST_CPU_SUPPORTS("avx512dq");
    const bool has2 = GITFAST_CPU_SUPPORTS("avx2") && GITFAST_CPU_SUPPORTS("fma");
    const char* env = std::getenv("GITFAST_CPU_ISA");
    const std::string want = env ? env : "";
    TORCH_CHECK(want.empty() || want == "avx512" || want == "avx2" || want == "generic",
                "gitfast: GITFAST_CPU_ISA=", want, " is not one of avx512, avx2, generic");
    if (has512 && (want.empty() || want == "avx512")) out.push_back(&v4);
    if (has2 && want != "generic") out.push_back(&v3);
#endif
    out.push_back(&portable);
    return out;
  }();
  return fit;
}

// The ISA the attention kernels run: the widest fit one until set_cpu_isa picks another (gitfast's
// Python side measures them: gitfast/cpu_attention.py). Atomic: a switch may race a running call,
// which then finishes on either ISA (each gives the same results within fp32 rounding).
std::atomic<const Isa*> current_isa{nullptr};

const Isa& chosen_isa() {
  const Isa* isa = current_isa.load(std::memory_order_relaxed);
  return isa != nullptr ? *isa : *fit_isas().front();
}

// ---- packing ---------------------------------------------------------------------------------

GITFAST_INLINE float to_f32(float v) { return v; }
GITFAST_INLINE float to_f32(c10::BFloat16 v) { return static_cast<float>(v); }
GITFAST_INLINE float to_f32(c10::Half v) { return static_cast<float>(v); }

// The queries' scale folded with log2(e): scores come out in base 2, exp(x) = 2^(x log2 e).
GITFAST_INLINE float base2_scale(float sm_scale) { return sm_scale * 1.44269504088896f; }

// Whether a decode query reads its key and value rows where they lie in the cache (fp32, or bf16 widened
// in registers): rows a whole number of vectors wide. Others are converted into fp32 scratch rows first.
template <typename T>
bool rows_in_place(const Isa& isa, int64_t D) {
  return (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) && D % isa.width == 0;
}

// Where token j of one (sequence, head) lives: contiguous rows, or through a block table.
template <typename T>
struct Rows {
  const T* base;             // token 0's row (sequence start + head offset) or block 0's head offset
  int64_t token_stride;      // elements between consecutive tokens (within a block)
  const int32_t* table;      // block table row, or null for contiguous rows
  int64_t block_stride;      // elements between blocks
  int64_t block_size;
  const T* row(int64_t j) const {
    if (table == nullptr) return base + j * token_stride;
    return base + table[j / block_size] * block_stride + (j % block_size) * token_stride;
  }
};

struct Scratch {
  std::vector<float> kt, v, q, o, s;
  std::vector<int> lim;
  std::vector<const void*> krows, vrows;  // a decode item's key and value rows
  int64_t max_lp, dp;
  Scratch(int64_t max_lp, int64_t dp)
      : q(kMaxRows * dp), o(kMaxRows * dp), s(max_lp), lim(kMaxRows), krows(max_lp), vrows(max_lp), max_lp(max_lp),
        dp(dp) {}
  // fp32 room for packed keys and values, made on first need: a decode step reading the cache rows in
  // place needs none
  void need_packing() {
    if (kt.empty()) {
      kt.resize(max_lp * dp);
      v.resize(max_lp * dp);
    }
  }
  // room for an all-keys item (attend_all_keys): all its query rows (up to max_lp, rounded up to a block
  // of kMaxFullRows) and a block's output and whole score rows, made on first need, so decode steps and
  // masked blocks keep their smaller scratch
  void need_full_rows() {
    if (s.size() < static_cast<size_t>(kMaxFullRows * max_lp)) {
      q.resize((max_lp + kMaxFullRows) * dp);
      o.resize(kMaxFullRows * dp);
      s.resize(kMaxFullRows * max_lp);
    }
  }
};

// Query rows i0 .. i0 + nr - 1 into the block's scratch: fp32, pre-scaled, zero past D and past nr rows.
template <typename T>
void load_query_rows(Scratch& sc, const T* q, int64_t q_stride, int64_t i0, int nr, int64_t D, int64_t Dp,
                     float qscale) {
  std::fill(sc.q.begin(), sc.q.begin() + kMaxRows * Dp, 0.0f);
  for (int r = 0; r < nr; ++r) {
    const T* qr = q + (i0 + r) * q_stride;
    for (int64_t d = 0; d < D; ++d) sc.q[r * Dp + d] = to_f32(qr[d]) * qscale;
  }
}

// The block's nr output rows from scratch into rows i0.. of out, in out's dtype.
template <typename T>
void store_rows(const Scratch& sc, T* out, int64_t out_stride, int64_t i0, int nr, int64_t D, int64_t Dp) {
  for (int r = 0; r < nr; ++r) {
    T* orow = out + (i0 + r) * out_stride;
    for (int64_t d = 0; d < D; ++d) orow[d] = static_cast<T>(sc.o[r * Dp + d]);
  }
}

// A hint to fetch one row (`bytes` from `p`) ahead of its use: one head's rows lie a token apart (3 x
// hidden values in a fused projection's output), a stride the hardware prefetchers do not follow in time,
// and packing otherwise waits on every row (perf, git-base's vision attention, one thread: the packing
// took a quarter of the op's time, its hottest instructions the loads' first uses).
GITFAST_INLINE void prefetch_row(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) prefetch<3>(static_cast<const char*>(p) + b);
}

// Keys j .. j + 3 (rows k4[0..3]) into their columns of a key panel, `col` key j's column (element d at
// col[d * panel]): fp32 rows through 4 x 4 transposes (SSE, every x86-64 CPU), others one value at a time.
template <typename T>
GITFAST_INLINE void pack_key_quad(const T* const* k4, int64_t D, int64_t panel, float* col) {
  int64_t d = 0;
#if GITFAST_X86
  if constexpr (std::is_same_v<T, float>) {
    for (; d + 4 <= D; d += 4) {
      __m128 r0 = _mm_loadu_ps(k4[0] + d), r1 = _mm_loadu_ps(k4[1] + d);
      __m128 r2 = _mm_loadu_ps(k4[2] + d), r3 = _mm_loadu_ps(k4[3] + d);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      _mm_storeu_ps(col + d * panel, r0);
      _mm_storeu_ps(col + (d + 1) * panel, r1);
      _mm_storeu_ps(col + (d + 2) * panel, r2);
      _mm_storeu_ps(col + (d + 3) * panel, r3);
    }
  }
#endif
  for (; d < D; ++d)
    for (int i = 0; i < 4; ++i) col[d * panel + i] = to_f32(k4[i][d]);
}

// An item whose queries all see all L keys (P >= L: image tokens only): keys and values packed in
// panels of 2 W columns (attention_block.h's attend_full) and all nq queries pre-scaled into scratch, in
// one pass over the rows with the next rows prefetched, then blocks of isa.full_rows queries.
template <typename T>
void attend_all_keys(const Isa& isa, Scratch& sc, const Rows<T>& keys, const Rows<T>& values, const T* q,
                     int64_t q_stride, T* out, int64_t out_stride, int64_t nq, int64_t L, int64_t D, int64_t Dp,
                     float qscale) {
  const int64_t panel = 2 * isa.width, Lp = (L + panel - 1) / panel * panel;
  const int64_t nq_blocks = (nq + isa.full_rows - 1) / isa.full_rows * isa.full_rows;
  TORCH_INTERNAL_ASSERT(nq <= L, "queries are positions among the keys");  // the query scratch holds L rows
  sc.need_full_rows();
  float* kp = sc.kt.data();
  float* vp = sc.v.data();
  float* qp = sc.q.data();
  // zero what no row writes: keys past L (the last key panel), dims past D, query rows past nq
  if (L % panel) std::fill(kp + (Lp - panel) * Dp, kp + Lp * Dp, 0.0f);
  if (D < Dp) {
    for (int64_t p = 0; p < Lp; p += panel) std::fill(kp + p * Dp + D * panel, kp + (p + panel) * Dp, 0.0f);
  }
  std::fill(qp + nq * Dp, qp + nq_blocks * Dp, 0.0f);
  constexpr int64_t kAhead = 8;  // rows fetched ahead: two quads of keys
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  for (int64_t j0 = 0; j0 < L; j0 += 4) {
    for (int64_t j = j0 + kAhead; j < std::min(L, j0 + kAhead + 4); ++j) {
      prefetch_row(keys.row(j), row_bytes);
      prefetch_row(values.row(j), row_bytes);
      if (j < nq) prefetch_row(q + j * q_stride, row_bytes);
    }
    const int64_t n = std::min<int64_t>(4, L - j0);
    const T* k4[4];
    for (int64_t i = 0; i < 4; ++i) k4[i] = keys.row(j0 + std::min(i, n - 1));  // past L: a repeat, zeroed below
    float* kcol = kp + (j0 / panel) * Dp * panel + j0 % panel;  // key j0's column in its panel
    pack_key_quad(k4, D, panel, kcol);
    for (int64_t i = n; i < 4; ++i)
      for (int64_t d = 0; d < D; ++d) kcol[d * panel + i] = 0.0f;
    for (int64_t j = j0; j < j0 + n; ++j) {
      const T* vr = values.row(j);
      for (int64_t c = 0; c < Dp; c += panel) {  // value row j in each dim panel (a last one may be W wide)
        const int64_t width = std::min(panel, Dp - c), real = std::clamp<int64_t>(D - c, 0, width);
        float* vrow = vp + c * L + j * width;
        for (int64_t d = 0; d < real; ++d) vrow[d] = to_f32(vr[c + d]);
        std::fill(vrow + real, vrow + width, 0.0f);
      }
      if (j < nq) {
        const T* qr = q + j * q_stride;
        float* qrow = qp + j * Dp;
        for (int64_t d = 0; d < D; ++d) qrow[d] = to_f32(qr[d]) * qscale;
        std::fill(qrow + D, qrow + Dp, 0.0f);
      }
    }
  }
  for (int64_t i0 = 0; i0 < nq; i0 += isa.full_rows) {
    const int nr = static_cast<int>(std::min<int64_t>(isa.full_rows, nq - i0));
    isa.full(kp, vp, qp + i0 * Dp, L, Lp, Dp, sc.s.data(), sc.o.data());
    store_rows(sc, out, out_stride, i0, nr, D, Dp);
  }
}

// One item: nq queries at positions pos0.. attend to L keys with P image tokens; out rows in T.
template <typename T>
void attend_item(const Isa& isa, Scratch& sc, const Rows<T>& keys, const Rows<T>& values, const T* q,
                 int64_t q_stride, T* out, int64_t out_stride, int64_t nq, int64_t pos0, int64_t L, int64_t P,
                 int64_t D, float scale) {
  const int64_t Dp = (D + kPadDim - 1) / kPadDim * kPadDim;
  if (L <= 0) {  // decode with an empty context: zeros, as the kernels and references write
    for (int64_t i = 0; i < nq; ++i) std::fill(out + i * out_stride, out + i * out_stride + D, T(0.0f));
    return;
  }
  const int64_t Lp = (L + kTile - 1) / kTile * kTile;
  const float qscale = base2_scale(scale);
  const int nv = static_cast<int>(Dp / isa.width);
  if (nq == 1 && pos0 + 1 >= L) {
    // decode: the one query sees every key. fp32 or bf16 rows a whole number of vectors wide are read
    // where they lie in the cache (bf16 widened in registers); others (fp16, a head dim off the vector
    // width) are converted into fp32 scratch rows first, zero-padded to Dp
    const bool in_place = rows_in_place<T>(isa, D);
    if (!in_place) sc.need_packing();
    for (int64_t j = 0; j < L; ++j) {
      const T* kr = keys.row(j);
      const T* vr = values.row(j);
      if (in_place) {
        sc.krows[j] = kr;
        sc.vrows[j] = vr;
        continue;
      }
      float* kd = sc.kt.data() + j * Dp;
      float* vd = sc.v.data() + j * Dp;
      for (int64_t d = 0; d < D; ++d) kd[d] = to_f32(kr[d]);
      for (int64_t d = 0; d < D; ++d) vd[d] = to_f32(vr[d]);
      std::fill(kd + D, kd + Dp, 0.0f);
      std::fill(vd + D, vd + Dp, 0.0f);
      sc.krows[j] = kd;
      sc.vrows[j] = vd;
    }
    std::fill(sc.q.begin(), sc.q.begin() + Dp, 0.0f);
    for (int64_t d = 0; d < D; ++d) sc.q[d] = to_f32(q[d]) * qscale;
    // the rows' own width: in place, D (Dp may pad past the row); packed, Dp
    const int nv_rows = in_place ? static_cast<int>(D / isa.width) : nv;
    if (in_place && std::is_same_v<T, c10::BFloat16>) {
      isa.rows_bf16(reinterpret_cast<const uint16_t* const*>(sc.krows.data()),
                    reinterpret_cast<const uint16_t* const*>(sc.vrows.data()), sc.q.data(), L, nv_rows, sc.s.data(),
                    sc.o.data());
    } else {
      isa.rows_f32(reinterpret_cast<const float* const*>(sc.krows.data()),
                   reinterpret_cast<const float* const*>(sc.vrows.data()), sc.q.data(), L, nv_rows, sc.s.data(),
                   sc.o.data());
    }
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(sc.o[d]);
    return;
  }
  sc.need_packing();
  if (P >= L) return attend_all_keys(isa, sc, keys, values, q, q_stride, out, out_stride, nq, L, D, Dp, qscale);
  if (pos0 < P) {  // image-token rows see exactly the P image keys: the all-keys path over those first
    const int64_t image_rows = std::min(nq, P - pos0);
    attend_all_keys(isa, sc, keys, values, q, q_stride, out, out_stride, image_rows, P, D, Dp, qscale);
    q += image_rows * q_stride;
    out += image_rows * out_stride;
    nq -= image_rows;
    pos0 += image_rows;
    if (nq == 0) return;
  }
  float* kt = sc.kt.data();
  float* vp = sc.v.data();
  // -- pack: Kt [Dp][Lp] and V [Lp][Dp] in fp32, zero-padded --
  for (int64_t j = 0; j < L; ++j) {
    const T* kr = keys.row(j);
    const T* vr = values.row(j);
    for (int64_t d = 0; d < D; ++d) kt[d * Lp + j] = to_f32(kr[d]);
    for (int64_t d = 0; d < D; ++d) vp[j * Dp + d] = to_f32(vr[d]);
    std::fill(vp + j * Dp + D, vp + (j + 1) * Dp, 0.0f);
  }
  for (int64_t d = 0; d < Dp; ++d) std::fill(kt + d * Lp + (d < D ? L : 0), kt + (d + 1) * Lp, 0.0f);
  std::fill(vp + L * Dp, vp + Lp * Dp, 0.0f);
  // -- query blocks --
  for (int64_t i0 = 0; i0 < nq; i0 += isa.rows) {
    const int nr = static_cast<int>(std::min<int64_t>(isa.rows, nq - i0));
    load_query_rows(sc, q, q_stride, i0, nr, D, Dp, qscale);
    for (int r = 0; r < nr; ++r) {
      const int64_t pos = pos0 + i0 + r;
      sc.lim[r] = static_cast<int>(std::min(std::max(pos + 1, P), L));
    }
    isa.block(kt, vp, sc.q.data(), sc.lim.data(), nr, Lp, nv, sc.o.data());
    store_rows(sc, out, out_stride, i0, nr, D, Dp);
  }
}

template <typename F>
void with_dtype(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(c10::Half{}); break;
    case at::kBFloat16: f(c10::BFloat16{}); break;
    default: TORCH_CHECK(false, "gitfast: unsupported dtype ", t);
  }
}

int64_t padded_dim(int64_t D) { return (D + kPadDim - 1) / kPadDim * kPadDim; }
int64_t padded_len(int64_t L) { return std::max<int64_t>(kTile, (L + kTile - 1) / kTile * kTile); }

// A decode step over the paged cache (every sequence one query, which sees all its keys), fp32 or bf16
// rows a whole number of vectors wide: items are (sequence, group of heads) read token-major by
// attend_heads, whose outputs are attend_rows' bitwise. Whole sequences while there are at least two
// items per thread, else the heads split into groups so a small batch still keeps every thread busy.
// False (nothing done) where the step is not of that kind.
template <typename T>
bool decode_step_by_sequence(const Isa& isa, const T* qp, const at::Tensor& q, const T* kc, const at::Tensor& k_cache,
                             const T* vc, const at::Tensor& v_cache, const int32_t* tables, int64_t table_width,
                             const int32_t* cu, const int32_t* lens, int64_t B, int64_t H, int64_t D, int64_t max_len,
                             float scale, T* op, const at::Tensor& out) {
  if constexpr (!std::is_same_v<T, float> && !std::is_same_v<T, c10::BFloat16>) {
    return false;
  } else {
    if (!rows_in_place<T>(isa, D)) return false;
    for (int64_t b = 0; b < B; ++b) {
      if (cu[b + 1] - cu[b] != 1 || lens[b] < 1) return false;
    }
    const int64_t threads = at::get_num_threads();
    const int64_t wanted = std::min<int64_t>(H, std::max<int64_t>(1, (2 * threads + B - 1) / B));
    const int64_t per_group = (H + wanted - 1) / wanted, groups = (H + per_group - 1) / per_group;  // none empty
    const int64_t Dp = padded_dim(D), ls = padded_len(max_len), bs = k_cache.size(1);
    const float qscale = base2_scale(scale);
    const int nv = static_cast<int>(D / isa.width);
    at::parallel_for(0, B * groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qs(per_group * Dp), o(per_group * Dp), s(per_group * ls), m(per_group);
      std::vector<const T*> krows(max_len), vrows(max_len);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / groups, h0 = (item % groups) * per_group;
        const int nh = static_cast<int>(std::min<int64_t>(per_group, H - h0));
        const int64_t L = lens[b], row = cu[b];
        const int32_t* table = tables + b * table_width;
        const Rows<T> keys{kc + h0 * k_cache.stride(2), k_cache.stride(1), table, k_cache.stride(0), bs};
        const Rows<T> values{vc + h0 * v_cache.stride(2), v_cache.stride(1), table, v_cache.stride(0), bs};
        for (int64_t j = 0; j < L; ++j) {
          krows[j] = keys.row(j);
          vrows[j] = values.row(j);
        }
        for (int h = 0; h < nh; ++h) {
          const T* qh = qp + row * q.stride(0) + (h0 + h) * q.stride(1);
          for (int64_t d = 0; d < D; ++d) qs[h * Dp + d] = to_f32(qh[d]) * qscale;
        }
        if constexpr (std::is_same_v<T, float>) {
          isa.heads_f32(krows.data(), vrows.data(), k_cache.stride(2), nh, qs.data(), Dp, L, nv, s.data(), ls,
                        m.data(), o.data());
        } else {
          isa.heads_bf16(reinterpret_cast<const uint16_t* const*>(krows.data()),
                         reinterpret_cast<const uint16_t* const*>(vrows.data()), k_cache.stride(2), nh, qs.data(), Dp,
                         L, nv, s.data(), ls, m.data(), o.data());
        }
        for (int h = 0; h < nh; ++h) {
          T* oh = op + row * out.stride(0) + (h0 + h) * out.stride(1);
          for (int64_t d = 0; d < D; ++d) oh[d] = static_cast<T>(o[h * Dp + d]);
        }
      }
    });
    return true;
  }
}

}  // namespace

namespace cpu_kernels {

const char* cpu_isa() { return chosen_isa().name; }

const char* widest_isa() { return fit_isas().front()->name; }

std::vector<std::string> fit_isa_names() {
  std::vector<std::string> names;
  for (const Isa* isa : fit_isas()) names.emplace_back(isa->name);
  return names;
}

void set_cpu_isa(const std::string& name) {
  for (const Isa* isa : fit_isas()) {
    if (name == isa->name) {
      current_isa.store(isa, std::memory_order_relaxed);
      return;
    }
  }
  TORCH_CHECK(false, "gitfast.set_cpu_isa: ", name, " is not one of this CPU's ISAs (",
              c10::Join(", ", fit_isa_names()), "; GITFAST_CPU_ISA caps them)");
}

void git_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
                   const at::Tensor& image_counts, double sm_scale, at::Tensor& out) {
  const int64_t B = cu_seqlens.numel() - 1, H = q.size(1), D = q.size(2);
  const int32_t* cu = cu_seqlens.const_data_ptr<int32_t>();
  const int32_t* counts = image_counts.const_data_ptr<int32_t>();
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) max_len = std::max<int64_t>(max_len, cu[b + 1] - cu[b]);
  const Isa& isa = chosen_isa();
  with_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* qp = q.const_data_ptr<T>();
    const T* kp = k.const_data_ptr<T>();
    const T* vp = v.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      Scratch sc(padded_len(max_len), padded_dim(D));
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / H, h = item % H, s = cu[b], L = cu[b + 1] - cu[b];
        if (L == 0) continue;
        const int64_t P = std::min<int64_t>(std::max<int64_t>(counts[b], 0), L);
        const Rows<T> keys{kp + s * k.stride(0) + h * k.stride(1), k.stride(0), nullptr, 0, 1};
        const Rows<T> values{vp + s * v.stride(0) + h * v.stride(1), v.stride(0), nullptr, 0, 1};
        attend_item<T>(isa, sc, keys, values, qp + s * q.stride(0) + h * q.stride(1), q.stride(0),
                       op + s * out.stride(0) + h * out.stride(1), out.stride(0), L, 0, L, P, D,
                       static_cast<float>(sm_scale));
      }
    });
  });
}

void paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& cu_seqlens_q, const at::Tensor& context_lens,
                     const at::Tensor& image_counts, double sm_scale, at::Tensor& out) {
  const int64_t B = context_lens.numel(), H = q.size(1), D = q.size(2), bs = k_cache.size(1);
  const int32_t* cu = cu_seqlens_q.const_data_ptr<int32_t>();
  const int32_t* lens = context_lens.const_data_ptr<int32_t>();
  const int32_t* counts = image_counts.const_data_ptr<int32_t>();
  const int32_t* tables = block_tables.const_data_ptr<int32_t>();
  const int64_t table_width = block_tables.size(1);
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) max_len = std::max<int64_t>(max_len, lens[b]);
  const Isa& isa = chosen_isa();
  with_dtype(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* qp = q.const_data_ptr<T>();
    const T* kc = k_cache.const_data_ptr<T>();
    const T* vc = v_cache.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    if (decode_step_by_sequence<T>(isa, qp, q, kc, k_cache, vc, v_cache, tables, table_width, cu, lens, B, H, D,
                                   max_len, static_cast<float>(sm_scale), op, out)) {
      return;
    }
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      Scratch sc(padded_len(max_len), padded_dim(D));
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / H, h = item % H, s = cu[b], n = cu[b + 1] - cu[b], L = lens[b];
        if (n == 0) continue;
        const int64_t P = std::min<int64_t>(std::max<int64_t>(counts[b], 0), L);
        const int32_t* table = tables + b * table_width;
        const Rows<T> keys{kc + h * k_cache.stride(2), k_cache.stride(1), table, k_cache.stride(0), bs};
        const Rows<T> values{vc + h * v_cache.stride(2), v_cache.stride(1), table, v_cache.stride(0), bs};
        attend_item<T>(isa, sc, keys, values, qp + s * q.stride(0) + h * q.stride(1), q.stride(0),
                       op + s * out.stride(0) + h * out.stride(1), out.stride(0), n, L - n, L, P, D,
                       static_cast<float>(sm_scale));
      }
    });
  });
}

void write_kv_cache(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                    const at::Tensor& slot_mapping) {
  // A decode step writes a few rows: copying them inline beats waking a thread (and under a loaded
  // CPU, waiting for one); prompts and image prefixes split by about 64k elements per task.
  const int64_t n = k.size(0), row = k.size(1) * k.size(2), bs = k_cache.size(1);
  const int64_t bytes = row * static_cast<int64_t>(k.element_size());
  const int64_t* slots = slot_mapping.const_data_ptr<int64_t>();
  const char* kp = static_cast<const char*>(k.const_data_ptr());
  const char* vp = static_cast<const char*>(v.const_data_ptr());
  char* kc = static_cast<char*>(k_cache.mutable_data_ptr());
  char* vc = static_cast<char*>(v_cache.mutable_data_ptr());
  const int64_t esz = k.element_size();
  at::parallel_for(0, n, std::max<int64_t>(1, 65536 / row), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t slot = slots[i];
      if (slot < 0) continue;
      const int64_t dst = (slot / bs) * k_cache.stride(0) + (slot % bs) * k_cache.stride(1);
      std::memcpy(kc + dst * esz, kp + i * k.stride(0) * esz, bytes);
      std::memcpy(vc + dst * esz, vp + i * v.stride(0) * esz, bytes);
    }
  });
}

}  // namespace cpu_kernels
}  // namespace gitfast
