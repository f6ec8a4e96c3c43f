// AVX2 trit5 GEMM: 32 rows per vector, one byte each. The 32 bytes of a pair hold two groups'
// 4-bit patterns; each nibble vector indexes its group's 16-byte table with one vpshufb (the table
// broadcast to both 128-bit lanes). The sign word of a group is expanded to a byte mask m
// (broadcast, shuffle, test) and applied as (v ^ m) - m; the two groups' bytes are interleaved and
// summed into int16 by vpmaddubsw with ones, flushed to int32 before they could overflow.
// Compiled with a target attribute so the build needs no -mavx2; chosen at run time.
#include "scratch.h"
#include "scale_tiles.h"
#include "trit5_gemm.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <algorithm>

#define SDQ_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace sdq::detail {
namespace {

constexpr int kRows = static_cast<int>(kTrit5TileRows);
constexpr int kMaxTokens = 4;            // tokens per pass over a tile: accumulators in registers
constexpr int64_t kL2Bytes = 256 << 10;  // tables of one block chunk (all tokens): a share of L2
constexpr int64_t kPrefetchPairs = 16;   // 512 bytes of codes ahead

// Patterns of the 16 entries, split so that packing two vectors of int32 gives bytes in order:
// vector a holds entries 0-3 and 8-11, vector b entries 4-7 and 12-15 (vpackssdw works per lane).
struct Patterns {
  __m256 a[3], b[3];
};

SDQ_AVX2 Patterns make_patterns() {
  alignas(32) float pa[3][8], pb[3][8];
  for (int k = 0; k < 8; ++k) {
    int ta[3], tb[3];
    trit5_pattern((k < 4 ? k : k + 4), ta);
    trit5_pattern((k < 4 ? k + 4 : k + 8), tb);
    for (int d = 0; d < 3; ++d) {
      pa[d][k] = static_cast<float>(ta[d]);
      pb[d][k] = static_cast<float>(tb[d]);
    }
  }
  Patterns p;
  for (int d = 0; d < 3; ++d) {
    p.a[d] = _mm256_load_ps(pa[d]);
    p.b[d] = _mm256_load_ps(pb[d]);
  }
  return p;
}

// One group's 16 table bytes from its three activations.
SDQ_AVX2 inline __m128i group_table(const Patterns& p, const float* v, __m256 pre, __m256 inv) {
  const __m256 x0 = _mm256_set1_ps(v[0]), x1 = _mm256_set1_ps(v[1]), x2 = _mm256_set1_ps(v[2]);
  // (t0 x0 + t1 x1) + t2 x2: the products are exact, so each fma rounds like the float add.
  const __m256 ea = _mm256_fmadd_ps(x2, p.a[2], _mm256_fmadd_ps(x1, p.a[1], _mm256_mul_ps(x0, p.a[0])));
  const __m256 eb = _mm256_fmadd_ps(x2, p.b[2], _mm256_fmadd_ps(x1, p.b[1], _mm256_mul_ps(x0, p.b[0])));
  const __m256i qa = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(ea, pre), inv));
  const __m256i qb = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(eb, pre), inv));
  const __m256i w = _mm256_packs_epi32(qa, qb);  // lane 0: entries 0-7, lane 1: entries 8-15
  return _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
}

// 8 fp16 values (scale_tiles.h layout) as float.
SDQ_AVX2 inline __m256 half8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Byte mask of a group's sign word: byte r is 0xff when bit r is set.
SDQ_AVX2 inline __m256i sign_mask(uint32_t word, __m256i spread, __m256i bit) {
  const __m256i w = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(word)), spread);
  return _mm256_cmpeq_epi8(_mm256_and_si256(w, bit), bit);
}

// Tokens [t0, t0 + TT) of one tile over blocks [b0, b1); y is accumulated across block chunks.
template <int TT>
SDQ_AVX2 void tile_tokens(const Trit5Ctx& c, int64_t tile, int rows, int64_t t0, int64_t b0,
                          int64_t b1, const uint16_t* s, const uint16_t* mu) {
  const int64_t pairs = c.groups / 2;
  const uint8_t* tb = c.trits + tile * pairs * kRows;
  const uint32_t* sb = c.signs + tile * c.groups;
  const int64_t r0 = tile * kRows;
  const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi8(1);
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  //
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_setr_epi8(1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128,
                                       1, 2, 4, 8, 16, 32, 64, -128, 1, 2, 4, 8, 16, 32, 64, -128);
  const int8_t* tab[TT];
  for (int t = 0; t < TT; ++t) tab[t] = c.tables + (t0 + t) * c.token_table_bytes();
  alignas(32) float y[TT][kRows];
  for (int t = 0; t < TT; ++t)
    for (int i = 0; i < kRows; ++i)
      y[t][i] = b0 == 0 || i >= rows ? 0.0f : c.y[(t0 + t) * c.out + r0 + i];
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t p0 = b * c.gp_full / 2, np = c.block_groups(b) / 2;
    __m256i acc[TT][4];  // int32, rows 0-7, 8-15, 16-23, 24-31
    for (int t = 0; t < TT; ++t)
      for (int q = 0; q < 4; ++q) acc[t][q] = _mm256_setzero_si256();
    for (int64_t pc = p0; pc < p0 + np; pc += kTrit5MaxPairsInt16) {
      const int64_t pe = std::min(p0 + np, pc + kTrit5MaxPairsInt16);
      __m256i a16[TT][2];  // int16: rows 0-7 | 16-23 and rows 8-15 | 24-31
      for (int t = 0; t < TT; ++t) a16[t][0] = a16[t][1] = _mm256_setzero_si256();
      for (int64_t p = pc; p < pe; ++p) {
        // The tile's codes stream from memory: ask for them a few cache lines ahead.
        _mm_prefetch(reinterpret_cast<const char*>(tb + (p + kPrefetchPairs) * kRows), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(sb + 2 * (p + kPrefetchPairs)), _MM_HINT_T0);
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tb + p * kRows));
        const __m256i lo = _mm256_and_si256(bytes, low4);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
        const __m256i mlo = sign_mask(sb[2 * p], spread, bit);
        const __m256i mhi = sign_mask(sb[2 * p + 1], spread, bit);
        for (int t = 0; t < TT; ++t) {
          const int8_t* q = tab[t] + p * 2 * kTrit5Entries;
          const __m256i tlo = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
          const __m256i thi = _mm256_broadcastsi128_si256(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + kTrit5Entries)));
          __m256i vlo = _mm256_shuffle_epi8(tlo, lo), vhi = _mm256_shuffle_epi8(thi, hi);
          vlo = _mm256_sub_epi8(_mm256_xor_si256(vlo, mlo), mlo);
          vhi = _mm256_sub_epi8(_mm256_xor_si256(vhi, mhi), mhi);
          a16[t][0] = _mm256_add_epi16(a16[t][0], _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(vlo, vhi)));
          a16[t][1] = _mm256_add_epi16(a16[t][1], _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(vlo, vhi)));
        }
      }
      for (int t = 0; t < TT; ++t) {
        acc[t][0] = _mm256_add_epi32(acc[t][0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(a16[t][0])));
        acc[t][1] = _mm256_add_epi32(acc[t][1], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(a16[t][1])));
        acc[t][2] = _mm256_add_epi32(acc[t][2], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(a16[t][0], 1)));
        acc[t][3] = _mm256_add_epi32(acc[t][3], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(a16[t][1], 1)));
      }
    }
    for (int t = 0; t < TT; ++t) {
      const __m256 st = _mm256_set1_ps(c.step[(t0 + t) * c.nb + b]);
      const __m256 xs = _mm256_set1_ps(c.xsum[(t0 + t) * c.nb + b]);
      for (int q = 0; q < 4; ++q) {
        const __m256 sv = _mm256_mul_ps(half8(s + b * kRows + 8 * q), st);
        const __m256 mv = half8(mu + b * kRows + 8 * q);
        const __m256 acc_f = _mm256_cvtepi32_ps(acc[t][q]);
        _mm256_store_ps(y[t] + 8 * q, _mm256_fmadd_ps(acc_f, sv, _mm256_fmadd_ps(mv, xs, _mm256_load_ps(y[t] + 8 * q))));
      }
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int i = 0; i < rows; ++i) c.y[(t0 + t) * c.out + r0 + i] = y[t][i];
}

SDQ_AVX2 void tile_all_tokens(const Trit5Ctx& c, int64_t tile, int rows, int64_t b0, int64_t b1,
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

SDQ_AVX2 void trit5_block_tables_avx2(const BlockLayout& L, const float* xt, int64_t stride,
                                      int64_t b, int8_t* tables, float* step) {
  const Patterns pat = make_patterns();
  const Trit5Quant qz = trit5_quant(trit5_block_max(L, b, xt));
  step[b] = qz.step;
  const __m256 pre = _mm256_set1_ps(qz.pre), inv = _mm256_set1_ps(qz.inv);
  const float* x = xt + L.code_offset(b);
  // Locals: the int8 stores below may alias anything, so nothing read through L is hoisted.
  const int64_t m = L.m(b), used = trit5_groups(L, b), full = m / 3;
  const int64_t padded = trit5_padded_groups(L, b);
  int8_t* tb = tables + trit5_group_offset(L, b) * stride;
  for (int64_t j = 0; j < padded; ++j) {
    float v[3] = {0.0f, 0.0f, 0.0f};
    const float* src = v;
    if (j < full)
      src = x + 3 * j;
    else if (j < used)
      trit5_group_x(x, m, j, v);
    const __m128i q = group_table(pat, src, pre, inv);
    for (int64_t k = 0; k < stride; k += kTrit5Entries)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(tb + j * stride + k), q);
  }
}

SDQ_AVX2 void trit5_rows_avx2(const Trit5Ctx& c, int64_t tile_begin, int64_t tile_end) {
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
void trit5_block_tables_avx2(const BlockLayout& L, const float* xt, int64_t stride, int64_t b,
                             int8_t* tables, float* step) {
  trit5_block_tables_portable(L, xt, stride, b, tables, step);
}
void trit5_rows_avx2(const Trit5Ctx& c, int64_t tile_begin, int64_t tile_end) {
  trit5_rows_portable(c, tile_begin, tile_end);
}
}  // namespace sdq::detail

#endif
