// Add-only inference on packed codes (contract: gemv.h; entry points: cuda.h).
//
// activation_transform: per (block, 64 output columns, 4 or 1 tokens) a CTA pads the block of
// each token into shared memory, applies the signs and the FWHT there, and projects with D^T
// (xt_b = D_b^T x'_b, 4 slices of the padded length reduced in shared memory). It multiplies:
// it runs once per token, shared by every output row.
//
// addonly_gemm (the table kernel; kernel=warp_rows runs warp_rows.cu instead): one thread per
// output row, kGemmThreads rows per CTA, `tokens` tokens per CTA.
// For each chunk of chunk_words words the CTA first builds, per token and per group of 4 code
// columns, the 16 sums  T[v] = sum_k (bit k of v ? x_k : -x_k)  (binary) or
// T[v] = sum_k (bit k of v ? x_k : 0)  (ternary, looked up once with the +1 mask nz & sign and
// once with the -1 mask nz & ~sign). A row then costs, per 4 codes and token, one table lookup
// and one add: no multiply by a code. All 32 lanes of a warp read the same 16-entry table (their
// rows differ, their columns do not), so the lookups are conflict-free (at most 16 distinct
// banks, equal addresses broadcast). The fp16 scale of a row-block multiplies the row-block's
// sum once; the mean term MU[r,b] xsum_b is added once per row-block. Weight words are read
// once per token tile with 16/8/4-byte loads, issued before the chunk's table is built so they
// are in flight meanwhile.
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "common.cuh"
#include "guard.h"
#include "sdq/cuda.h"
#include "sdq/gemv.h"
#include "tensor_rows.cuh"
#include "warp_rows.cuh"

namespace sdq::cuda {
namespace {

using detail::pidx;

using detail::kMaxGridX;
using detail::kMaxGridYZ;

int log2_int(int64_t n) {
  int l = 0;
  while ((int64_t{1} << l) < n) ++l;
  return l;
}

// ------------------------------------------------------------------ activation transform

struct ActArgs {
  const float* x;
  const float* signs;      // may be null
  const float* down_full;  // [p0, m0] (null when there is a single block)
  const float* down_last;  // [pl, ml]
  float* xt;               // [batch, cols]
  float* xsum;             // [batch, nb]
  int64_t batch, in_features, block_size, nb, cols, cc0;
  int64_t tok_base;        // first token of this launch
  int log2p0, m0, log2pl, ml, ccl;
  bool hadamard;
};

template <int TOK>
__global__ void __launch_bounds__(kActThreads) act_kernel(const ActArgs a) {
  extern __shared__ float xs[];
  constexpr int kSlices = kActThreads / kActCols;
  __shared__ float red[kSlices][TOK][kActCols];

  const int64_t b = blockIdx.x;
  const bool last = b == a.nb - 1;
  const int log2p = last ? a.log2pl : a.log2p0;
  const int p = 1 << log2p;
  const int m = last ? a.ml : a.m0;
  const int cc = last ? a.ccl : static_cast<int>(a.cc0);
  const float* __restrict__ D = last ? a.down_last : a.down_full;
  const int j0 = blockIdx.y * kActCols;
  if (j0 >= cc) return;  // whole CTA: the last block has fewer code columns
  const int64_t start = b * a.block_size;
  const int64_t rest = a.in_features - start;
  const int width = rest < a.block_size ? static_cast<int>(rest) : static_cast<int>(a.block_size);
  const int64_t t0 = a.tok_base + static_cast<int64_t>(blockIdx.z) * TOK;

  // Load (zero-padded), signs, butterflies.
  const int total = TOK * p;
  for (int f = threadIdx.x; f < total; f += blockDim.x) {
    const int i = f & (p - 1);
    const int64_t tok = t0 + (f >> log2p);
    float v = 0.0f;
    if (tok < a.batch && i < width) v = a.x[tok * a.in_features + start + i];
    if (a.hadamard && a.signs) v *= a.signs[i];
    xs[pidx(f)] = v;
  }
  __syncthreads();
  float scale = 1.0f;
  if (a.hadamard) {
    detail::fwht_smem(xs, total, 1, p);  // ends with a barrier
    scale = rsqrtf(static_cast<float>(p));
  }

  // xsum: one warp per token, by the first column tile only.
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (blockIdx.y == 0 && warp < TOK) {
    float sum = 0.0f;
    for (int i = lane; i < p; i += 32) sum += xs[pidx(warp * p + i)];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const int64_t tok = t0 + warp;
    if (lane == 0 && tok < a.batch) a.xsum[tok * a.nb + b] = sum * scale;
  }

  // xt_b[j] = sum_i D[i, j] x'[i]: thread (slice, jj) sums i = slice, slice + kSlices, ...
  const int jj = threadIdx.x % kActCols, slice = threadIdx.x / kActCols;
  const int j = j0 + jj;
  float acc[TOK];
#pragma unroll
  for (int t = 0; t < TOK; ++t) acc[t] = 0.0f;
  if (j < m) {
#pragma unroll 4
    for (int i = slice; i < p; i += kSlices) {
      const float d = __ldg(D + static_cast<int64_t>(i) * m + j);
#pragma unroll
      for (int t = 0; t < TOK; ++t) acc[t] = fmaf(d, xs[pidx(t * p + i)], acc[t]);
    }
  }
#pragma unroll
  for (int t = 0; t < TOK; ++t) red[slice][t][jj] = acc[t];
  __syncthreads();
  if (slice == 0 && j < cc) {
#pragma unroll
    for (int t = 0; t < TOK; ++t) {
      const int64_t tok = t0 + t;
      if (tok >= a.batch) break;
      float v = 0.0f;
#pragma unroll
      for (int q = 0; q < kSlices; ++q) v += red[q][t][jj];
      a.xt[tok * a.cols + b * a.cc0 + j] = j < m ? v * scale : 0.0f;  // zeros in the padding
    }
  }
}

template <int TOK>
Status launch_act(const ActArgs& base, const ActPlan& plan, const detail::DeviceInfo& dev,
                  cudaStream_t s) {
  void (*kernel)(const ActArgs) = act_kernel<TOK>;
  if (plan.smem_bytes > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(
        reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(plan.smem_bytes));
    if (e != cudaSuccess) return detail::fail(e);
  }
  (void)dev;
  for (int64_t tile = 0; tile < plan.token_tiles; tile += kMaxGridYZ) {
    ActArgs a = base;
    a.tok_base = tile * TOK;
    const int64_t tiles = plan.token_tiles - tile < kMaxGridYZ ? plan.token_tiles - tile : kMaxGridYZ;
    const dim3 grid(static_cast<unsigned>(a.nb), static_cast<unsigned>(plan.col_tiles),
                    static_cast<unsigned>(tiles));
    kernel<<<grid, kActThreads, static_cast<size_t>(plan.smem_bytes), s>>>(a);
    const Status st = detail::check_launch();
    if (st != Status::ok) return st;
  }
  return Status::ok;
}

// ------------------------------------------------------------------ add-only GEMM

struct GemmArgs {
  detail::GemmBuffers io;
  int64_t out, batch, words, cols, nb, wpb;
  int64_t chunks, chunks_per_split;
  int64_t tok_base;
  bool atomic;
};

// CW words of `row` from word c0 into w; zeros past the row's end or for an invalid row.
template <int CW, int VEC>
__device__ __forceinline__ void load_words(const word_t* __restrict__ row, int64_t c0,
                                           int64_t words, bool ok, word_t (&w)[CW]) {
  if (ok && c0 + CW <= words) {
    const word_t* p = row + c0;
    if constexpr (VEC == 4) {
#pragma unroll
      for (int q = 0; q < CW / 4; ++q) {
        const uint4 v = __ldg(reinterpret_cast<const uint4*>(p) + q);
        w[4 * q] = v.x; w[4 * q + 1] = v.y; w[4 * q + 2] = v.z; w[4 * q + 3] = v.w;
      }
    } else if constexpr (VEC == 2) {
#pragma unroll
      for (int q = 0; q < CW / 2; ++q) {
        const uint2 v = __ldg(reinterpret_cast<const uint2*>(p) + q);
        w[2 * q] = v.x; w[2 * q + 1] = v.y;
      }
    } else {
#pragma unroll
      for (int q = 0; q < CW; ++q) w[q] = __ldg(p + q);
    }
  } else {
#pragma unroll
    for (int q = 0; q < CW; ++q) w[q] = (ok && c0 + q < words) ? __ldg(row + c0 + q) : 0u;
  }
}

template <int TB, int CW, bool TERN, int VEC>
__global__ void __launch_bounds__(kGemmThreads) addonly_kernel(const GemmArgs a) {
  extern __shared__ float4 lut4[];
  const float* lut = reinterpret_cast<const float*>(lut4);
  constexpr int G = CW * 8;  // groups of 4 codes per chunk (per token)

  const int64_t r = static_cast<int64_t>(blockIdx.x) * kGemmThreads + threadIdx.x;
  const bool row_ok = r < a.out;
  const int64_t t0 = a.tok_base + static_cast<int64_t>(blockIdx.z) * TB;
  const int64_t ch_begin = static_cast<int64_t>(blockIdx.y) * a.chunks_per_split;
  const int64_t ch_end_raw = ch_begin + a.chunks_per_split;
  const int64_t ch_end = ch_end_raw < a.chunks ? ch_end_raw : a.chunks;
  const int64_t w_begin = ch_begin * CW;
  const int64_t w_end_raw = ch_end * CW;
  const int64_t w_end = w_end_raw < a.words ? w_end_raw : a.words;

  const word_t* srow = a.io.sign + (row_ok ? r : 0) * a.words;
  const word_t* nrow = TERN ? a.io.nonzero + (row_ok ? r : 0) * a.words : nullptr;
  const uint16_t* srow_scale = a.io.scale + (row_ok ? r : 0) * a.nb;
  const uint16_t* srow_mean = a.io.mean + (row_ok ? r : 0) * a.nb;

  float acc[TB], blk[TB];
#pragma unroll
  for (int t = 0; t < TB; ++t) acc[t] = blk[t] = 0.0f;
  int64_t b = w_begin / a.wpb;
  int64_t bnd = (b + 1) * a.wpb;

  // acc += S[r,b] * blk (+ MU[r,b] * xsum[t,b] if block b starts in this split); blk = 0.
  auto flush = [&](int64_t blkidx) {
    const float sc = row_ok ? __half2float(__ushort_as_half(srow_scale[blkidx])) : 0.0f;
    const bool first = blkidx * a.wpb >= w_begin;
    const float mu = (row_ok && first) ? __half2float(__ushort_as_half(srow_mean[blkidx])) : 0.0f;
#pragma unroll
    for (int t = 0; t < TB; ++t) {
      const int64_t tok = t0 + t;
      const float xs = (first && tok < a.batch) ? __ldg(a.io.xsum + tok * a.nb + blkidx) : 0.0f;
      acc[t] = fmaf(sc, blk[t], fmaf(mu, xs, acc[t]));
      blk[t] = 0.0f;
    }
  };

  for (int64_t ch = ch_begin; ch < ch_end; ++ch) {
    const int64_t c0 = ch * CW;
    word_t ws[CW], wn[CW];
    load_words<CW, VEC>(srow, c0, a.words, row_ok, ws);
    if constexpr (TERN) load_words<CW, VEC>(nrow, c0, a.words, row_ok, wn);

    __syncthreads();  // the previous chunk's tables are consumed
    for (int task = threadIdx.x; task < TB * G; task += kGemmThreads) {
      const int t = task / G, g = task % G;
      const int64_t tok = t0 + t;
      const int64_t col = c0 * 32 + g * 4;
      float xv[4];
#pragma unroll
      for (int k = 0; k < 4; ++k)
        xv[k] = (tok < a.batch && col + k < a.cols) ? __ldg(a.io.xt + tok * a.cols + col + k)
                                                    : 0.0f;
      // Subset sums by doubling: e[v + 2^k] = e[v] + d_k for v < 2^k (all indices constant).
      const float d0 = TERN ? xv[0] : 2.0f * xv[0], d1 = TERN ? xv[1] : 2.0f * xv[1];
      const float d2 = TERN ? xv[2] : 2.0f * xv[2], d3 = TERN ? xv[3] : 2.0f * xv[3];
      const float e0 = TERN ? 0.0f : -((xv[0] + xv[1]) + (xv[2] + xv[3]));
      const float e1 = e0 + d0, e2 = e0 + d1, e3 = e1 + d1;
      const float e4 = e0 + d2, e5 = e1 + d2, e6 = e2 + d2, e7 = e3 + d2;
      float4* dst = lut4 + (t * G + g) * 4;
      dst[0] = make_float4(e0, e1, e2, e3);
      dst[1] = make_float4(e4, e5, e6, e7);
      dst[2] = make_float4(e0 + d3, e1 + d3, e2 + d3, e3 + d3);
      dst[3] = make_float4(e4 + d3, e5 + d3, e6 + d3, e7 + d3);
    }
    __syncthreads();

#pragma unroll
    for (int j = 0; j < CW; ++j) {
      const int64_t w = c0 + j;
      if (w < w_end) {  // uniform across the CTA
        if (w == bnd) {
          flush(b);
          ++b;
          bnd += a.wpb;
        }
        const word_t plus = TERN ? (wn[j] & ws[j]) : ws[j];
        const word_t minus = TERN ? (wn[j] & ~ws[j]) : 0u;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const int ip = (plus >> (4 * k)) & 15;
          const int im = (minus >> (4 * k)) & 15;
#pragma unroll
          for (int t = 0; t < TB; ++t) {
            const float* tab = lut + (t * G + j * 8 + k) * 16;
            blk[t] += tab[ip];
            if constexpr (TERN) blk[t] -= tab[im];
          }
        }
      }
    }
  }
  if (w_begin < w_end) flush(b);

  if (row_ok) {
#pragma unroll
    for (int t = 0; t < TB; ++t) {
      const int64_t tok = t0 + t;
      if (tok < a.batch) {
        float* dst = a.io.y + tok * a.out + r;
        if (a.atomic) atomicAdd(dst, acc[t]);
        else *dst = acc[t];
      }
    }
  }
}

template <int TB, bool TERN, int VEC>
Status launch_gemm_v(const GemmArgs& base, const GemmPlan& plan, cudaStream_t s) {
  constexpr int CW = TB >= 16 ? 4 : 8;
  if (plan.chunk_words != CW) return Status::bad_size;  // plan and kernel disagree (a bug)
  for (int64_t tile = 0; tile < plan.token_tiles; tile += kMaxGridYZ) {
    GemmArgs a = base;
    a.tok_base = tile * TB;
    const int64_t tiles = plan.token_tiles - tile < kMaxGridYZ ? plan.token_tiles - tile : kMaxGridYZ;
    const dim3 grid(static_cast<unsigned>(plan.row_tiles), static_cast<unsigned>(plan.splits),
                    static_cast<unsigned>(tiles));
    addonly_kernel<TB, CW, TERN, VEC>
        <<<grid, kGemmThreads, static_cast<size_t>(plan.smem_bytes), s>>>(a);
    const Status st = detail::check_launch();
    if (st != Status::ok) return st;
  }
  return Status::ok;
}

template <int TB, bool TERN>
Status launch_gemm_t(const GemmArgs& a, const GemmPlan& plan, int vec, cudaStream_t s) {
  if (vec == 4) return launch_gemm_v<TB, TERN, 4>(a, plan, s);
  if (vec == 2) return launch_gemm_v<TB, TERN, 2>(a, plan, s);
  return launch_gemm_v<TB, TERN, 1>(a, plan, s);
}

template <bool TERN>
Status launch_gemm(const GemmArgs& a, const GemmPlan& plan, int vec, cudaStream_t s) {
  switch (plan.tokens) {
    case 1: return launch_gemm_t<1, TERN>(a, plan, vec, s);
    case 2: return launch_gemm_t<2, TERN>(a, plan, vec, s);
    case 4: return launch_gemm_t<4, TERN>(a, plan, vec, s);
    case 8: return launch_gemm_t<8, TERN>(a, plan, vec, s);
    case 16: return launch_gemm_t<16, TERN>(a, plan, vec, s);
    default: return Status::bad_size;
  }
}

using detail::aligned;

// All pointers float-aligned (null ones pass: the callers check those separately).
bool floats_aligned(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (!aligned(p, sizeof(float))) return false;
  return true;
}

// a * b would overflow int64 (a, b >= 0): the kernels index with int64 products of these sizes.
bool product_overflows(int64_t a, int64_t b) { return b != 0 && a > INT64_MAX / b; }

Status act_checked(const BlockLayout& L, bool hadamard, const float* signs, const float* down_full,
                   const float* down_last, const float* x, int64_t batch, float* xt, float* xsum,
                   void* stream) {
  if (!L.valid() || batch < 0) return Status::bad_size;
  if (batch == 0) return Status::ok;
  if (!x || !xt || !xsum || !down_last) return Status::null_pointer;
  const int64_t nb = L.num_blocks();
  if (nb > 1 && !down_full) return Status::null_pointer;
  if (L.padded(0) > 32768 || nb > kMaxGridX) return Status::bad_size;
  if (product_overflows(batch, L.in_features) || product_overflows(batch, L.total_code_cols()))
    return Status::bad_size;
  if (!floats_aligned({signs, down_full, down_last, x, xt, xsum})) return Status::bad_pointer;
  detail::DeviceInfo dev{};
  const Status st = detail::device_info(&dev);
  if (st != Status::ok) return st;
  const ActPlan plan = plan_activation_transform(L, batch);
  if (plan.smem_bytes > dev.smem_optin) return Status::bad_size;
  ActArgs a{};
  a.x = x;
  a.signs = signs;
  a.down_full = down_full;
  a.down_last = down_last;
  a.xt = xt;
  a.xsum = xsum;
  a.batch = batch;
  a.in_features = L.in_features;
  a.block_size = L.block_size;
  a.nb = nb;
  a.cols = L.total_code_cols();
  a.cc0 = L.code_cols(0);
  a.tok_base = 0;
  a.log2p0 = log2_int(L.padded(0));
  a.m0 = static_cast<int>(L.m(0));
  a.log2pl = log2_int(L.padded(nb - 1));
  a.ml = static_cast<int>(L.m(nb - 1));
  a.ccl = static_cast<int>(L.code_cols(nb - 1));
  a.hadamard = hadamard;
  auto* s = static_cast<cudaStream_t>(stream);
  return plan.tokens == 4 ? launch_act<4>(a, plan, dev, s) : launch_act<1>(a, plan, dev, s);
}

Status gemm_checked(const BlockLayout& L, Levels levels, const word_t* sign, const word_t* nonzero,
                    const uint16_t* scale, const uint16_t* mean, int64_t out, const float* xt,
                    const float* xsum, int64_t batch, float* y, void* stream,
                    GemmKernel kernel) {
  if (levels != Levels::binary && levels != Levels::ternary) return Status::bad_levels;
  if (kernel != GemmKernel::automatic && kernel != GemmKernel::table &&
      kernel != GemmKernel::warp_rows && kernel != GemmKernel::tensor)
    return Status::bad_size;
  if (!L.valid() || out < 0 || batch < 0) return Status::bad_size;
  if (out == 0 || batch == 0) return Status::ok;
  const bool tern = levels == Levels::ternary;
  if (!sign || !scale || !mean || !xt || !xsum || !y || (tern && !nonzero))
    return Status::null_pointer;
  if (product_overflows(out, L.words_per_row()) || product_overflows(batch, L.total_code_cols()) ||
      product_overflows(batch, out) || product_overflows(batch * out, sizeof(float)))
    return Status::bad_size;
  if (!aligned(sign, sizeof(word_t)) || !aligned(nonzero, sizeof(word_t)) ||
      !aligned(scale, sizeof(uint16_t)) || !aligned(mean, sizeof(uint16_t)) ||
      !floats_aligned({xt, xsum, y}))
    return Status::bad_pointer;
  auto* s = static_cast<cudaStream_t>(stream);
  const detail::GemmBuffers io{sign, tern ? nonzero : nullptr, scale, mean, xt, xsum, y};
  if (kernel == GemmKernel::warp_rows) return detail::warp_rows_gemm(L, io, out, batch, s);
  detail::DeviceInfo dev{};
  Status st = detail::device_info(&dev);
  if (st != Status::ok) return st;
  if (kernel == GemmKernel::tensor) {
    if (dev.cc_major < 8) return Status::bad_value;
    return detail::tensor_rows_gemm(L, io, out, batch, dev.sms, s);
  }
  const GemmPlan plan = plan_addonly_gemm(L, out, batch, dev.sms);
  if (plan.row_tiles > kMaxGridX || plan.splits > kMaxGridYZ) return Status::bad_size;
  GemmArgs a{};
  a.io = io;
  a.out = out;
  a.batch = batch;
  a.words = plan.words;
  a.cols = L.total_code_cols();
  a.nb = L.num_blocks();
  a.wpb = L.code_cols(0) / 32;
  a.chunks = plan.chunks;
  a.chunks_per_split = plan.chunks_per_split;
  a.tok_base = 0;
  a.atomic = plan.splits > 1;
  int vec = 1;
  if (plan.words % 4 == 0 && aligned(sign, 16) && (!tern || aligned(nonzero, 16))) vec = 4;
  else if (plan.words % 2 == 0 && aligned(sign, 8) && (!tern || aligned(nonzero, 8))) vec = 2;
  if (a.atomic) {
    const Status zs = detail::zero_output(y, batch, out, s);
    if (zs != Status::ok) return zs;
  }
  return tern ? launch_gemm<true>(a, plan, vec, s) : launch_gemm<false>(a, plan, vec, s);
}

}  // namespace

Status activation_transform(const BlockLayout& L, bool hadamard, const float* signs,
                            const float* down_full, const float* down_last, const float* x,
                            int64_t batch, float* xt, float* xsum, void* stream) noexcept {
  return sdq::detail::guarded([&] {
    return act_checked(L, hadamard, signs, down_full, down_last, x, batch, xt, xsum, stream);
  });
}

Status addonly_gemm(const BlockLayout& L, Levels levels, const word_t* sign,
                    const word_t* nonzero, const uint16_t* scale, const uint16_t* mean,
                    int64_t out, const float* xt, const float* xsum, int64_t batch, float* y,
                    void* stream, GemmKernel kernel) noexcept {
  return sdq::detail::guarded([&] {
    return gemm_checked(L, levels, sign, nonzero, scale, mean, out, xt, xsum, batch, y, stream,
                        kernel);
  });
}

}  // namespace sdq::cuda
