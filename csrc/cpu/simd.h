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
