// Add-only GEMM on Intel AMX (int8 tile multiply), for prefill batches. Binary: the same codes as
// lut_gemm_binary (its 32-row tile layout, lut_pack_binary) and the same xt/xsum contract
// (gemv.h), computed as a true int8 GEMM instead of per-token table look-ups:
//   y[t, r] = sum_b S[r,b] * <q_rb, xt_b> + MU[r,b] * xsum_b
//
// Spans (binary). Consecutive blocks are taken amx_span_blocks(L) at a time (as many as fit in 512
// code columns, at least one; the last span may be shorter): a span shares one int8 scale per
// token and one per row, so that its int32 sums stay in the tiles without a float rescale per
// block. (512: a 32-token, 32-row tile pair's int8 operands of a span then fit in L1 together.)
// Ternary: every block is its own span and keeps its scale (q = 1, f = S below): multiplying
// trits by q would cost its unpacking more than the per-block rescale it saves.
//
// Activations. Per token t and span p, amax = max |xt[t, k]| over the span's code columns,
//   inv = 127 / amax (float32), a[k] = rint(xt[t, k] * inv) (half to even) in [-127, 127],
//   ascale = amax / 127 (float32);
// a span with amax < 2^-120 (all zero, or denormal activations) gets a = 0 and contributes only
// MU * xsum.
// Scales (binary). Per row r and span p, smax = max |S[r,b]| over the span's blocks, f = smax / 127
// and, per block, q[r,b] = rint(S[r,b] * (127 / smax)) in [-127, 127] (float32; f = q = 0 where
// smax < 2^-120): the block's scale as an int8 multiple of the span's.
// Then y[t, r] = sum_p float(sum_k a[k] * q[r, b(k)] * c[r, k]) * ascale_tp * f_rp
//              + sum_b MU[r,b] * xsum_b (float32),
// c = +-1 (ternary: -1, 0, +1); the integer dot products are exact (int32). Against the exact float
// kernel each code column is off by at most |S| ascale / 2 (activation rounding) + |xt| f / 2
// (binary: scale rounding); the default model's perplexity moves by 0.15-0.25% (README, "Speed").
//
// How: the codes of a 32-row tile and one span are unpacked to int8 (binary: code x q) in AMX's
// B-tile layout (in L1, once per tile and span), then multiplied with every 16-token tile of the
// int8 activations (TDPBSSD, 16 x 16 x 64 per instruction); each span's int32 sums are rescaled
// once; the means' part, sum_b MU xsum, is a small float GEMM of its own.
// Unpacking costs about as much as reading the codes, so this pays from a few tokens up
// (linear_plan.cpp's kAmxMinBatchBinary / kAmxMinBatchTernary); batch 1 stays with the look-up
// kernels.
//
// Needs AMX-TILE, AMX-INT8, AVX-512 BW and VBMI, BMI2, and the OS's permission to use the tile state
// (Linux: arch_prctl(ARCH_REQ_XCOMP_PERM), requested once per process by amx_gemm_supported).
// Without them the functions return Status::not_built.
#pragma once
#include <cstdint>

#include "sdq/layout.h"
#include "sdq/status.h"

namespace sdq {

// Whether this CPU and OS can run the AMX GEMMs (the first call asks the OS for the tile state).
bool amx_gemm_supported() noexcept;

// Blocks per span of the binary kernel (above): as many full blocks as fit in 512 code
// columns, at least one.
inline int64_t amx_span_blocks(const BlockLayout& L) noexcept {
  const int64_t cols = L.code_cols(0);
  return cols >= 512 ? 1 : 512 / cols;
}

// packed: lut_pack_binary's tiles (lut_gemm.h). scale, mean: [out, L.num_blocks()] fp16 bit
// patterns. xt: [batch, L.total_code_cols()], xsum: [batch, L.num_blocks()] from
// activation_transform. y: [batch, out] float32. threads <= 0: all hardware threads.
Status amx_gemm_binary(const BlockLayout& L, const uint8_t* packed, const uint16_t* scale,
                       const uint16_t* mean, int64_t out, const float* xt, const float* xsum,
                       int64_t batch, float* y, int threads = 0) noexcept;

// The same for ternary codes in trit5 form (trit5.h: trits, trit_signs), with the rules above for
// one-block spans: groups of 3 code columns become 4 int8 lanes (the 4th zero) so that each group
// is one dword of a B tile. Everything else as amx_gemm_binary.
Status amx_gemm_ternary(const BlockLayout& L, const uint8_t* trits, const uint32_t* trit_signs,
                        const uint16_t* scale, const uint16_t* mean, int64_t out, const float* xt,
                        const float* xsum, int64_t batch, float* y, int threads = 0) noexcept;

// activation_transform (gemv.h) as the prepared int8-GEMM calls run it (linear_plan.h): the
// projection onto the code positions in bf16 on AMX (the rotated activations and the
// down-samplers rounded to bf16, half to even, products summed in float32; xsum as
// activation_transform's), since the int8 GEMMs (AMX and tables) round its output to int8
// next. This entry packs the down-samplers on every call (a plan packs them once).
// Status::not_built without AMX-BF16 and AVX512-BF16.
bool activation_transform_bf16_supported() noexcept;
Status activation_transform_bf16(const BlockLayout& L, bool hadamard, const float* signs,
                                 const float* down_full, const float* down_last, const float* x,
                                 int64_t batch, float* xt, float* xsum, int threads = 0) noexcept;

}  // namespace sdq
