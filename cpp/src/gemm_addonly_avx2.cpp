// AVX2 add-only GEMM: 8 output rows per vector. A vector holds the same code word of 8 rows
// (loaded row by row and transposed in registers, cheaper than a gather); each 4-bit nibble picks
// an entry of that group's 16-entry table, which spans two registers: two vpermps (low and high
// half, indexed by the low 3 bits) and a blend on the nibble's top bit.
// Compiled with a target attribute so the build needs no -mavx2; chosen at run time.
#include "gemm_addonly.h"
#include "scratch.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <algorithm>

#define SDQ_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace sdq::detail {
namespace {

constexpr int kRows = 8;
constexpr int kMaxTokens = 4;  // accumulators per token stay in registers
constexpr int64_t kL2Bytes = 256 << 10;  // tables of one block chunk: a share of L2

struct Tile {
  int64_t r0;
  __m256i mask;      // lanes holding real rows: all ones
  __m256i word_idx;  // lane i: word offset of row r0 + i (clamped to the last real row)
  __m256i buf_idx;   // lane i: offset of row i in the converted scale buffers
};

// Converts fp16 scale and mean of the tile's rows, blocks [b0, b1), into [kRows, nb] floats.
SDQ_AVX2 void convert_scales(const GemmCtx& c, int64_t r0, int rows, int64_t b0, int64_t b1,
                             float* s, float* mu) {
  for (int i = 0; i < rows; ++i) {
    const uint16_t* hs = c.scale + (r0 + i) * c.nb;
    const uint16_t* hm = c.mean + (r0 + i) * c.nb;
    int64_t b = b0;
    for (; b + 8 <= b1; b += 8) {
      _mm256_storeu_ps(s + i * c.nb + b, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(hs + b))));
      _mm256_storeu_ps(mu + i * c.nb + b, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(hm + b))));
    }
    for (; b < b1; ++b) {
      s[i * c.nb + b] = half_to_float(hs[b]);
      mu[i * c.nb + b] = half_to_float(hm[b]);
    }
  }
}

// Adds (kSub: subtracts) the table entries picked by the nibbles of `bits` for TT tokens.
template <int TT, bool kSub>
SDQ_AVX2 inline void lookup_word(__m256i bits, const float* lut, int64_t stride, __m256* acc) {
  for (int k = 0; k < kNibblesPerWord; ++k) {
    // vpermps reads the low 3 bits of each lane; blendv reads the top bit, so move bit 3 there.
    const __m256 high = _mm256_castsi256_ps(_mm256_slli_epi32(bits, 28));
    for (int t = 0; t < TT; ++t) {
      const float* p = lut + t * stride + k * kLutEntries;
      const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(p), bits);
      const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(p + 8), bits);
      const __m256 v = _mm256_blendv_ps(lo, hi, high);
      acc[t] = kSub ? _mm256_sub_ps(acc[t], v) : _mm256_add_ps(acc[t], v);
    }
    bits = _mm256_srli_epi32(bits, kGroup);
  }
}

// Loads words [w, w + 8) of the tile's 8 rows (words past the row end read as 0) and transposes
// them, so out[i] holds word w + i of every row: 8 loads and 24 shuffles instead of 8 gathers.
SDQ_AVX2 void load_transposed(const GemmCtx& c, const word_t* plane, const Tile& tile, int64_t w,
                              uint32_t* out) {
  alignas(32) int32_t idx[kRows], valid[kRows];
  _mm256_store_si256((__m256i*)idx, tile.word_idx);
  for (int i = 0; i < kRows; ++i) valid[i] = w + i < c.words ? -1 : 0;
  const __m256i mask = _mm256_load_si256((const __m256i*)valid);
  const word_t* base = plane + tile.r0 * c.words + w;
  __m256i r[kRows], t[kRows];
  for (int i = 0; i < kRows; ++i) {
    r[i] = _mm256_maskload_epi32((const int*)(base + idx[i]), mask);
    _mm_prefetch(reinterpret_cast<const char*>(base + idx[i] + 2 * kRows), _MM_HINT_T0);
  }
  for (int k = 0; k < 4; ++k) {  // pairs of rows, interleaved by 32 bits
    t[2 * k] = _mm256_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm256_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 2; ++k) {  // r[4k + m], 128-bit lane L: word 4L + m of rows 4k .. 4k + 3
    r[4 * k] = _mm256_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
    r[4 * k + 1] = _mm256_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
    r[4 * k + 2] = _mm256_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
    r[4 * k + 3] = _mm256_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
  }
  for (int m = 0; m < 4; ++m) {  // join the two 128-bit halves: rows 0-3 and 4-7
    _mm256_store_si256((__m256i*)(out + m * kRows), _mm256_permute2x128_si256(r[m], r[4 + m], 0x20));
    _mm256_store_si256((__m256i*)(out + (4 + m) * kRows),
                       _mm256_permute2x128_si256(r[m], r[4 + m], 0x31));
  }
}

// Tokens [t0, t0 + TT) of one row tile over blocks [b0, b1); y is accumulated across chunks.
template <int TT, bool kTernary>
SDQ_AVX2 void tile_tokens(const GemmCtx& c, const Tile& tile, int64_t t0, int64_t b0,
                          int64_t b1, const float* s, const float* mu) {
  alignas(32) uint32_t pos_t[kRows * kRows], nz_t[kRows * kRows];
  int64_t loaded = -kRows - 1;  // first word held in pos_t / nz_t
  __m256 y[TT];
  for (int t = 0; t < TT; ++t)
    y[t] = b0 == 0 ? _mm256_setzero_ps()
                   : _mm256_maskload_ps(c.y + (t0 + t) * c.out + tile.r0, tile.mask);
  for (int64_t b = b0; b < b1; ++b) {
    __m256 acc[TT];
    for (int t = 0; t < TT; ++t) acc[t] = _mm256_setzero_ps();
    const int64_t w0 = b * c.words_per_block, nw = c.block_words(b);
    for (int64_t w = w0; w < w0 + nw; ++w) {
      const float* lut = c.lut + t0 * c.lut_stride + w * kNibblesPerWord * kLutEntries;
      if (w >= loaded + kRows) {
        loaded = w;
        load_transposed(c, c.sign, tile, w, pos_t);
        if (kTernary) load_transposed(c, c.nonzero, tile, w, nz_t);
      }
      const __m256i pos = _mm256_load_si256((const __m256i*)(pos_t + (w - loaded) * kRows));
      lookup_word<TT, false>(pos, lut, c.lut_stride, acc);
      if (kTernary) {  // the -1 codes: nonzero and not sign
        const __m256i nz = _mm256_load_si256((const __m256i*)(nz_t + (w - loaded) * kRows));
        lookup_word<TT, true>(_mm256_andnot_si256(pos, nz), lut, c.lut_stride, acc);
      }
    }
    const __m256 sv = _mm256_i32gather_ps(s + b, tile.buf_idx, 4);
    const __m256 mv = _mm256_i32gather_ps(mu + b, tile.buf_idx, 4);
    for (int t = 0; t < TT; ++t) {
      const float* xs = c.xsum + (t0 + t) * c.nb;
      __m256 dot = acc[t];
      if (!kTernary)
        dot = _mm256_sub_ps(_mm256_add_ps(dot, dot), _mm256_set1_ps(c.xtsum[(t0 + t) * c.nb + b]));
      y[t] = _mm256_fmadd_ps(sv, dot, _mm256_fmadd_ps(mv, _mm256_set1_ps(xs[b]), y[t]));
    }
  }
  for (int t = 0; t < TT; ++t) _mm256_maskstore_ps(c.y + (t0 + t) * c.out + tile.r0, tile.mask, y[t]);
}

template <bool kTernary>
SDQ_AVX2 void tile_all_tokens(const GemmCtx& c, const Tile& tile, int64_t b0, int64_t b1,
                                const float* s, const float* mu) {
  for (int64_t t0 = 0; t0 < c.tokens; t0 += kMaxTokens) {
    switch (std::min<int64_t>(kMaxTokens, c.tokens - t0)) {
      case 1: tile_tokens<1, kTernary>(c, tile, t0, b0, b1, s, mu); break;
      case 2: tile_tokens<2, kTernary>(c, tile, t0, b0, b1, s, mu); break;
      case 3: tile_tokens<3, kTernary>(c, tile, t0, b0, b1, s, mu); break;
      default: tile_tokens<4, kTernary>(c, tile, t0, b0, b1, s, mu); break;
    }
  }
}

SDQ_AVX2 Tile make_tile(const GemmCtx& c, int64_t r0, int rows) {
  alignas(32) int32_t words[kRows], bufs[kRows], mask[kRows];
  for (int i = 0; i < kRows; ++i) {
    mask[i] = i < rows ? -1 : 0;
    const int j = std::min(i, rows - 1);  // padding lanes repeat the last row: valid addresses
    words[i] = static_cast<int32_t>(j * c.words);
    bufs[i] = static_cast<int32_t>(j * c.nb);
  }
  return Tile{r0, _mm256_load_si256((const __m256i*)mask), _mm256_load_si256((const __m256i*)words),
              _mm256_load_si256((const __m256i*)bufs)};
}

}  // namespace

SDQ_AVX2 void gemm_rows_avx2(const GemmCtx& c, int64_t begin, int64_t end) {
  // Scales of one tile: converted for the blocks of a chunk before they are read.
  float* s = scratch<float>(ScratchSlot::gemm_rows, 2 * kRows * c.nb);
  float* mu = s + kRows * c.nb;
  // Block chunks outermost: their tables (all tokens) stay in cache while every row passes.
  const int64_t block_bytes = c.words_per_block * kNibblesPerWord * kLutEntries * 4;
  const int64_t chunk = std::max<int64_t>(1, kL2Bytes / (block_bytes * c.tokens));
  for (int64_t b0 = 0; b0 < c.nb; b0 += chunk) {
    const int64_t b1 = std::min(c.nb, b0 + chunk);
    for (int64_t r0 = begin; r0 < end; r0 += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, end - r0));
      const Tile tile = make_tile(c, r0, rows);
      convert_scales(c, r0, rows, b0, b1, s, mu);
      if (c.ternary)
        tile_all_tokens<true>(c, tile, b0, b1, s, mu);
      else
        tile_all_tokens<false>(c, tile, b0, b1, s, mu);
    }
  }
}

}  // namespace sdq::detail

#else  // not x86-64: never selected (cpu_has is false), defined so the build links

namespace sdq::detail {
void gemm_rows_avx2(const GemmCtx& c, int64_t begin, int64_t end) {
  gemm_rows_portable(c, begin, end);
}
}  // namespace sdq::detail

#endif
