// Compiler/ISA switches shared by the CPU kernels (C++ only: nvcc never sees this header).
#pragma once

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define GITFAST_X86 1
#include <immintrin.h>
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
