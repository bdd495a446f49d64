// Compiler/ISA switches shared by the CPU kernels (C++ only: nvcc never sees this header).
#pragma once

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define GITFAST_X86 1
#include <immintrin.h>
#if defined(GITFAST_EMULATE_AVX512)
#include "cpu/simd_emulation.h"
#endif
#else
#define GITFAST_X86 0
#endif

// Inner helpers that must fold into their (ISA-specific) callers to be vectorised with them.
#if defined(__GNUC__)
#define GITFAST_INLINE inline __attribute__((always_inline))
#else
#define GITFAST_INLINE inline
#endif

// Plain loops compiled for x86-64-v4 (AVX-512), v3 (AVX2) and baseline, picked at load time by the
// CPU (GCC on Linux): GCC vectorises each clone for its ISA.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GITFAST_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GITFAST_CLONES
#endif

// A block of functions compiled for one ISA, whatever the build's baseline (called only where the
// CPU has that ISA): GITFAST_TARGET_BEGIN("avx2,fma") ... GITFAST_TARGET_END, in GCC's or clang's words.
// The emulation build compiles every block for its AVX2 baseline instead (simd_emulation.h).
#define GITFAST_PRAGMA(x) _Pragma(#x)
#if defined(GITFAST_EMULATE_AVX512)
#define GITFAST_TARGET_BEGIN(isa)
#define GITFAST_TARGET_END
#define GITFAST_QUIET_UNINITIALIZED_BEGIN
#define GITFAST_QUIET_UNINITIALIZED_END
#elif defined(__clang__)
#define GITFAST_TARGET_BEGIN(isa) GITFAST_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define GITFAST_TARGET_END GITFAST_PRAGMA(clang attribute pop)
#define GITFAST_QUIET_UNINITIALIZED_BEGIN
#define GITFAST_QUIET_UNINITIALIZED_END
#else
#define GITFAST_TARGET_BEGIN(isa) GITFAST_PRAGMA(GCC push_options) GITFAST_PRAGMA(GCC target(isa))
#define GITFAST_TARGET_END GITFAST_PRAGMA(GCC pop_options)
// GCC 12 reports a false -Wmaybe-uninitialized / -Wuninitialized inside the _mm512_reduce_* and
// _mm512_extract* intrinsics (the undefined upper half they start from)
#define GITFAST_QUIET_UNINITIALIZED_BEGIN                                                       \
  GITFAST_PRAGMA(GCC diagnostic push) GITFAST_PRAGMA(GCC diagnostic ignored "-Wmaybe-uninitialized") \
  GITFAST_PRAGMA(GCC diagnostic ignored "-Wuninitialized")
#define GITFAST_QUIET_UNINITIALIZED_END GITFAST_PRAGMA(GCC diagnostic pop)
#endif

// Whether the CPU has `feature` (a string literal, as __builtin_cpu_supports takes), the emulation
// build answering yes for the AVX-512 features it emulates.
#if defined(GITFAST_EMULATE_AVX512)
#define GITFAST_CPU_SUPPORTS(feature) (gitfast_emulates(feature) || __builtin_cpu_supports(feature))
#else
#define GITFAST_CPU_SUPPORTS(feature) __builtin_cpu_supports(feature)
#endif

namespace gitfast {
// A hint to fetch the cache line at `p` for reading; Locality as __builtin_prefetch's (3: into every
// cache level, 2: into L2 and out). A hint only: it never faults, so addresses past an array's end are
// harmless.
template <int Locality>
GITFAST_INLINE void prefetch(const void* p) {
#if defined(__GNUC__)
  __builtin_prefetch(p, 0, Locality);
#else
  (void)p;
#endif
}
}  // namespace gitfast
