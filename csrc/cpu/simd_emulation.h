// Test builds only (-DGITFAST_EMULATE_AVX512; tests/avx512_emulation.py builds one): the kernels'
// AVX-512 paths, compiled against SIMDe's portable AVX-512 intrinsics instead of the CPU's, so that
// a CPU without AVX-512 runs them. They are the paths of the CPUs gitfast is not tested on here (AMD
// Zen 4/5, Intel Xeon): a wrong mask, tail or lane count in them shows up in these runs. Every target
// block is then compiled for the build's AVX2 baseline (simd.h), and GITFAST_CPU_SUPPORTS answers yes
// for the features emulated here. Not emulated: timing, and the VNNI kernel's inline assembly (that
// build calls SIMDe's _mm512_dpbusd_epi32 in its place).
#pragma once

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include <cstring>

// What SIMDe 0.8 lacks. The float sum adds in GCC's _mm512_reduce_add_ps order (halves, then
// quarters, then pairs), so a sum rounds as on the hardware.
static inline float gitfast_emu_reduce_add_ps(__m512 v) {
  float a[16];
  _mm512_storeu_ps(a, v);
  float h[8], q[4];
  for (int i = 0; i < 8; ++i) h[i] = a[i + 8] + a[i];
  for (int i = 0; i < 4; ++i) q[i] = h[i + 4] + h[i];
  const float p0 = q[0] + q[2], p1 = q[1] + q[3];
  return p0 + p1;
}

static inline int gitfast_emu_reduce_add_epi32(__m512i v) {
  int32_t a[16];
  _mm512_storeu_si512(a, v);
  uint32_t sum = 0;  // wraps as the hardware's lanes do
  for (int i = 0; i < 16; ++i) sum += static_cast<uint32_t>(a[i]);
  return static_cast<int>(sum);
}

#undef _mm512_reduce_add_ps
#undef _mm512_reduce_add_epi32
#define _mm512_reduce_add_ps(v) gitfast_emu_reduce_add_ps(v)
#define _mm512_reduce_add_epi32(v) gitfast_emu_reduce_add_epi32(v)

static inline bool gitfast_emulates(const char* feature) {
  static const char* const kEmulated[] = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni", "avx512bf16"};
  for (const char* name : kEmulated)
    if (std::strcmp(feature, name) == 0) return true;
  return false;
}
