// Internal: the projection of the activation transform (activation_transform.cpp), the part of
// it that multiplies: for `tokens` vectors v_t of `padded` values (stride `padded`),
//   out[t * out_stride + j] = sum_i v_t[i] * down[i * m + j],  j < m,
// summed over i in increasing order. The x86 variants fuse each multiply-add; the portable one
// fuses where its compiler does (so results may differ from them in the last bits).
//
// Variants (chosen once per process for this CPU): AVX-512F keeps a tile of 6 tokens x 64
// outputs in 24 registers while it walks the rows of down (each row read once per 6 tokens);
// AVX2+FMA a tile of 6 tokens x 16 outputs; portable accumulates row by row in memory.
#pragma once
#include <cstdint>

namespace sdq::detail {

enum class ProjectKernel : int { automatic = 0, portable = 1, avx2 = 2, avx512 = 3 };

using ProjectFn = void (*)(const float* down, int64_t padded, int64_t m, const float* v,
                           int64_t tokens, float* out, int64_t out_stride);

void project_portable(const float* down, int64_t padded, int64_t m, const float* v,
                      int64_t tokens, float* out, int64_t out_stride);
void project_avx2(const float* down, int64_t padded, int64_t m, const float* v, int64_t tokens,
                  float* out, int64_t out_stride);
void project_avx512(const float* down, int64_t padded, int64_t m, const float* v,
                    int64_t tokens, float* out, int64_t out_stride);

// The variant `kernel` names (automatic: the best this CPU runs); null when this CPU cannot.
ProjectFn project_kernel(ProjectKernel kernel = ProjectKernel::automatic) noexcept;

}  // namespace sdq::detail
