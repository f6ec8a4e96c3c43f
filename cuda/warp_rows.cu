// Warp-rows add-only GEMV (plan and layout: plan_warp_rows in sdq/cuda.h).
//
// Why this shape: at batch 1-4 the GEMV must stream the bitplanes at the memory limit. The table
// kernel (addonly.cu) gives each thread a row, so a warp's loads touch 32 rows, and it builds a
// table per chunk between two barriers. Here a warp reads one row's 32 consecutive words per
// load (128 bytes, coalesced), and lane l, which always takes word l of a segment, holds that
// word's 32 activations in registers for every row of the warp. A set bit then costs one
// predicated add:
//   binary:  sum_k s_k x_k = 2 sum_{k: bit k} x_k - sum_k x_k   (s_k = +1 for a set bit)
//   ternary: sum_k t_k x_k = 2 sum_{k: nz & sign} x_k - sum_{k: nz} x_k
// The block's fp16 scale multiplies each word's sum (a word lies in one block); the mean term
// MU[r,b] xsum_b is added once per row-block. Warps of a CTA split a row's segments and add their
// partials in shared memory, so y is written once: no atomics, deterministic sums.
//
// Measured on an H200 (bench/results/kernels_gpu.json; ncu, 8192x8192 binary OSR 2, batch 1):
// 28.2 us against the table kernel's 21.1 (DRAM throughput 14% against 19%), and slower at
// batch 4 (token tiles re-read the planes), so addonly_gemm does not choose it. The SASS is as
// intended (R2P + predicated FADD, about 1.1 instructions per code), but each row's sum is one
// chain of dependent adds (8 cycles per issued instruction) and 126 registers leave 16 warps per
// SM (25% occupancy). Next steps: several partial sums per row, fewer rows per warp.
#include <cuda_fp16.h>

#include "common.cuh"
#include "warp_rows.cuh"

namespace sdq::cuda::detail {
namespace {

constexpr int kMaxWarps = 8;

struct Args {
  GemmBuffers io;
  int64_t out, batch, words, cols, nb, wpb, segments;
  int64_t tok_base;
  bool vec_x;  // xt is 16-byte aligned: float4 loads
};

// s += x when bit != 0, as one predicated add, no select: on sm_90 ptxas turns the bit tests
// into R2P (7 predicates per instruction) and predicated FADDs, about 1.1 instructions a code.
__device__ __forceinline__ void add_if(float& s, uint32_t bit, float x) {
  asm("{\n\t.reg .pred p;\n\tsetp.ne.u32 p, %1, 0;\n\t@p add.ftz.f32 %0, %0, %2;\n\t}"
      : "+f"(s) : "r"(bit), "f"(x));
}

// Sum of x[k] over the set bits k of w.
__device__ __forceinline__ float masked_sum(uint32_t w, const float (&x)[32]) {
  float s = 0.0f;
#pragma unroll
  for (int k = 0; k < 32; ++k) add_if(s, w & (1u << k), x[k]);
  return s;
}

template <int TB, int RPW, bool TERN>
__global__ void __launch_bounds__(kMaxWarps * 32) warp_rows_kernel(const Args a) {
  __shared__ float part[kMaxWarps][RPW][TB];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * RPW;
  const int64_t t0 = a.tok_base + static_cast<int64_t>(blockIdx.y) * TB;

  // Row r0 + j, or for a tile past the end the last row (read, never written).
  auto row = [&](int j) -> int64_t { return r0 + j < a.out ? r0 + j : a.out - 1; };

  float acc[RPW][TB];
#pragma unroll
  for (int j = 0; j < RPW; ++j)
#pragma unroll
    for (int t = 0; t < TB; ++t) acc[j][t] = 0.0f;

  for (int64_t s = warp; s < a.segments; s += warps) {
    const int64_t w = s * 32 + lane;
    const bool ok = w < a.words;
    word_t ws[RPW], wn[RPW];
#pragma unroll
    for (int j = 0; j < RPW; ++j) {
      const int64_t at = row(j) * a.words + w;
      ws[j] = ok ? __ldg(a.io.sign + at) : 0u;
      if constexpr (TERN) wn[j] = ok ? __ldg(a.io.nonzero + at) : 0u;
    }
    float x[TB][32];
#pragma unroll
    for (int t = 0; t < TB; ++t) {
      const bool tok_ok = ok && t0 + t < a.batch;
      const float* src = a.io.xt + (t0 + t) * a.cols + w * 32;
      if (tok_ok && a.vec_x) {
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          const float4 v = __ldg(reinterpret_cast<const float4*>(src) + q);
          x[t][4 * q] = v.x; x[t][4 * q + 1] = v.y; x[t][4 * q + 2] = v.z; x[t][4 * q + 3] = v.w;
        }
      } else {
#pragma unroll
        for (int k = 0; k < 32; ++k) x[t][k] = tok_ok ? __ldg(src + k) : 0.0f;
      }
    }
    float xw[TB];  // binary: the word's activation sum
    if constexpr (!TERN) {
#pragma unroll
      for (int t = 0; t < TB; ++t) {
        float s0 = 0.0f, s1 = 0.0f;
#pragma unroll
        for (int k = 0; k < 32; k += 2) { s0 += x[t][k]; s1 += x[t][k + 1]; }
        xw[t] = s0 + s1;
      }
    }
    const int64_t b = ok ? w / a.wpb : 0;
#pragma unroll
    for (int j = 0; j < RPW; ++j) {
      const float sc = __half2float(__ushort_as_half(__ldg(a.io.scale + row(j) * a.nb + b)));
#pragma unroll
      for (int t = 0; t < TB; ++t) {
        float v;
        if constexpr (TERN) {
          v = 2.0f * masked_sum(wn[j] & ws[j], x[t]) - masked_sum(wn[j], x[t]);
        } else {
          v = 2.0f * masked_sum(ws[j], x[t]) - xw[t];
        }
        acc[j][t] = fmaf(sc, v, acc[j][t]);
      }
    }
  }

  // Mean terms: block b = warp * 32 + lane, then + warps * 32, ...
  for (int64_t b = static_cast<int64_t>(warp) * 32 + lane; b < a.nb; b += warps * 32) {
    float xs[TB];
#pragma unroll
    for (int t = 0; t < TB; ++t)
      xs[t] = t0 + t < a.batch ? __ldg(a.io.xsum + (t0 + t) * a.nb + b) : 0.0f;
#pragma unroll
    for (int j = 0; j < RPW; ++j) {
      const float mu = __half2float(__ushort_as_half(__ldg(a.io.mean + row(j) * a.nb + b)));
#pragma unroll
      for (int t = 0; t < TB; ++t) acc[j][t] = fmaf(mu, xs[t], acc[j][t]);
    }
  }

#pragma unroll
  for (int j = 0; j < RPW; ++j)
#pragma unroll
    for (int t = 0; t < TB; ++t) {
      float v = acc[j][t];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0) part[warp][j][t] = v;
    }
  __syncthreads();
  for (int i = threadIdx.x; i < RPW * TB; i += blockDim.x) {
    const int j = i / TB, t = i % TB;
    const int64_t r = r0 + j, tok = t0 + t;
    if (r >= a.out || tok >= a.batch) continue;
    float v = 0.0f;
    for (int q = 0; q < warps; ++q) v += part[q][j][t];
    a.io.y[tok * a.out + r] = v;
  }
}

template <int TB, bool TERN>
Status launch(const Args& base, const WarpRowsPlan& plan, cudaStream_t s) {
  constexpr int RPW = 16 / TB;
  for (int64_t tile = 0; tile < plan.token_tiles; tile += kMaxGridYZ) {
    Args a = base;
    a.tok_base = tile * TB;
    const int64_t tiles = plan.token_tiles - tile < kMaxGridYZ ? plan.token_tiles - tile : kMaxGridYZ;
    const dim3 grid(static_cast<unsigned>(plan.row_tiles), static_cast<unsigned>(tiles));
    warp_rows_kernel<TB, RPW, TERN><<<grid, plan.warps_per_cta * 32, 0, s>>>(a);
    const Status st = check_launch();
    if (st != Status::ok) return st;
  }
  return Status::ok;
}

template <bool TERN>
Status launch_tokens(const Args& a, const WarpRowsPlan& plan, cudaStream_t s) {
  switch (plan.tokens) {
    case 1: return launch<1, TERN>(a, plan, s);
    case 2: return launch<2, TERN>(a, plan, s);
    case 4: return launch<4, TERN>(a, plan, s);
    default: return Status::bad_size;
  }
}

}  // namespace

Status warp_rows_gemm(const BlockLayout& L, const GemmBuffers& io, int64_t out, int64_t batch,
                      cudaStream_t stream) noexcept {
  const WarpRowsPlan plan = plan_warp_rows(L, out, batch);
  if (plan.row_tiles > kMaxGridX) return Status::bad_size;
  const bool ternary = io.nonzero != nullptr;
  Args a{};
  a.io = io;
  a.out = out;
  a.batch = batch;
  a.words = L.words_per_row();
  a.cols = L.total_code_cols();
  a.nb = L.num_blocks();
  a.wpb = L.code_cols(0) / 32;
  a.segments = plan.segments;
  a.tok_base = 0;
  a.vec_x = aligned(io.xt, 16);  // rows of xt are 128-byte multiples (code columns come in 32s)
  return ternary ? launch_tokens<true>(a, plan, stream) : launch_tokens<false>(a, plan, stream);
}

}  // namespace sdq::cuda::detail
