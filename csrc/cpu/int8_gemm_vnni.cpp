// gitfast._C, CPU kernel of dynamic INT8's exact 8-bit GEMM with VNNI (gitfast/int8_backends.py,
// backend "cpu ext vnni"):
//   acc [M, N] int32 = q [M, K] int8 @ w [N, K]^T int8, exact, from w packed by pack_u7_weight.
//
// Why: VPDPBUSD (VNNI) multiplies 4 unsigned bytes by 4 signed bytes and adds the 4 products into an
// int32 lane in one instruction, with no int16 step to saturate: 64 products per zmm instruction where
// int8_gemm.cpp's exact kernel needs a VPMADDWD and a VPADDD per 32 (AVX-512) and the 7-bit kernel
// three instructions per 32. AMD Zen 4/5 and Intel Ice Lake and later have it (AVX512-VNNI; Zen 5
// and Intel Alder Lake / Sapphire Rapids and later also as AVX-VNNI, 256-bit and VEX-encoded).
// q is signed: u = q + 128 is unsigned (0..255) and sum_k u w = sum_k q w + 128 colsum, so each call
// makes u once (q's bytes XOR 0x80, K padded to whole k-quads with zeros) and takes 128 x colsum back
// per column: the same integers as every other 8-bit backend, so the same captions.
//
// Layout: pack_u7_weight's [ceil(N/16), ceil(K/4), 16, 4] (int8_gemm_u7.cpp): one k-quad of 16
// output columns is 64 bytes, VPDPBUSD's operand against a row's 4 bytes broadcast, and the int32
// accumulators are output columns (no horizontal sums). A register tile is R rows x 2 vectors of
// columns (zmm: 8 x 32 columns, 16 accumulators; ymm: 6 x 16, 12 of AVX2's 16 registers); threads
// split the column groups; u's rows are walked in passes that stay in L2.
//
// ISA paths (chosen once): "avx512vnni" (zmm, where widest_isa() is avx512 and the CPU has
// AVX512-VNNI), "avxvnni" (ymm, AVX-VNNI where widest_isa() allows avx2), "avx2" (the same tile with
// VPDPBUSD done exactly in AVX2: bytes widened to int16 and two VPMADDWD; slower than int8_gemm.cpp,
// so backend_choice keeps it out on CPUs without VNNI, where it exists so the tile runs and is tested
// everywhere) and "generic" (plain C++, the reference for the others).

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/simd.h"
#include "ops.h"

namespace gitfast {
namespace {

constexpr int64_t kBlockCols = 16;  // output columns per packed block (pack_u7_weight)
constexpr int64_t kQuad = 4;        // k values per packed group: VPDPBUSD's 4 bytes per int32 lane
constexpr int64_t kQuadBytes = kBlockCols * kQuad;   // one k-quad of a block
constexpr int64_t kPassBytes = 256 * 1024;           // u rows walked per pass over the weights: ~L2/2
constexpr int kMaxRows = 8;                          // the most rows any path's tile takes
constexpr int kMaxCols = 32;                         // the most columns any path's tile takes

// The 4 bytes of u at p as one int32 (every path broadcasts it).
GITFAST_INLINE int32_t quad_at(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The portable path: a "vector" of 16 int32 lanes in plain C++ (the compiler's own vectorising).
namespace generic {
struct Vec {
  static constexpr int kLanes = 16, kRows = 4;
  struct Acc { int32_t x[kLanes]; };
  struct U { int32_t b[kQuad]; };
  struct W { int8_t b[kLanes * kQuad]; };
  static Acc zero() { return Acc{}; }
  static U row(int32_t quad) {
    U u;
    for (int i = 0; i < kQuad; ++i) u.b[i] = static_cast<uint8_t>(static_cast<uint32_t>(quad) >> (8 * i));
    return u;
  }
  static W weights(const int8_t* p) {
    W w;
    std::memcpy(w.b, p, sizeof(w.b));
    return w;
  }
  static Acc dot(Acc acc, const U& u, const W& w) {
    for (int c = 0; c < kLanes; ++c)
      for (int i = 0; i < kQuad; ++i) acc.x[c] += u.b[i] * static_cast<int32_t>(w.b[c * kQuad + i]);
    return acc;
  }
  static void store(int32_t* out, const Acc& acc, const int32_t* corr) {
    for (int c = 0; c < kLanes; ++c) out[c] = acc.x[c] - corr[c];
  }
};
#include "int8_gemm_vnni_tile.h"
}  // namespace generic

using TileFn = void (*)(const uint8_t* const*, int, const int8_t* const*, int, int64_t, const int32_t*, int32_t*,
                        int64_t);

struct VnniPath {
  const char* name;
  int lanes, rows;  // columns per vector, rows per tile
  TileFn tile;
};

}  // namespace

#if GITFAST_X86
GITFAST_TARGET_BEGIN("avx2")
namespace {
// What both 256-bit paths do with their eight int32 lanes: start at zero, store minus the correction.
struct Ymm32 {
  using Acc = __m256i;
  static Acc zero() { return _mm256_setzero_si256(); }
  static void store(int32_t* out, Acc acc, const int32_t* corr) {
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(corr));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_sub_epi32(acc, c));
  }
};

// AVX2 without VNNI: VPDPBUSD's sum of 4 products per lane, exactly, from two VPMADDWD over the bytes
// widened to int16 (even bytes: u zero-extended, w sign-extended; odd bytes likewise). A row's halves
// are made once per quad and a weight vector's once per quad, shared by the tile.
namespace avx2 {
struct Vec : Ymm32 {
  static constexpr int kLanes = 8, kRows = 4;
  struct U { __m256i even, odd; };
  struct W { __m256i even, odd; };
  static U row(int32_t quad) {
    const __m256i u = _mm256_set1_epi32(quad);
    return {_mm256_and_si256(u, _mm256_set1_epi16(0x00ff)), _mm256_srli_epi16(u, 8)};
  }
  static W weights(const int8_t* p) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm256_srai_epi16(_mm256_slli_epi16(w, 8), 8), _mm256_srai_epi16(w, 8)};
  }
  static Acc dot(Acc acc, const U& u, const W& w) {
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(u.even, w.even), _mm256_madd_epi16(u.odd, w.odd)));
  }
};
#include "int8_gemm_vnni_tile.h"
}  // namespace avx2
}  // namespace
GITFAST_TARGET_END

// AVX-VNNI (the 256-bit VEX form) needs GCC 11 or clang 12 and an assembler of their time; an older
// compiler builds the other paths only.
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define GITFAST_AVXVNNI 1
#else
#define GITFAST_AVXVNNI 0
#endif

// The VNNI paths write VPDPBUSD as one line of assembly (AT&T order: weights, row, accumulator, the
// intrinsics' operand roles): through the intrinsics GCC 12 copied every accumulator to another
// register and back around each instruction (two extra moves per VPDPBUSD in the 8-row tile), as
// int8_gemm_u7.cpp found for VPMADDUBSW.
#if GITFAST_AVXVNNI
GITFAST_TARGET_BEGIN("avx2,avxvnni")
namespace {
namespace avxvnni {
struct Vec : Ymm32 {  // 256-bit, VEX-encoded VPDPBUSD
  static constexpr int kLanes = 8, kRows = 6;
  using U = __m256i;
  using W = __m256i;
  static U row(int32_t quad) { return _mm256_set1_epi32(quad); }
  static W weights(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static Acc dot(Acc acc, U u, W w) {  // _mm256_dpbusd_avx_epi32(acc, u, w), without GCC 12's copy (above)
    asm("%{vex%} vpdpbusd %[w], %[u], %[acc]" : [acc] "+x"(acc) : [u] "x"(u), [w] "x"(w));
    return acc;
  }
};
#include "int8_gemm_vnni_tile.h"
}  // namespace avxvnni
}  // namespace
GITFAST_TARGET_END
#endif  // GITFAST_AVXVNNI

GITFAST_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2")
namespace {
namespace avx512vnni {
struct Vec {  // 512-bit VPDPBUSD
  static constexpr int kLanes = 16, kRows = 8;
  using Acc = __m512i;
  using U = __m512i;
  using W = __m512i;
  static Acc zero() { return _mm512_setzero_si512(); }
  static U row(int32_t quad) { return _mm512_set1_epi32(quad); }
  static W weights(const int8_t* p) { return _mm512_loadu_si512(p); }
  static Acc dot(Acc acc, U u, W w) {  // _mm512_dpbusd_epi32(acc, u, w), without GCC 12's copy (above)
#if defined(GITFAST_EMULATE_AVX512)
    return _mm512_dpbusd_epi32(acc, u, w);  // SIMDe's, for the emulation build (simd_emulation.h)
#else
    asm("vpdpbusd %[w], %[u], %[acc]" : [acc] "+v"(acc) : [u] "v"(u), [w] "v"(w));
    return acc;
#endif
  }
  static void store(int32_t* out, Acc acc, const int32_t* corr) {
    _mm512_storeu_si512(out, _mm512_sub_epi32(acc, _mm512_loadu_si512(corr)));
  }
};
#include "int8_gemm_vnni_tile.h"
}  // namespace avx512vnni
}  // namespace
GITFAST_TARGET_END
#endif  // GITFAST_X86

namespace {

const VnniPath& chosen_path() {
  static const VnniPath path = [] {
    const std::string isa = cpu_kernels::widest_isa();
#if GITFAST_X86
    if (isa == "avx512" && GITFAST_CPU_SUPPORTS("avx512vnni"))
      return VnniPath{"avx512vnni", avx512vnni::Vec::kLanes, avx512vnni::Vec::kRows, &avx512vnni::tile_entry};
#if GITFAST_AVXVNNI
    // AVX-VNNI is a 256-bit ISA: GITFAST_CPU_ISA=avx2 keeps it
    if ((isa == "avx512" || isa == "avx2") && GITFAST_CPU_SUPPORTS("avxvnni"))
      return VnniPath{"avxvnni", avxvnni::Vec::kLanes, avxvnni::Vec::kRows, &avxvnni::tile_entry};
#endif
    if (isa == "avx512" || isa == "avx2")
      return VnniPath{"avx2", avx2::Vec::kLanes, avx2::Vec::kRows, &avx2::tile_entry};
#endif
    return VnniPath{"generic", generic::Vec::kLanes, generic::Vec::kRows, &generic::tile_entry};
  }();
  return path;
}

}  // namespace

namespace cpu_kernels {

const char* int8_vnni_isa() { return chosen_path().name; }

void int8_mm_vnni(const at::Tensor& q, const at::Tensor& packed, const at::Tensor& colsum, at::Tensor& out) {
  const VnniPath& path = chosen_path();
  const int64_t m = q.size(0), k = q.size(1), n = out.size(1), blocks = packed.size(0);
  const int64_t quads = packed.size(1), kp = quads * kQuad, block_bytes = quads * kQuadBytes;
  const int64_t cols = 2 * path.lanes;                 // columns per tile (two vectors)
  const int64_t groups = (blocks * kBlockCols + cols - 1) / cols;

  // u = q + 128 as bytes (q XOR 0x80), rows padded to whole quads with zeros (the packed weight is zero
  // there, so any value would do)
  std::vector<uint8_t> u(static_cast<size_t>(m * kp), 0);
  const auto* qp = reinterpret_cast<const uint8_t*>(q.const_data_ptr<int8_t>());
  at::parallel_for(0, m, std::max<int64_t>(1, 65536 / std::max<int64_t>(k, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t i = 0; i < k; ++i) u[r * kp + i] = qp[r * k + i] ^ 0x80u;
  });
  // 128 x colsum per column, zeros past N (as the packing): what u's +128 added to every row
  std::vector<int32_t> corr(static_cast<size_t>(groups * cols), 0);
  const int32_t* cs = colsum.const_data_ptr<int32_t>();
  for (int64_t c = 0; c < n; ++c) corr[c] = 128 * cs[c];

  const int8_t* pp = packed.const_data_ptr<int8_t>();
  int32_t* op = out.mutable_data_ptr<int32_t>();
  const int64_t rows_per_pass = std::max<int64_t>(path.rows, kPassBytes / std::max<int64_t>(kp, 1) / path.rows * path.rows);
  at::parallel_for(0, groups, std::max<int64_t>(1, 16384 / (kp * cols)), [&](int64_t begin, int64_t end) {
    for (int64_t r0 = 0; r0 < m; r0 += rows_per_pass) {
      const int64_t r1 = std::min(m, r0 + rows_per_pass);
      for (int64_t g = begin; g < end; ++g) {
        const int64_t c0 = g * cols, valid = std::min(cols, n - c0);
        // vectors with packed data (the packing's blocks cover N rounded up to 16)
        const int nv = std::min<int64_t>(blocks * kBlockCols - c0, cols) > path.lanes ? 2 : 1;
        const int8_t* w[2];
        for (int v = 0; v < 2; ++v) {
          const int64_t c = c0 + std::min(v, nv - 1) * path.lanes;
          w[v] = pp + c / kBlockCols * block_bytes + c % kBlockCols * kQuad;
        }
        for (int64_t r = r0; r < r1; r += path.rows) {
          const int rows = static_cast<int>(std::min<int64_t>(path.rows, r1 - r));
          const uint8_t* a[kMaxRows];
          for (int i = 0; i < rows; ++i) a[i] = u.data() + (r + i) * kp;
          if (valid == cols) {
            path.tile(a, rows, w, nv, quads, corr.data() + c0, op + r * n + c0, n);
            continue;
          }
          int32_t part[kMaxRows * kMaxCols];  // columns past N: through a buffer
          path.tile(a, rows, w, nv, quads, corr.data() + c0, part, cols);
          for (int i = 0; i < rows; ++i)
            std::memcpy(op + (r + i) * n + c0, part + i * cols, static_cast<size_t>(valid) * sizeof(int32_t));
        }
      }
    }
  });
}

}  // namespace cpu_kernels
}  // namespace gitfast
