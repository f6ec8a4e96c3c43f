// Add-only GEMM of a weight packed by dynamic grouping (WGM; docs/format.md, "WGM layers").
//
// A WGM weight is W[o, i] = sign(o, i) * scale(o, i, index(o, i)): one sign bit and a group index
// of ceil(log2 G) bits per weight, and G fp16 scales per matrix (block == 0) or per block of
// `block` consecutive weights of a row (block mode; the format uses 64). The planes follow
// bitplane.h: column c of a row is bit c % 32 of word c / 32, row r starts at word r * words,
// words = words_for(in).
//
//   sign:  [out, words]        bit 1 -> +1, bit 0 -> -1
//   index: [bits, out, words]  plane b holds bit b of each weight's group index (null if bits = 0)
//   scale: fp16 bit patterns, [groups] (block == 0) or [out, ceil(in / block), groups]
//   x:     float32 [batch, in];  y: float32 [batch, out]
//
// y[t, o] = sum_g scale_g * (sum over i with index(o, i) = g of sign(o, i) * x[t, i]): per row,
// token (and block) the signed activations are added into G accumulators, then G multiplies. An
// index >= groups (a validated weight has none) contributes nothing.
#pragma once
#include <cstdint>

#include "sdq/bitplane.h"
#include "sdq/status.h"

namespace sdq {

constexpr int64_t kWgmMaxGroups = 256;  // an index fits in 8 bits

// ceil(log2 groups): the index planes of a layer with `groups` groups (0 for one group).
constexpr int wgm_index_bits(int64_t groups) noexcept {
  int bits = 0;
  while ((int64_t{1} << bits) < groups) ++bits;
  return bits;
}
static_assert(wgm_index_bits(1) == 0 && wgm_index_bits(2) == 1 && wgm_index_bits(3) == 2 &&
                  wgm_index_bits(32) == 5 && wgm_index_bits(256) == 8,
              "index bits are ceil(log2 G)");

// Portable C++ (no intrinsics), multithreaded over output rows. bad_size unless
// 1 <= groups <= kWgmMaxGroups, block >= 0, in > 0, out >= 0, batch >= 0.
Status wgm_gemm(const word_t* sign, const word_t* index, const uint16_t* scale, int64_t groups,
                int64_t block, int64_t out, int64_t in, const float* x, int64_t batch, float* y,
                int threads = 0) noexcept;

}  // namespace sdq
