// Tensor-core add-only GEMV/GEMM (kernel=tensor, opt-in; plan: plan_tensor_rows in sdq/cuda.h).
//
// Why: every code costs an instruction or more in the float kernels (table lookups, predicated
// adds), and those kernels pay it again for every token. Here the codes become the A operand of
// bf16 tensor-core products (mma.sync m16n8k16, fp32 accumulation) and up to 8 tokens (16 with
// two n tiles) share each unpacked code. A code's bf16 +-1 is its bit moved to the sign of 1.0:
//   ((w << (15 - p)) & 0x80008000) ^ 0xBF80BF80
// gives, in one shift and one LOP3, the bf16 pair (bit p, bit p + 16) of word w: 0x3F80 (+1) for
// a set bit, 0xBF80 (-1) for a clear one. So the products are exact and the only rounding is
// the activations' to bf16 (round to nearest even) before the product, as on the CPU's bf16 path.
// Ternary runs the +1 codes (nonzero & sign) and the -1 codes (nonzero & ~sign) as two binary
// products: (2P - 1) x - (2M - 1) x = 2 (P - M) x.
//
// K order: an mma's reduction order is free as long as A and B agree. Thread (g = lane / 4,
// t = lane % 4) of a warp holds, per 8-word step of a block, words 2t and 2t + 1 of rows g and
// g + 8 of each 16-row tile, and for word h the 16 pairs q = 0..15 of bits (q, q + 16). Its
// k slots in mma (h, kk) are pairs 2 kk (k = 2t, 2t + 1) and 2 kk + 1 (k = 2t + 8, 2t + 9), and
// its B registers hold the activations of the same columns, so A and B meet in one thread and
// nothing is shuffled. A word past its block's end gets zero activations (any code times 0).
//
// Work split: a warp owns kTensorTiles 16-row tiles and 8 * NT tokens, and a CTA's warps own
// consecutive tiles; a CTA takes one split of the row blocks (grid y). Per step a warp converts
// the step's activations to bf16 once and reuses them for all its tiles (its warps read the same
// xt, from L1); it flushes a step's sums with the block's fp16 scale and adds the mean term once
// per block. With one split y is stored; with several, added atomically into y zeroed first.
// Weight words are loaded one step ahead of the products that use them. In-loop offsets are
// 32-bit (the entry point checks they fit).
//
// Measured (H200, 2026-11-28, bench/kernels_gpu.py) only in its first form (commit 9dbfec3): one
// 16-row tile per CTA of 8 warps taking the blocks round robin, 64-bit in-loop index math. It was
// right (whole SDQLinear calls through it, bench/layer_gpu.py: relerr 1.6-1.7e-3 against
// x @ W_hat^T at every shape, the size of bf16 rounding plus fp16 output) but slower than the
// table kernel at every point: 8192x8192 binary OSR 2, batch 1 / 4 / 16: 33.3 / 70.6 / 160.6 us
// against 21.1 / 38.4 / 111.1. ncu (batch 1): 8.3 cycles per issued instruction at 19 warps per
// SM, ~500 instructions per 8-word step of which ~300 were index math and branches, and every
// 16-row CTA re-read all of xt in fp32 (twice the bytes of its codes at batch 1, 8x at batch 4).
// This form (two tiles per warp sharing the bf16 activations, CTAs over row-block splits,
// 32-bit offsets) answers those three; it is compiled and host-tested here but not yet run on a
// GPU (no machine was lent for a second run), so addonly_gemm's automatic choice stays the table
// kernel until tools/gpu_check.sh has tested and timed it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "tensor_rows.cuh"

namespace sdq::cuda::detail {
namespace {

struct Args {
  GemmBuffers io;
  int out, batch, words, cols, nb, wpb, blocks_per_split;
  int tok_base;
  bool atomic;  // several splits: atomicAdd into y (zeroed by the caller)
  bool vec_w;   // word pairs are 8-byte aligned (words and wpb even, planes 8-byte aligned)
  bool vec_x;   // xt 16-byte aligned: float4 loads
};

// bf16 pair (+-1 for bit p, +-1 for bit p + 16) of w; P is a constant after unrolling.
template <int P>
__device__ __forceinline__ uint32_t pm1(uint32_t w) {
  return ((w << (15 - P)) & 0x80008000u) ^ 0xBF80BF80u;
}

__device__ __forceinline__ uint32_t bf16_pair(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // lo in the low 16 bits
  return *reinterpret_cast<const uint32_t*>(&h);
}

// c += A B, A 16x16 bf16 (rows g, g + 8), B 16x8 bf16, c fp32 (mma.sync, sm_80 and newer).
__device__ __forceinline__ void mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                    uint32_t a3, uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// One step's weight words of a thread: [tile][row g or g + 8][word 2t or 2t + 1] per plane.
template <bool TERN>
struct Codes {
  uint32_t s[kTensorTiles][2][2];
  uint32_t n[kTensorTiles][2][2];
};

// Words wa, wa + 1 of a row (zero from bend on); `row` points at the row's word 0.
template <bool VEC>
__device__ __forceinline__ void load_pair(const word_t* __restrict__ row, int wa, int bend,
                                          uint32_t (&w)[2]) {
  if (VEC && wa + 1 < bend) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(row + wa));
    w[0] = v.x;
    w[1] = v.y;
  } else {
    w[0] = wa < bend ? __ldg(row + wa) : 0u;
    w[1] = wa + 1 < bend ? __ldg(row + wa + 1) : 0u;
  }
}

template <bool TERN, bool VEC>
__device__ __forceinline__ void load_codes(const Args& a, const uint32_t (&roff)[kTensorTiles][2],
                                           int wa, int bend, Codes<TERN>& c) {
#pragma unroll
  for (int i = 0; i < kTensorTiles; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      load_pair<VEC>(a.io.sign + roff[i][h], wa, bend, c.s[i][h]);
      if constexpr (TERN) load_pair<VEC>(a.io.nonzero + roff[i][h], wa, bend, c.n[i][h]);
    }
}

// B registers of one word for one token: pairs (x[q], x[q + 16]) in bf16, q < 16; src points at
// the word's 32 activations.
__device__ __forceinline__ void load_b(const float* __restrict__ src, bool ok, bool vec,
                                       uint32_t (&b)[16]) {
  if (!ok) {
#pragma unroll
    for (int q = 0; q < 16; ++q) b[q] = 0u;
    return;
  }
  float x[32];
  if (vec) {
#pragma unroll
    for (int v = 0; v < 8; ++v) {
      const float4 f = __ldg(reinterpret_cast<const float4*>(src) + v);
      x[4 * v] = f.x; x[4 * v + 1] = f.y; x[4 * v + 2] = f.z; x[4 * v + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int k = 0; k < 32; ++k) x[k] = __ldg(src + k);
  }
#pragma unroll
  for (int q = 0; q < 16; ++q) b[q] = bf16_pair(x[q], x[q + 16]);
}

// Products of one word (per row: 16 pairs in 8 mmas) into acc.
template <int NT>
__device__ __forceinline__ void word_products(uint32_t w0, uint32_t w1,
                                              const uint32_t (&b)[NT][16], float (&acc)[NT][4]) {
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    uint32_t a0, a1, a2, a3;
    switch (kk) {  // constant shifts after unrolling
#define SDQ_PAIR(K)                                     \
  case K:                                               \
    a0 = pm1<2 * K>(w0); a2 = pm1<2 * K + 1>(w0);       \
    a1 = pm1<2 * K>(w1); a3 = pm1<2 * K + 1>(w1);       \
    break;
      SDQ_PAIR(0) SDQ_PAIR(1) SDQ_PAIR(2) SDQ_PAIR(3)
      SDQ_PAIR(4) SDQ_PAIR(5) SDQ_PAIR(6) SDQ_PAIR(7)
#undef SDQ_PAIR
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) mma(acc[j], a0, a1, a2, a3, b[j][2 * kk], b[j][2 * kk + 1]);
  }
}

__device__ __forceinline__ float half_at(const uint16_t* p) {
  return __half2float(__ushort_as_half(__ldg(p)));
}

template <int NT, bool TERN, bool VEC>
__global__ void __launch_bounds__(kTensorWarps * 32, NT > 1 && TERN ? 1 : 2)
    tensor_rows_kernel(const Args a) {
  constexpr int RT = kTensorTiles;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int r0 = (blockIdx.x * kTensorWarps + warp) * 16 * RT;  // the warp's first row
  if (r0 >= a.out) return;  // no barrier below: idle warps may leave
  const int t0 = a.tok_base + blockIdx.z * 8 * NT;
  const int b_first = blockIdx.y * a.blocks_per_split;
  const int b_last = min(b_first + a.blocks_per_split, a.nb);  // one past

  // Row offsets of rows g and g + 8 of each tile (a row past `out` reads the last row, never
  // written), the thread's B token per n tile, its two output tokens per n tile.
  uint32_t roff[RT][2], soff[RT][2];
#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = min(r0 + 16 * i + g + 8 * h, a.out - 1);
      roff[i][h] = static_cast<uint32_t>(row) * a.words;
      soff[i][h] = static_cast<uint32_t>(row) * a.nb;
    }
  const float* xrow[NT];
  bool xok[NT];
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int tok = t0 + 8 * j + g;
    xok[j] = tok < a.batch;
    xrow[j] = a.io.xt + static_cast<uint32_t>(xok[j] ? tok : 0) * a.cols;
  }

  float o[RT][NT][4];
#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[i][j][e] = 0.0f;

  int b = b_first, w0 = b * a.wpb, bend = min(w0 + a.wpb, a.words);
  Codes<TERN> cur{}, nxt{};
  if (b < b_last) load_codes<TERN, VEC>(a, roff, w0 + 2 * t, bend, cur);
  while (b < b_last) {
    // Next step: the rest of this block, else the next block of this split.
    int nb_next = b, nw = w0 + 8, nbend = bend;
    if (nw >= bend) {
      nb_next = b + 1;
      nw = nb_next * a.wpb;
      nbend = min(nw + a.wpb, a.words);
    }
    if (nb_next < b_last) load_codes<TERN, VEC>(a, roff, nw + 2 * t, nbend, nxt);

    float acc[RT][NT][4], accm[RT][NT][4];
#pragma unroll
    for (int i = 0; i < RT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = accm[i][j][e] = 0.0f;

#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int w = w0 + 2 * t + h;
      uint32_t bx[NT][16];
#pragma unroll
      for (int j = 0; j < NT; ++j) load_b(xrow[j] + 32 * w, xok[j] && w < bend, a.vec_x, bx[j]);
#pragma unroll
      for (int i = 0; i < RT; ++i) {
        const uint32_t s0 = cur.s[i][0][h], s1 = cur.s[i][1][h];
        if constexpr (TERN) {
          const uint32_t n0 = cur.n[i][0][h], n1 = cur.n[i][1][h];
          word_products<NT>(n0 & s0, n1 & s1, bx, acc[i]);
          word_products<NT>(n0 & ~s0, n1 & ~s1, bx, accm[i]);
        } else {
          word_products<NT>(s0, s1, bx, acc[i]);
        }
      }
    }

    // This step's sums times the block's fp16 scales; the mean term once per block.
    const bool first = w0 == b * a.wpb;
    float xs[NT][2];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int tk = t0 + 8 * j + 2 * t + e;
        xs[j][e] = first && tk < a.batch ? __ldg(a.io.xsum + static_cast<uint32_t>(tk) * a.nb + b)
                                         : 0.0f;
      }
#pragma unroll
    for (int i = 0; i < RT; ++i) {
      const float sa = half_at(a.io.scale + soff[i][0] + b);
      const float sb = half_at(a.io.scale + soff[i][1] + b);
      const float ma = first ? half_at(a.io.mean + soff[i][0] + b) : 0.0f;
      const float mb = first ? half_at(a.io.mean + soff[i][1] + b) : 0.0f;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        float v[4];
#pragma unroll
        for (int e = 0; e < 4; ++e)
          v[e] = TERN ? 0.5f * (acc[i][j][e] - accm[i][j][e]) : acc[i][j][e];
        o[i][j][0] = fmaf(sa, v[0], fmaf(ma, xs[j][0], o[i][j][0]));
        o[i][j][1] = fmaf(sa, v[1], fmaf(ma, xs[j][1], o[i][j][1]));
        o[i][j][2] = fmaf(sb, v[2], fmaf(mb, xs[j][0], o[i][j][2]));
        o[i][j][3] = fmaf(sb, v[3], fmaf(mb, xs[j][1], o[i][j][3]));
      }
    }

    b = nb_next;
    w0 = nw;
    bend = nbend;
    cur = nxt;
  }

#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = r0 + 16 * i + g + (e >= 2 ? 8 : 0);
        const int tok = t0 + 8 * j + 2 * t + (e & 1);
        if (row < a.out && tok < a.batch) {
          float* dst = a.io.y + static_cast<int64_t>(tok) * a.out + row;
          if (a.atomic) atomicAdd(dst, o[i][j][e]);
          else *dst = o[i][j][e];
        }
      }
}

template <int NT, bool TERN>
Status launch(const Args& base, const TensorRowsPlan& p, cudaStream_t s) {
  for (int64_t tile = 0; tile < p.token_tiles; tile += kMaxGridYZ) {
    Args a = base;
    a.tok_base = static_cast<int>(tile * p.tokens);
    const int64_t tiles = p.token_tiles - tile < kMaxGridYZ ? p.token_tiles - tile : kMaxGridYZ;
    const dim3 grid(static_cast<unsigned>(p.row_tiles), static_cast<unsigned>(p.splits),
                    static_cast<unsigned>(tiles));
    if (a.vec_w)
      tensor_rows_kernel<NT, TERN, true><<<grid, kTensorWarps * 32, 0, s>>>(a);
    else
      tensor_rows_kernel<NT, TERN, false><<<grid, kTensorWarps * 32, 0, s>>>(a);
    const Status st = check_launch();
    if (st != Status::ok) return st;
  }
  return Status::ok;
}

template <bool TERN>
Status launch_levels(const Args& a, const TensorRowsPlan& p, cudaStream_t s) {
  if (p.tokens == 8) return launch<1, TERN>(a, p, s);
  if (p.tokens == 16) return launch<2, TERN>(a, p, s);
  return Status::bad_size;  // plan and kernels disagree (a bug)
}

}  // namespace

bool tensor_rows_fits(const BlockLayout& L, int64_t out, int64_t batch) noexcept {
  constexpr int64_t kMax = INT32_MAX;
  return out * L.words_per_row() <= kMax && out * L.num_blocks() <= kMax &&
         batch * L.total_code_cols() <= kMax && batch * L.num_blocks() <= kMax &&
         batch + 16 <= kMax;
}

Status tensor_rows_gemm(const BlockLayout& L, const GemmBuffers& io, int64_t out, int64_t batch,
                        int num_sms, cudaStream_t stream) noexcept {
  if (!tensor_rows_fits(L, out, batch)) return Status::bad_size;
  const TensorRowsPlan p = plan_tensor_rows(L, out, batch, num_sms);
  if (p.row_tiles > kMaxGridX || p.splits > kMaxGridYZ) return Status::bad_size;
  const bool ternary = io.nonzero != nullptr;
  Args a{};
  a.io = io;
  a.out = static_cast<int>(out);
  a.batch = static_cast<int>(batch);
  a.words = static_cast<int>(L.words_per_row());
  a.cols = static_cast<int>(L.total_code_cols());
  a.nb = static_cast<int>(L.num_blocks());
  a.wpb = static_cast<int>(L.code_cols(0) / 32);
  a.blocks_per_split = static_cast<int>(p.blocks_per_split);
  a.atomic = p.splits > 1;
  a.vec_w = a.words % 2 == 0 && a.wpb % 2 == 0 && aligned(io.sign, 8) &&
            (!ternary || aligned(io.nonzero, 8));
  a.vec_x = aligned(io.xt, 16);
  if (a.atomic) {
    const Status zs = zero_output(io.y, batch, out, stream);
    if (zs != Status::ok) return zs;
  }
  return ternary ? launch_levels<true>(a, p, stream) : launch_levels<false>(a, p, stream);
}

}  // namespace sdq::cuda::detail
