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
#include <vector>

#include "sdq/layout.h"
#include "sdq/status.h"

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

// bf16 on Intel AMX (project_amx.cpp), for transforms that an int8 GEMM reads: the same sum with
// v and down rounded to bf16 (half to even) and float32 accumulation, in an order of its own.
// down comes packed once (project_amx_pack: project_amx_packed_size elements, bf16 bits); a is
// the caller's scratch of project_amx_scratch_size(padded, tokens) elements. Vector t's m
// outputs go to out_rows[t] (anywhere: a transform writes each straight to its place in xt).
// project_amx_supported: AMX-BF16, AVX512-BF16 and the OS's tile permission (amx_gemm.h).
bool project_amx_supported() noexcept;
int64_t project_amx_packed_size(int64_t padded, int64_t m) noexcept;
int64_t project_amx_scratch_size(int64_t padded, int64_t tokens) noexcept;
void project_amx_pack(const float* down, int64_t padded, int64_t m, uint16_t* packed) noexcept;
// down [padded, m] packed as project_amx reads it; empty when down is null or this CPU lacks
// AMX-BF16.
std::vector<uint16_t> project_amx_packed(const float* down, int64_t padded, int64_t m);
void project_amx(const uint16_t* packed, int64_t padded, int64_t m, const float* v,
                 int64_t tokens, float* const* out_rows, uint16_t* a);

// One block group's down-sampler in the forms a projection reads: down [padded, m] float32, and
// its project_amx_pack form or null (then the float32 projection runs).
struct Projection {
  const float* down;
  const uint16_t* down_bf16;
};

// Called once per (token, block) vector as soon as its codes are in xt (padding zeroed), on the
// thread that projected it: xt_token is the token's row of xt. For per-block work on the fresh
// codes (a plan's int8 tables); it must not throw.
struct VectorSink {
  void (*fn)(void* ctx, const float* xt_token, int64_t token, int64_t block);
  void* ctx;
};

// activation_transform (gemv.h) with each group's projection as its Projection says (not_built:
// a bf16 form where project_amx_supported is false). x_copy: null, or batch x in_features
// floats that receive a copy of x (read once for both; LinearPlan keeps it to recognise a
// repeated input). sink: null, or called per vector as VectorSink says.
Status activation_transform_projected(const BlockLayout& L, bool hadamard, const float* signs,
                                      Projection full, Projection last, const float* x,
                                      int64_t batch, float* xt, float* xsum, int threads,
                                      float* x_copy = nullptr,
                                      const VectorSink* sink = nullptr) noexcept;

}  // namespace sdq::detail
