// Internal: what the int8 look-up GEMM variants share (lut_gemm*.cpp). The math, the table rule
// and the packed layout are documented in sdq/lut_gemm.h.
//
// A call builds, per token of a chunk, the int8 tables q[token][group][16] and one float table
// scale per (token, block); a variant then computes y for whole tiles of 32 rows. Groups are 4
// code columns; a "pair" is 2 groups (8 code columns, one byte of a bitplane row, 32 bytes of a
// packed tile).
#pragma once
#include <cstdint>

#include "sdq/layout.h"
#include "sdq/lut_gemm.h"

namespace sdq::detail {

constexpr int kLutGroup = 4;      // code columns per table
constexpr int kLutEntries = 16;   // 2^kLutGroup entries per table
constexpr int kLutQMax = 127;     // table entries lie in [-kLutQMax, kLutQMax]
// int16 lanes hold at most this many pair sums (each |.| <= 2 * 127) before flushing to int32.
constexpr int64_t kLutFlushPairs = 128;
// Codes are prefetched this far ahead in each tile's stream: memory latency is hidden behind the
// look-ups of the lines before (a tile is one contiguous run of bytes).
constexpr int64_t kLutPrefetchBytes = 1024;
// Blocks whose largest table entry is below this get zero tables (127 / amax must stay finite).
constexpr float kLutTinyAmax = 0x1p-120f;

// Block geometry in groups/pairs, and everything one call (one token chunk) needs.
struct LutCtx {
  const uint8_t* packed;
  const uint16_t* scale;  // [out, nb] fp16
  const uint16_t* mean;   // [out, nb] fp16
  const uint16_t* scale_tiles;  // scale_tiles.h layout of the same (what the x86 variants read)
  int64_t out, nb;
  int64_t tile_bytes;       // bytes of one 32-row tile
  int64_t pairs_per_block;  // pairs of every block but the last (block b starts at pair b * this)
  int64_t last_pairs;       // pairs of the last block
  int64_t groups;           // groups per row (= tables per token)
  const int8_t* q;          // [tokens, groups, 16] int8 tables
  const float* tscale;      // [tokens, nb] table scales
  const float* xsum;        // [tokens, nb]
  int64_t tokens;           // tokens of this chunk
  float* y;                 // [tokens, out]

  int64_t block_pairs(int64_t b) const noexcept { return b == nb - 1 ? last_pairs : pairs_per_block; }
};

// A variant computes y for tiles [tile_begin, tile_end) and every token of the chunk.
using LutRows = void (*)(const LutCtx&, int64_t tile_begin, int64_t tile_end);
void lut_rows_portable(const LutCtx& c, int64_t tile_begin, int64_t tile_end);
void lut_rows_avx2(const LutCtx& c, int64_t tile_begin, int64_t tile_end);    // avx2, fma, f16c
void lut_rows_avx512(const LutCtx& c, int64_t tile_begin, int64_t tile_end);  // + avx512f/bw
void lut_rows_avx512_vnni(const LutCtx& c, int64_t tile_begin, int64_t tile_end);  // + vbmi, vnni
void lut_rows_neon(const LutCtx& c, int64_t tile_begin, int64_t tile_end);    // AArch64

// Tables of one token (sdq/lut_gemm.h): q [groups, 16] and tscale [nb] from xt [total_code_cols],
// block by block. Every variant's builder gives bit-identical tables.
struct LutTableShape {
  int64_t nb, groups_per_block, last_groups;
  bool word_order;  // tables in lut_table_slot's word order (avx512-vnni), else group order
};

// Where group g's table goes. Group order: slot g. Word order: within each word's 8 groups the
// even groups first, then the odd ones ([T0 T2 T4 T6 T1 T3 T5 T7]), so that one 64-byte load
// holds the tables of the low nibbles of 4 consecutive pairs and the next one of the high nibbles.
inline int64_t lut_table_slot(int64_t g, bool word_order) noexcept {
  if (!word_order) return g;
  const int64_t k = g % 8;
  return g - k + (k % 2) * 4 + k / 2;
}

// Tables of block b of one token: xt is the token's [total_code_cols], q its [groups, 16]
// tables (block b's groups written), tscale its [nb] scales (tscale[b] written).
using LutBlockTablesFn = void (*)(const LutTableShape& s, const float* xt, int64_t b, int8_t* q,
                                  float* tscale);
void lut_block_tables_portable(const LutTableShape& s, const float* xt, int64_t b, int8_t* q,
                               float* tscale);
void lut_block_tables_avx2(const LutTableShape& s, const float* xt, int64_t b, int8_t* q,
                           float* tscale);

// Scales and means of the rows [r0, r0 + width) as fp16, transposed to [nb, width] (rows past
// c.out read as 0): a block's scales of a tile are then one contiguous vector. width % 8 == 0.
void lut_transpose_scales_avx2(const LutCtx& c, int64_t r0, int64_t width, uint16_t* s,
                               uint16_t* mu);

// Tokens whose tables are built together (L2: 16 x 32 KB for a 4096-wide OSR-2 layer).
constexpr int64_t kLutTokenChunk = 16;

// The tables as lut_gemm_binary_tiled's kernel for this CPU reads them (scale_tiles.h), for a
// caller that builds them itself: a plan, inside its transform, block by block as each block's
// codes are projected (linear_plan.cpp). groups: tables per token (q holds groups x 16 bytes
// per token, tscale nb floats).
struct LutTableForm {
  LutTableShape shape;
  LutBlockTablesFn build;
  int64_t groups;
};
LutTableForm lut_table_form(const BlockLayout& L) noexcept;

// lut_gemm_binary_tiled with the tables already built in lut_table_form(L) (q [batch, groups,
// 16], tscale [batch, nb]); scale_tiles required; batch <= kLutTokenChunk (else bad_size).
Status lut_gemm_binary_prebuilt(const BlockLayout& L, const uint8_t* packed, const uint16_t* scale,
                                const uint16_t* mean, const uint16_t* scale_tiles, int64_t out,
                                const int8_t* q, const float* tscale, const float* xsum,
                                int64_t batch, float* y, int threads) noexcept;

}  // namespace sdq::detail
