// NEON trit5 GEMM (trit5.h) for AArch64, where NEON is always present. The AVX2 variant's loop
// in 16-byte vectors: the 32 bytes of a pair hold two groups' 4-bit patterns for 32 rows (two
// registers); tbl looks each nibble up in its group's 16-byte table, the group's sign word becomes
// a byte mask m (bytes spread by tbl, then cmtst against the bit of each row) applied as
// (v ^ m) - m, and saddl adds the two groups of each row into int16 lanes, flushed to int32
// before they could overflow. The tables come from the portable builder.
#include "trit5_gemm.h"

#if defined(__aarch64__)
#include <arm_neon.h>

#include <algorithm>

#include "scratch.h"

namespace sdq::detail {
namespace {

constexpr int kRows = static_cast<int>(kTrit5TileRows);
constexpr int kMaxTokens = 2;  // tokens per pass over a tile: int16 sums stay in registers

// Byte masks of a sign word for rows 0-15 (m[0]) and 16-31 (m[1]): byte r is 0xff when bit r
// is set.
inline void sign_masks(uint32_t word, uint8x16_t spread_lo, uint8x16_t spread_hi, uint8x16_t bit,
                       int8x16_t m[2]) {
  const uint8x16_t w = vreinterpretq_u8_u32(vdupq_n_u32(word));
  m[0] = vreinterpretq_s8_u8(vtstq_u8(vqtbl1q_u8(w, spread_lo), bit));
  m[1] = vreinterpretq_s8_u8(vtstq_u8(vqtbl1q_u8(w, spread_hi), bit));
}

// Tokens [t0, t0 + TT) of one tile over every block; s, mu: the tile's scales and means as float,
// [nb, 32].
template <int TT>
void tile_tokens(const Trit5Ctx& c, int64_t tile, int rows, int64_t t0, const float* s,
                 const float* mu) {
  const int64_t pairs = c.groups / 2;
  const uint8_t* tb = c.trits + tile * pairs * kRows;
  const uint32_t* sb = c.signs + tile * c.groups;
  const int64_t r0 = tile * kRows;
  const uint8x16_t low4 = vdupq_n_u8(0x0f);
  static const uint8_t kSpread[32] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                      2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
  static const uint8_t kBit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
  const uint8x16_t spread_lo = vld1q_u8(kSpread), spread_hi = vld1q_u8(kSpread + 16);
  const uint8x16_t bit = vld1q_u8(kBit);
  const int8_t* tab[TT];
  for (int t = 0; t < TT; ++t) tab[t] = c.tables + (t0 + t) * c.token_table_bytes();
  float y[TT][kRows] = {};
  for (int64_t b = 0; b < c.nb; ++b) {
    const int64_t p0 = b * c.gp_full / 2, np = c.block_groups(b) / 2;
    int32x4_t acc[TT][8];  // int32, rows 4k .. 4k+3
    for (int t = 0; t < TT; ++t)
      for (int k = 0; k < 8; ++k) acc[t][k] = vdupq_n_s32(0);
    for (int64_t pc = p0; pc < p0 + np; pc += kTrit5MaxPairsInt16) {
      const int64_t pe = std::min(p0 + np, pc + kTrit5MaxPairsInt16);
      int16x8_t a16[TT][4];  // rows 0-7, 8-15, 16-23, 24-31
      for (int t = 0; t < TT; ++t)
        for (int k = 0; k < 4; ++k) a16[t][k] = vdupq_n_s16(0);
      for (int64_t p = pc; p < pe; ++p) {
        __builtin_prefetch(tb + (p + 16) * kRows);
        int8x16_t mlo[2], mhi[2];
        sign_masks(sb[2 * p], spread_lo, spread_hi, bit, mlo);
        sign_masks(sb[2 * p + 1], spread_lo, spread_hi, bit, mhi);
        uint8x16_t lo[2], hi[2];
        for (int h = 0; h < 2; ++h) {
          const uint8x16_t bytes = vld1q_u8(tb + p * kRows + 16 * h);
          lo[h] = vandq_u8(bytes, low4);
          hi[h] = vshrq_n_u8(bytes, 4);
        }
        for (int t = 0; t < TT; ++t) {
          const int8_t* q = tab[t] + p * 2 * c.table_stride;
          const int8x16_t tlo = vld1q_s8(q), thi = vld1q_s8(q + c.table_stride);
          for (int h = 0; h < 2; ++h) {
            const int8x16_t vlo = vsubq_s8(veorq_s8(vqtbl1q_s8(tlo, lo[h]), mlo[h]), mlo[h]);
            const int8x16_t vhi = vsubq_s8(veorq_s8(vqtbl1q_s8(thi, hi[h]), mhi[h]), mhi[h]);
            a16[t][2 * h] = vaddq_s16(a16[t][2 * h], vaddl_s8(vget_low_s8(vlo), vget_low_s8(vhi)));
            a16[t][2 * h + 1] = vaddq_s16(a16[t][2 * h + 1], vaddl_high_s8(vlo, vhi));
          }
        }
      }
      for (int t = 0; t < TT; ++t)
        for (int k = 0; k < 4; ++k) {
          acc[t][2 * k] = vaddw_s16(acc[t][2 * k], vget_low_s16(a16[t][k]));
          acc[t][2 * k + 1] = vaddw_high_s16(acc[t][2 * k + 1], a16[t][k]);
        }
    }
    for (int t = 0; t < TT; ++t) {
      const float st = c.step[(t0 + t) * c.nb + b], xs = c.xsum[(t0 + t) * c.nb + b];
      for (int k = 0; k < 8; ++k) {
        const float32x4_t sv = vmulq_n_f32(vld1q_f32(s + b * kRows + 4 * k), st);
        const float32x4_t mv = vld1q_f32(mu + b * kRows + 4 * k);
        const float32x4_t base = vfmaq_n_f32(vld1q_f32(y[t] + 4 * k), mv, xs);
        vst1q_f32(y[t] + 4 * k, vfmaq_f32(base, vcvtq_f32_s32(acc[t][k]), sv));
      }
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int i = 0; i < rows; ++i) c.y[(t0 + t) * c.out + r0 + i] = y[t][i];
}

}  // namespace

void trit5_rows_neon(const Trit5Ctx& c, int64_t tile_begin, int64_t tile_end) {
  float* s = scratch<float>(ScratchSlot::trit5_rows, 2 * kRows * c.nb);
  float* mu = s + kRows * c.nb;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, c.out - tile * kRows));
    for (int i = 0; i < kRows; ++i)  // transposed: a block's 32 row values are contiguous
      for (int64_t b = 0; b < c.nb; ++b) {
        const int64_t r = tile * kRows + i;
        s[b * kRows + i] = i < rows ? half_to_float(c.scale[r * c.nb + b]) : 0.0f;
        mu[b * kRows + i] = i < rows ? half_to_float(c.mean[r * c.nb + b]) : 0.0f;
      }
    int64_t t0 = 0;
    for (; t0 + kMaxTokens <= c.tokens; t0 += kMaxTokens)
      tile_tokens<kMaxTokens>(c, tile, rows, t0, s, mu);
    for (; t0 < c.tokens; ++t0) tile_tokens<1>(c, tile, rows, t0, s, mu);
  }
}

}  // namespace sdq::detail

#else  // not AArch64: never selected (cpu_has is false), defined so the build links

namespace sdq::detail {
void trit5_rows_neon(const Trit5Ctx& c, int64_t tile_begin, int64_t tile_end) {
  trit5_rows_portable(c, tile_begin, tile_end);
}
}  // namespace sdq::detail

#endif
