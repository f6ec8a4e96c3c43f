// Internal: what the trit5 GEMM variants share (trit5_gemm*.cpp).
//
// Per call, every token's int8 tables are built once (trit5.h gives the rounding): 16 bytes per
// group, entry idx = the quantised value of the decoded positive pattern idx (entries 14 and 15
// are 0), stored twice in a row (32 bytes per group) for the avx512 variant, whose vpshufb covers
// two groups x 32 rows in one 512-bit register. A variant then serves whole tiles of 32 rows:
// look-up, sign, exact integer sums per (row, block), one conversion to float per (row, block).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "gemm_addonly.h"  // half_to_float
#include "sdq/trit5.h"
#include "trit5_tables.h"

namespace sdq::detail {

constexpr int kTrit5Entries = 16;         // table bytes per group: one vpshufb table
constexpr int64_t kTrit5MaxPairsInt16 = 128;  // pairs summed in int16 before flushing to int32:
                                              // each adds at most 2 * 127 per lane

// Decoded positive pattern (t0, t1, t2) of idx 0..13; rows 14 and 15 are zero (never stored).
inline void trit5_pattern(int idx, int t[3]) noexcept {
  if (idx > 13) {
    t[0] = t[1] = t[2] = 0;
    return;
  }
  const int w = 13 + idx;
  t[0] = w / 9 - 1;
  t[1] = (w / 3) % 3 - 1;
  t[2] = w % 3 - 1;
}

// Quantisation of one (token, block): q = rint((e * pre) * inv), step = m / 127 (trit5.h).
struct Trit5Quant {
  float pre, inv, step;
};

inline Trit5Quant trit5_quant(float m) noexcept {
  if (!std::isfinite(m)) return {0.0f, 0.0f, NAN};  // inf or NaN activations: y becomes NaN
  if (!(m > 0.0f)) return {1.0f, 0.0f, 0.0f};        // all entries 0: every q is 0
  const float pre = m < 0x1p-100f ? 0x1p100f : 1.0f;  // keeps 127 / (m * pre) finite
  return {pre, 127.0f / (m * pre), m / 127.0f};
}

// m = max |entry| over block b's groups: (|x0| + |x1|) + |x2| is the largest entry (the pattern
// with the activations' signs) with the same rounding, so no entry needs computing.
inline float trit5_block_max(const BlockLayout& L, int64_t b, const float* xt) noexcept {
  const float* x = xt + L.code_offset(b);
  const int64_t m = L.m(b), full = m / 3;
  float best = 0.0f;
  bool nan = false;  // a NaN activation must reach the step (a max would drop it)
  for (int64_t j = 0; j < full; ++j) {
    const float v = (std::fabs(x[3 * j]) + std::fabs(x[3 * j + 1])) + std::fabs(x[3 * j + 2]);
    best = v > best ? v : best;
    nan |= v != v;
  }
  if (m % 3) {
    float v = std::fabs(x[3 * full]);
    if (m % 3 == 2) v = v + std::fabs(x[3 * full + 1]);
    best = v > best ? v : best;
    nan |= v != v;
  }
  return nan ? NAN : best;
}

// The three activations of group j of a block of m codes, zero past m.
inline void trit5_group_x(const float* x, int64_t m, int64_t j, float out[3]) noexcept {
  for (int k = 0; k < 3; ++k) out[k] = 3 * j + k < m ? x[3 * j + k] : 0.0f;
}

// Everything one pass of a row kernel needs, resolved once by trit5_gemm.
struct Trit5Ctx {
  const uint8_t* trits;        // [tiles, groups / 2, 32]
  const uint32_t* signs;       // [tiles, groups]
  const uint16_t* scale;       // [out, nb] fp16
  const uint16_t* mean;        // [out, nb] fp16
  const uint16_t* scale_tiles; // scale_tiles.h layout of the same (what the x86 variants read)
  int64_t out, nb, groups;     // groups: total_groups of a row
  int64_t gp_full, gp_last;    // padded groups of every block but the last, and of the last
  const int8_t* tables;        // [tokens, groups, table_stride]
  int64_t table_stride;        // bytes per group: 16, or 32 (twice the same 16)
  const float* step;           // [tokens, nb]: table step of each (token, block)
  const float* xsum;           // [tokens, nb]
  int64_t tokens;              // tokens of this pass (a chunk of the batch)
  float* y;                    // [tokens, out]

  int64_t block_groups(int64_t b) const noexcept { return b == nb - 1 ? gp_last : gp_full; }
  int64_t token_table_bytes() const noexcept { return groups * table_stride; }
};

// Computes y for row tiles [tile_begin, tile_end) and all ctx.tokens tokens.
using Trit5RowsFn = void (*)(const Trit5Ctx& c, int64_t tile_begin, int64_t tile_end);

void trit5_block_tables_portable(const BlockLayout& L, const float* xt, int64_t stride,
                                 int64_t b, int8_t* tables, float* step);
void trit5_block_tables_avx2(const BlockLayout& L, const float* xt, int64_t stride, int64_t b,
                             int8_t* tables, float* step);
void trit5_block_tables_avx512(const BlockLayout& L, const float* xt, int64_t stride, int64_t b,
                               int8_t* tables, float* step);
void trit5_rows_portable(const Trit5Ctx& c, int64_t tile_begin, int64_t tile_end);
void trit5_rows_avx2(const Trit5Ctx& c, int64_t tile_begin, int64_t tile_end);
void trit5_rows_avx512(const Trit5Ctx& c, int64_t tile_begin, int64_t tile_end);
void trit5_rows_neon(const Trit5Ctx& c, int64_t tile_begin, int64_t tile_end);  // AArch64


}  // namespace sdq::detail
