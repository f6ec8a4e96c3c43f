// Binary add-only GEMV/GEMM with int8 look-up tables (T-MAC style), for layers whose codes are
// binary ({-1,+1}, sign bitplane only). Same math and xt/xsum contract as addonly_gemm (gemv.h):
//   y[t, r] = sum_b S[r,b] * <q_rb, xt_b> + MU[r,b] * xsum_b
// but <q_rb, xt_b> is computed from int8 tables, so the result is rounded (below).
//
// Tables (built once per call, shared by every row). Code columns are cut into groups of 4
// ("nibbles"). For token t and group g of block b, with x_j = xt[t, 4g + j]:
//   e[i] = ((s0 x0 + s1 x1) + s2 x2) + s3 x3   in float32, s_j = +1 if bit j of i is set, else -1
// (the +-1 code sums themselves, so no 2*sum - total correction is needed). One scale per
// (token, block): amax = max |e| over the block's groups (= max_g |x0|+|x1|+|x2|+|x3|),
//   inv = 127 / amax (float32), q[i] = rint(e[i] * inv) (half to even), clamped to [-127, 127],
//   tscale = amax / 127 (float32).
// A block with amax < 2^-120 (all zero, or denormal activations) gets q = 0 and contributes only
// MU * xsum: inv would overflow there, and such a block adds less than 1e-33 per unit scale.
// Then y[t, r] = sum_b (float(sum_g q_t[g][nibble_rg]) * tscale_tb) * S[r,b] + MU[r,b] * xsum_tb;
// the integer sums are exact (int16 lanes flushed to int32 before they can overflow).
// The error against the exact float kernel is at most S * tscale / 2 per group of the block.
//
// Packed layout (lut_pack_binary, once per layer at load): rows are cut into tiles of 32
// (kLutTileRows); rows past `out` in the last tile are zero. A tile occupies
// lut_tile_bytes(L) = 4 * L.words_per_row() * 32 bytes; within a tile, byte p * 32 + i is byte p
// of row i's sign bitplane (little-endian words: byte p holds code columns 8p .. 8p+7), i.e. the
// low nibble is group 2p and the high nibble group 2p+1 of 32 consecutive rows: one 32-byte
// load feeds a vpshufb look-up of 32 rows. Same size as the bitplanes plus the tile padding.
#pragma once
#include <cstdint>

#include "sdq/bitplane.h"
#include "sdq/layout.h"
#include "sdq/status.h"

namespace sdq {

constexpr int64_t kLutTileRows = 32;

// The variants of lut_gemm_binary. `automatic` is the best one this CPU supports; naming another
// one (tests, benchmarks) returns Status::not_built when this CPU cannot run it.
enum class LutKernel : int {
  automatic = 0,
  portable = 1,  // one row at a time, scalar look-ups
  avx2 = 2,      // vpshufb on 32 rows x 8 codes per 32-byte vector, int16 sums
  avx512 = 3,    // AVX-512BW: 32 rows x 16 codes per 64-byte vector
  avx512_vnni = 4,  // AVX-512 VBMI + VNNI: vpermb on 64-entry tables, vpdpbusd into int32
  neon = 5,         // AArch64: tbl on 16 rows x 8 codes per pair of registers, int16 sums
};

// Bytes of one 32-row tile, and of the packed codes of `out` rows.
int64_t lut_tile_bytes(const BlockLayout& L) noexcept;
int64_t lut_packed_bytes(const BlockLayout& L, int64_t out) noexcept;

// sign_planes: [out, L.words_per_row()] binary sign bitplanes (bitplane.h).
// packed: lut_packed_bytes(L, out) bytes, written completely (tile padding included).
Status lut_pack_binary(const BlockLayout& L, const word_t* sign_planes, int64_t out,
                       uint8_t* packed, int threads = 0) noexcept;

// packed: from lut_pack_binary. scale, mean: [out, L.num_blocks()] fp16 bit patterns.
// xt: [batch, L.total_code_cols()], xsum: [batch, L.num_blocks()] from activation_transform.
// y: [batch, out] float32 output. threads <= 0: all hardware threads.
Status lut_gemm_binary(const BlockLayout& L, const uint8_t* packed, const uint16_t* scale,
                       const uint16_t* mean, int64_t out, const float* xt, const float* xsum,
                       int64_t batch, float* y, int threads = 0,
                       LutKernel kernel = LutKernel::automatic) noexcept;

// Name of a variant ("portable", "avx2", "avx512", "avx512-vnni", "neon"; automatic: the one chosen for this CPU);
// "unknown" otherwise.
const char* lut_kernel_name(LutKernel kernel = LutKernel::automatic) noexcept;

// Whether this CPU can run a variant (automatic and portable: always).
bool lut_kernel_supported(LutKernel kernel) noexcept;

}  // namespace sdq
