// Instruction-set markers that compile on every target: x86-64 builds clone the marked function
// for AVX-512 and AVX2 (GCC/Clang pick the clone at load time); other targets (AArch64, where
// NEON is the baseline the compiler already vectorises for) build it once, plainly.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SDQ_X86_GNU 1
#define SDQ_CLONES_X86 __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SDQ_X86_GNU 0
#define SDQ_CLONES_X86
#endif
