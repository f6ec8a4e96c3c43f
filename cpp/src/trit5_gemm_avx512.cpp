// AVX-512 trit5 GEMM (avx512f/bw/vl): one 512-bit vector serves both groups of a pair for 32 rows.
// The pair's 32 bytes are broadcast to both halves and shifted by 0 / 4 bits (vpsrlvw), so the low
// half indexes group 2p's table and the high half group 2p + 1's; one vpshufb looks both up (the
// tables are stored as [T_2p, T_2p, T_2p+1, T_2p+1], one per 128-bit lane). The two sign words are
// one 64-bit kmask, applied by a masked subtract. Two pairs' bytes are interleaved and summed into
// int16 by vpmaddubsw with ones, flushed to int32 before they could overflow.
// Compiled with a target attribute so the build needs no -mavx512bw; chosen at run time.
#include "scratch.h"
#include "scale_tiles.h"
#include "trit5_gemm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// GCC 12's avx512 headers seed masked intrinsics with _mm512_undefined_*(), which its own
// -W(maybe-)uninitialized flags when inlined into a target-attribute function: a false positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#define SDQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

namespace sdq::detail {
namespace {

constexpr int kRows = static_cast<int>(kTrit5TileRows);
constexpr int kMaxTokens = 4;            // tokens per pass over a tile: accumulators in registers
constexpr int64_t kL2Bytes = 512 << 10;  // tables of one block chunk (all tokens): a share of L2
constexpr int64_t kPrefetchPairs = 16;   // 512 bytes of codes ahead

SDQ_AVX512 inline __mmask64 pair_mask(const uint32_t* words) {
  uint64_t k;
  std::memcpy(&k, words, sizeof k);  // word 2p in bits 0-31, word 2p + 1 in bits 32-63
  return _cvtu64_mask64(k);
}

// The 64 pattern indices of pair p: group 2p's (low nibbles) in the low half, 2p + 1's above.
SDQ_AVX512 inline __m512i indices(const uint8_t* tb, int64_t p, __m512i shift, __m512i low4) {
  const __m512i bytes =
      _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tb + p * kRows)));
  return _mm512_and_si512(_mm512_srlv_epi16(bytes, shift), low4);
}

// Signed int8 values of pair p for one token: the look-up, negated where the sign bit is set.
SDQ_AVX512 inline __m512i lookup(const int8_t* tab, __m512i idx, __mmask64 k, int64_t p) {
  const __m512i table = _mm512_loadu_si512(tab + p * 4 * kTrit5Entries);
  const __m512i v = _mm512_shuffle_epi8(table, idx);
  return _mm512_mask_sub_epi8(v, k, _mm512_setzero_si512(), v);
}

// 8 fp16 values (scale_tiles.h layout) as float.
SDQ_AVX512 inline __m256 half8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Two vectors of 8 floats as one: a in the low half, b in the high half (avx512f only, no dq).
SDQ_AVX512 inline __m512 join(__m256 a, __m256 b) {
  return _mm512_castpd_ps(
      _mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(a)), _mm256_castps_pd(b), 1));
}

// Tokens [t0, t0 + TT) of one tile over blocks [b0, b1); y is accumulated across block chunks.
template <int TT>
SDQ_AVX512 void tile_tokens(const Trit5Ctx& c, int64_t tile, int rows, int64_t t0, int64_t b0,
                            int64_t b1, const uint16_t* s, const uint16_t* mu) {
  const int64_t pairs = c.groups / 2;
  const uint8_t* tb = c.trits + tile * pairs * kRows;
  const uint32_t* sb = c.signs + tile * c.groups;
  const int64_t r0 = tile * kRows;
  const __m512i low4 = _mm512_set1_epi8(0x0f), ones = _mm512_set1_epi8(1);
  const __m512i zero = _mm512_setzero_si512();
  // 16-bit shift counts: 0 for the low half (group 2p), 4 for the high half (group 2p + 1).
  const __m512i shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  const int8_t* tab[TT];
  for (int t = 0; t < TT; ++t) tab[t] = c.tables + (t0 + t) * c.token_table_bytes();
  // y of rows in the accumulators' order: [0-7, 16-23] then [8-15, 24-31].
  alignas(64) float y[TT][kRows];
  static constexpr int kOrder[kRows] = {0,  1,  2,  3,  4,  5,  6,  7,  16, 17, 18,
                                        19, 20, 21, 22, 23, 8,  9,  10, 11, 12, 13,
                                        14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  for (int t = 0; t < TT; ++t)
    for (int i = 0; i < kRows; ++i)
      y[t][i] = b0 == 0 || kOrder[i] >= rows ? 0.0f : c.y[(t0 + t) * c.out + r0 + kOrder[i]];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t p0 = b * c.gp_full / 2, np = c.block_groups(b) / 2;
    __m512i acc[TT][2];  // int32: rows [0-7, 16-23] and [8-15, 24-31]
    for (int t = 0; t < TT; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_si512();
    for (int64_t pc = p0; pc < p0 + np; pc += kTrit5MaxPairsInt16) {
      const int64_t pe = std::min(p0 + np, pc + kTrit5MaxPairsInt16);
      __m512i a16[TT][2];  // int16 per 128-bit lane: rows 0-7, 16-23, 0-7, 16-23 (and 8-15, 24-31)
      for (int t = 0; t < TT; ++t) a16[t][0] = a16[t][1] = _mm512_setzero_si512();
      int64_t p = pc;
      for (; p + 1 < pe; p += 2) {
        // The tile's codes stream from memory: ask for them a few cache lines ahead.
        _mm_prefetch(reinterpret_cast<const char*>(tb + (p + kPrefetchPairs) * kRows), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(sb + 2 * (p + kPrefetchPairs)), _MM_HINT_T0);
        const __m512i i1 = indices(tb, p, shift, low4), i2 = indices(tb, p + 1, shift, low4);
        const __mmask64 k1 = pair_mask(sb + 2 * p), k2 = pair_mask(sb + 2 * p + 2);
        for (int t = 0; t < TT; ++t) {
          const __m512i v1 = lookup(tab[t], i1, k1, p), v2 = lookup(tab[t], i2, k2, p + 1);
          a16[t][0] = _mm512_add_epi16(a16[t][0], _mm512_maddubs_epi16(ones, _mm512_unpacklo_epi8(v1, v2)));
          a16[t][1] = _mm512_add_epi16(a16[t][1], _mm512_maddubs_epi16(ones, _mm512_unpackhi_epi8(v1, v2)));
        }
      }
      if (p < pe) {  // an odd pair at the end of the block
        const __m512i i1 = indices(tb, p, shift, low4);
        const __mmask64 k1 = pair_mask(sb + 2 * p);
        for (int t = 0; t < TT; ++t) {
          const __m512i v1 = lookup(tab[t], i1, k1, p);
          a16[t][0] = _mm512_add_epi16(a16[t][0], _mm512_maddubs_epi16(ones, _mm512_unpacklo_epi8(v1, zero)));
          a16[t][1] = _mm512_add_epi16(a16[t][1], _mm512_maddubs_epi16(ones, _mm512_unpackhi_epi8(v1, zero)));
        }
      }
      for (int t = 0; t < TT; ++t)
        for (int h = 0; h < 2; ++h) {  // the two groups' halves hold the same rows: add them
          const __m512i lo = _mm512_cvtepi16_epi32(_mm512_castsi512_si256(a16[t][h]));
          const __m512i hi = _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(a16[t][h], 1));
          acc[t][h] = _mm512_add_epi32(acc[t][h], _mm512_add_epi32(lo, hi));
        }
    }
    __m512 sv[2], mv[2];
    for (int h = 0; h < 2; ++h) {  // rows [8h .. 8h + 7, 16 + 8h .. 16 + 8h + 7]
      sv[h] = join(half8(s + b * kRows + 8 * h), half8(s + b * kRows + 16 + 8 * h));
      mv[h] = join(half8(mu + b * kRows + 8 * h), half8(mu + b * kRows + 16 + 8 * h));
    }
    for (int t = 0; t < TT; ++t) {
      const __m512 st = _mm512_set1_ps(c.step[(t0 + t) * c.nb + b]);
      const __m512 xs = _mm512_set1_ps(c.xsum[(t0 + t) * c.nb + b]);
      for (int h = 0; h < 2; ++h) {
        const __m512 acc_f = _mm512_cvtepi32_ps(acc[t][h]);
        const __m512 yv = _mm512_fmadd_ps(mv[h], xs, _mm512_load_ps(y[t] + 16 * h));
        _mm512_store_ps(y[t] + 16 * h, _mm512_fmadd_ps(acc_f, _mm512_mul_ps(sv[h], st), yv));
      }
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int i = 0; i < kRows; ++i)
      if (kOrder[i] < rows) c.y[(t0 + t) * c.out + r0 + kOrder[i]] = y[t][i];
}

SDQ_AVX512 void tile_all_tokens(const Trit5Ctx& c, int64_t tile, int rows, int64_t b0, int64_t b1,
                                const uint16_t* s, const uint16_t* mu) {
  for (int64_t t0 = 0; t0 < c.tokens; t0 += kMaxTokens) {
    switch (std::min<int64_t>(kMaxTokens, c.tokens - t0)) {
      case 1: tile_tokens<1>(c, tile, rows, t0, b0, b1, s, mu); break;
      case 2: tile_tokens<2>(c, tile, rows, t0, b0, b1, s, mu); break;
      case 3: tile_tokens<3>(c, tile, rows, t0, b0, b1, s, mu); break;
      default: tile_tokens<4>(c, tile, rows, t0, b0, b1, s, mu); break;
    }
  }
}

}  // namespace

// The tables are what the avx2 builder writes (it stores each group's 16 bytes twice when
// stride is 32); AVX-512 would only widen the 16 entries of one group, which one ymm already holds.
void trit5_block_tables_avx512(const BlockLayout& L, const float* xt, int64_t stride, int64_t b,
                               int8_t* tables, float* step) {
  trit5_block_tables_avx2(L, xt, stride, b, tables, step);
}

SDQ_AVX512 void trit5_rows_avx512(const Trit5Ctx& c, int64_t tile_begin, int64_t tile_end) {
  // Block chunks outermost: their tables (all tokens) stay in cache while every tile passes.
  const int64_t block_bytes = c.gp_full * c.table_stride;
  const int64_t chunk = std::max<int64_t>(1, kL2Bytes / (block_bytes * c.tokens));
  for (int64_t b0 = 0; b0 < c.nb; b0 += chunk) {
    const int64_t b1 = std::min(c.nb, b0 + chunk);
    for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, c.out - tile * kRows));
      const uint16_t* s = tile_scales(c.scale_tiles, c.nb, tile, 0);
      tile_all_tokens(c, tile, rows, b0, b1, s, tile_means(c.scale_tiles, c.nb, tile, 0));
    }
  }
}

}  // namespace sdq::detail

#else  // not x86-64: never selected (cpu_has is false), defined so the build links

namespace sdq::detail {
void trit5_block_tables_avx512(const BlockLayout& L, const float* xt, int64_t stride, int64_t b,
                               int8_t* tables, float* step) {
  trit5_block_tables_portable(L, xt, stride, b, tables, step);
}
void trit5_rows_avx512(const Trit5Ctx& c, int64_t tile_begin, int64_t tile_end) {
  trit5_rows_portable(c, tile_begin, tile_end);
}
}  // namespace sdq::detail

#endif
