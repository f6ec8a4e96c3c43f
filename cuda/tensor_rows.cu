// Tensor-core add-only GEMV/GEMM (kernel=tensor; plan and layout: plan_tensor_rows in sdq/cuda.h).
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
// Work split: a CTA owns 16 * RT rows and 8 * NT tokens; its kTensorWarps warps take the row
// blocks round robin (block b to warp b % kTensorWarps), each flushes a block's sum with the
// block's fp16 scale and adds the mean term once, and the warps' partials are added in shared
// memory: y is written once, in a fixed order (no atomics). Weight words are loaded one step
// ahead of the products that use them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"
#include "tensor_rows.cuh"

namespace sdq::cuda::detail {
namespace {

struct Args {
  const word_t* sign;
  const word_t* nonzero;
  const uint16_t* scale;
  const uint16_t* mean;
  const float* xt;
  const float* xsum;
  float* y;
  int64_t out, batch, words, cols, nb, wpb;
  int64_t tok_base;
  bool vec_w;  // word pairs are 8-byte aligned (words and wpb even, planes 8-byte aligned)
  bool vec_x;  // xt 16-byte aligned: float4 loads
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
template <int RT, bool TERN>
struct Codes {
  uint32_t s[RT][2][2];
  uint32_t n[RT][2][2];
};

// Words wa, wa + 1 of `row` in `plane` (zero past bend).
template <bool VEC>
__device__ __forceinline__ void load_pair(const word_t* __restrict__ plane, int64_t at,
                                          int64_t wa, int64_t bend, uint32_t (&w)[2]) {
  if (VEC && wa + 1 < bend) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(plane + at));
    w[0] = v.x;
    w[1] = v.y;
  } else {
    w[0] = wa < bend ? __ldg(plane + at) : 0u;
    w[1] = wa + 1 < bend ? __ldg(plane + at + 1) : 0u;
  }
}

template <int RT, bool TERN, bool VEC>
__device__ __forceinline__ void load_codes(const Args& a, int64_t r0, int g, int64_t wa,
                                           int64_t bend, Codes<RT, TERN>& c) {
#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      int64_t row = r0 + 16 * i + g + 8 * h;
      if (row >= a.out) row = a.out - 1;  // read, never written
      const int64_t at = row * a.words + wa;
      load_pair<VEC>(a.sign, at, wa, bend, c.s[i][h]);
      if constexpr (TERN) load_pair<VEC>(a.nonzero, at, wa, bend, c.n[i][h]);
    }
}

// B registers of word w for one token: pairs (x[32w + q], x[32w + q + 16]) in bf16, q < 16.
__device__ __forceinline__ void load_b(const Args& a, int64_t tok, int64_t w, bool ok,
                                       uint32_t (&b)[16]) {
  if (!ok) {
#pragma unroll
    for (int q = 0; q < 16; ++q) b[q] = 0u;
    return;
  }
  const float* src = a.xt + tok * a.cols + w * 32;
  float x[32];
  if (a.vec_x) {
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

template <int RT, int NT, bool TERN, bool VEC>
__global__ void __launch_bounds__(kTensorWarps * 32, NT > 1 ? 1 : TERN ? 2 : 3)
    tensor_rows_kernel(const Args a) {
  constexpr int kOuts = RT * NT * 4;  // a thread's output fragment values
  __shared__ float part[kTensorWarps][kOuts][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * 16 * RT;
  const int64_t t0 = a.tok_base + static_cast<int64_t>(blockIdx.y) * 8 * NT;

  float o[RT][NT][4];
#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[i][j][e] = 0.0f;

  // The warp's steps: blocks b = warp, warp + kTensorWarps, ...; 8 words of a block per step.
  int64_t b = warp, w0 = b * a.wpb;
  auto bend_of = [&](int64_t blk) {
    const int64_t e = (blk + 1) * a.wpb;
    return e < a.words ? e : a.words;
  };
  Codes<RT, TERN> cur{}, nxt{};
  if (b < a.nb) load_codes<RT, TERN, VEC>(a, r0, g, w0 + 2 * t, bend_of(b), cur);

  while (b < a.nb) {
    const int64_t bend = bend_of(b);
    // Next step: the rest of this block, else this warp's next block.
    int64_t next_b = b, nw = w0 + 8;
    if (nw >= bend) {
      next_b = b + kTensorWarps;
      nw = next_b * a.wpb;
    }
    if (next_b < a.nb) load_codes<RT, TERN, VEC>(a, r0, g, nw + 2 * t, bend_of(next_b), nxt);

    float acc[RT][NT][4], accm[RT][NT][4];
#pragma unroll
    for (int i = 0; i < RT; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = accm[i][j][e] = 0.0f;

#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t w = w0 + 2 * t + h;
      uint32_t bx[NT][16];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int64_t tok = t0 + 8 * j + g;
        load_b(a, tok, w, w < bend && tok < a.batch, bx[j]);
      }
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

    // This step's sums, scaled by the block's fp16 scales; the mean term once per block.
    const bool first = w0 == b * a.wpb;
#pragma unroll
    for (int i = 0; i < RT; ++i) {
      int64_t ra = r0 + 16 * i + g, rb = ra + 8;
      if (ra >= a.out) ra = a.out - 1;
      if (rb >= a.out) rb = a.out - 1;
      const float sa = __half2float(__ushort_as_half(__ldg(a.scale + ra * a.nb + b)));
      const float sb = __half2float(__ushort_as_half(__ldg(a.scale + rb * a.nb + b)));
      const float ma = first ? __half2float(__ushort_as_half(__ldg(a.mean + ra * a.nb + b))) : 0.f;
      const float mb = first ? __half2float(__ushort_as_half(__ldg(a.mean + rb * a.nb + b))) : 0.f;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int64_t tk = t0 + 8 * j + 2 * t;
        const float x0 = first && tk < a.batch ? __ldg(a.xsum + tk * a.nb + b) : 0.0f;
        const float x1 = first && tk + 1 < a.batch ? __ldg(a.xsum + (tk + 1) * a.nb + b) : 0.0f;
        float v[4];
#pragma unroll
        for (int e = 0; e < 4; ++e)
          v[e] = TERN ? 0.5f * (acc[i][j][e] - accm[i][j][e]) : acc[i][j][e];
        o[i][j][0] = fmaf(sa, v[0], fmaf(ma, x0, o[i][j][0]));
        o[i][j][1] = fmaf(sa, v[1], fmaf(ma, x1, o[i][j][1]));
        o[i][j][2] = fmaf(sb, v[2], fmaf(mb, x0, o[i][j][2]));
        o[i][j][3] = fmaf(sb, v[3], fmaf(mb, x1, o[i][j][3]));
      }
    }

    b = next_b;
    w0 = nw;
    cur = nxt;
  }

  // The warps' partials, added in a fixed order.
#pragma unroll
  for (int i = 0; i < RT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) part[warp][(i * NT + j) * 4 + e][lane] = o[i][j][e];
  __syncthreads();
  for (int f = threadIdx.x; f < kOuts * 32; f += kTensorWarps * 32) {
    const int l = f & 31, e = (f >> 5) & 3, ij = f >> 7;
    const int i = ij / NT, j = ij % NT;
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < kTensorWarps; ++w) s += part[w][f >> 5][l];
    const int64_t row = r0 + 16 * i + (l >> 2) + (e >= 2 ? 8 : 0);
    const int64_t tok = t0 + 8 * j + 2 * (l & 3) + (e & 1);
    if (row < a.out && tok < a.batch) a.y[tok * a.out + row] = s;
  }
}

template <int RT, int NT, bool TERN>
Status launch(const Args& base, const TensorRowsPlan& p, cudaStream_t s) {
  for (int64_t tile = 0; tile < p.token_tiles; tile += kMaxGridYZ) {
    Args a = base;
    a.tok_base = tile * p.tokens;
    const int64_t tiles = p.token_tiles - tile < kMaxGridYZ ? p.token_tiles - tile : kMaxGridYZ;
    const dim3 grid(static_cast<unsigned>(p.row_tiles), static_cast<unsigned>(tiles));
    if (a.vec_w)
      tensor_rows_kernel<RT, NT, TERN, true><<<grid, kTensorWarps * 32, 0, s>>>(a);
    else
      tensor_rows_kernel<RT, NT, TERN, false><<<grid, kTensorWarps * 32, 0, s>>>(a);
    const Status st = check_launch();
    if (st != Status::ok) return st;
  }
  return Status::ok;
}

template <bool TERN>
Status launch_levels(const Args& a, const TensorRowsPlan& p, cudaStream_t s) {
  if (p.rows_per_cta != 16) return Status::bad_size;  // plan and kernels disagree (a bug)
  if (p.tokens == 8) return launch<1, 1, TERN>(a, p, s);
  if (p.tokens == 16) return launch<1, 2, TERN>(a, p, s);
  return Status::bad_size;
}

}  // namespace

Status tensor_rows_gemm(const BlockLayout& L, bool ternary, const word_t* sign,
                        const word_t* nonzero, const uint16_t* scale, const uint16_t* mean,
                        int64_t out, const float* xt, const float* xsum, int64_t batch, float* y,
                        cudaStream_t stream) noexcept {
  const TensorRowsPlan p = plan_tensor_rows(out, batch);
  if (p.row_tiles > kMaxGridX) return Status::bad_size;
  Args a{};
  a.sign = sign;
  a.nonzero = ternary ? nonzero : nullptr;
  a.scale = scale;
  a.mean = mean;
  a.xt = xt;
  a.xsum = xsum;
  a.y = y;
  a.out = out;
  a.batch = batch;
  a.words = L.words_per_row();
  a.cols = L.total_code_cols();
  a.nb = L.num_blocks();
  a.wpb = L.code_cols(0) / 32;
  a.vec_w = a.words % 2 == 0 && a.wpb % 2 == 0 && aligned(sign, 8) &&
            (!ternary || aligned(nonzero, 8));
  a.vec_x = aligned(xt, 16);
  return ternary ? launch_levels<true>(a, p, stream) : launch_levels<false>(a, p, stream);
}

}  // namespace sdq::cuda::detail
