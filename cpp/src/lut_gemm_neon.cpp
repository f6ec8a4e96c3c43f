// NEON int8 look-up GEMM (sdq/lut_gemm.h) for AArch64, where NEON is always present. The AVX2
// variant's loop in 16-byte vectors: the 32 bytes of a packed pair (8 codes x 32 rows) are two
// registers; tbl looks up the low nibbles in group 2p's 16-byte table and the high nibbles in
// group 2p+1's, saddl adds the two look-ups of each row into int16 lanes, flushed to int32 before
// they could overflow; one float epilogue per (row, block) as in the other variants.
// The tables come from the portable builder (the definition the x86 builder reproduces).
#include "lut_gemm.h"

#if defined(__aarch64__)
#include <arm_neon.h>

#include <algorithm>
#include <cstring>

#include "fp16.h"
#include "scratch.h"

namespace sdq::detail {
namespace {

constexpr int kTile = static_cast<int>(kLutTileRows);
constexpr int kMaxR = 2;  // tiles per pass: both share every table load

// Scales and means of the rows [r0, r0 + width) as float, transposed to [nb, width] (rows past
// c.out read as 0): a block's values of a tile are then contiguous vectors.
void transpose_scales(const LutCtx& c, int64_t r0, int64_t width, float* s, float* mu) {
  for (int64_t i = 0; i < width; ++i) {
    const int64_t r = r0 + i;
    for (int64_t b = 0; b < c.nb; ++b) {  // fp16.h: exact, as the portable variant converts
      s[b * width + i] = r < c.out ? static_cast<float>(half_to_double(c.scale[r * c.nb + b])) : 0;
      mu[b * width + i] = r < c.out ? static_cast<float>(half_to_double(c.mean[r * c.nb + b])) : 0;
    }
  }
}

// Sums of the look-ups of pairs [p0, p0 + np) of R tiles (codes: the first tile) for one token's
// tables q, added to acc[r][k] = int32 sums of rows 4k .. 4k+3 of tile r.
template <int R>
void block_sums(const uint8_t* codes, int64_t tile_bytes, const int8_t* q, int64_t p0,
                int64_t np, int32x4_t (*acc)[8]) {
  const uint8x16_t low = vdupq_n_u8(0x0f);
  for (int64_t c0 = p0; c0 < p0 + np; c0 += kLutFlushPairs) {
    const int64_t c1 = std::min(p0 + np, c0 + kLutFlushPairs);
    int16x8_t s[R][4];  // rows 0-7, 8-15, 16-23, 24-31
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < 4; ++k) s[r][k] = vdupq_n_s16(0);
    for (int64_t p = c0; p < c1; ++p) {
      const int8x16_t tlo = vld1q_s8(q + 2 * p * kLutEntries);
      const int8x16_t thi = vld1q_s8(q + (2 * p + 1) * kLutEntries);
      for (int r = 0; r < R; ++r) {
        const uint8_t* v = codes + r * tile_bytes + p * kTile;
        __builtin_prefetch(v + kLutPrefetchBytes);
        for (int h = 0; h < 2; ++h) {  // rows 16h .. 16h + 15
          const uint8x16_t bytes = vld1q_u8(v + 16 * h);
          const int8x16_t a = vqtbl1q_s8(tlo, vandq_u8(bytes, low));
          const int8x16_t b = vqtbl1q_s8(thi, vshrq_n_u8(bytes, 4));
          s[r][2 * h] = vaddq_s16(s[r][2 * h], vaddl_s8(vget_low_s8(a), vget_low_s8(b)));
          s[r][2 * h + 1] = vaddq_s16(s[r][2 * h + 1], vaddl_high_s8(a, b));
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < 4; ++k) {
        acc[r][2 * k] = vaddw_s16(acc[r][2 * k], vget_low_s16(s[r][k]));
        acc[r][2 * k + 1] = vaddw_high_s16(acc[r][2 * k + 1], s[r][k]);
      }
  }
}

// R tiles from tile k0, every token: y over all blocks, then stored (rows < out).
template <int R>
void tiles(const LutCtx& c, int64_t k0, float* st, float* mt, float* ybuf) {
  constexpr int W = R * kTile;
  const int64_t r0 = k0 * kTile;
  transpose_scales(c, r0, W, st, mt);
  std::memset(ybuf, 0, sizeof(float) * W * c.tokens);
  const uint8_t* codes = c.packed + k0 * c.tile_bytes;
  for (int64_t b = 0, p0 = 0; b < c.nb; p0 += c.block_pairs(b), ++b) {
    for (int64_t t = 0; t < c.tokens; ++t) {
      int32x4_t acc[R][8];
      for (int r = 0; r < R; ++r)
        for (int k = 0; k < 8; ++k) acc[r][k] = vdupq_n_s32(0);
      block_sums<R>(codes, c.tile_bytes, c.q + t * c.groups * kLutEntries, p0, c.block_pairs(b),
                    acc);
      const float ts = c.tscale[t * c.nb + b], xs = c.xsum[t * c.nb + b];
      for (int r = 0; r < R; ++r)
        for (int k = 0; k < 8; ++k) {
          const int i = r * kTile + 4 * k;
          float* yp = ybuf + t * W + i;
          const float32x4_t f = vmulq_n_f32(vcvtq_f32_s32(acc[r][k]), ts);
          const float32x4_t base = vfmaq_n_f32(vld1q_f32(yp), vld1q_f32(mt + b * W + i), xs);
          vst1q_f32(yp, vfmaq_f32(base, f, vld1q_f32(st + b * W + i)));
        }
    }
  }
  const int64_t rows = std::min<int64_t>(W, c.out - r0);
  for (int64_t t = 0; t < c.tokens; ++t)
    std::memcpy(c.y + t * c.out + r0, ybuf + t * W, sizeof(float) * rows);
}

}  // namespace

void lut_rows_neon(const LutCtx& c, int64_t tile_begin, int64_t tile_end) {
  // Per worker: transposed scales and means [nb, R * 32], then y [tokens, R * 32].
  constexpr int64_t W = kMaxR * kTile;
  float* st = scratch<float>(ScratchSlot::lut_rows, 2 * c.nb * W + c.tokens * W);
  float* mt = st + c.nb * W;
  float* ybuf = mt + c.nb * W;
  int64_t k = tile_begin;
  for (; k + kMaxR <= tile_end; k += kMaxR) tiles<kMaxR>(c, k, st, mt, ybuf);
  for (; k < tile_end; ++k) tiles<1>(c, k, st, mt, ybuf);
}

}  // namespace sdq::detail

#else  // not AArch64: never selected (cpu_has is false), defined so the build links

namespace sdq::detail {
void lut_rows_neon(const LutCtx& c, int64_t tile_begin, int64_t tile_end) {
  lut_rows_portable(c, tile_begin, tile_end);
}
}  // namespace sdq::detail

#endif
