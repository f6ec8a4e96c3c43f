// AVX-512 add-only GEMM: 16 output rows per vector. A vector holds the same code word of 16 rows;
// each 4-bit nibble of it indexes that group's 16-entry table with a single vpermps (the table is
// exactly one register), so 4 codes x 16 rows cost one shift, one permute, one add. Each table
// register serves up to 4 row vectors, and the tables of a chunk of blocks stay in cache while
// every row passes. Code words are loaded row by row and transposed in registers: a 16-row gather
// costs several times more (measured on Zen 4: 1.7 ms -> 1.05 ms for a 4096 x 4096 OSR-2 layer).
// Compiled with a target attribute so the build needs no -mavx512f; chosen at run time.
#include "gemm_addonly.h"
#include "scratch.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// GCC 12's avx512fintrin.h seeds masked and shuffle intrinsics with _mm512_undefined_*(), which
// its own -W(maybe-)uninitialized flags when inlined into a target-attribute function: a false
// positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>

#define SDQ_AVX512 __attribute__((target("avx512f")))

namespace sdq::detail {
namespace {

constexpr int kLanes = 16;         // rows per vector
constexpr int kMaxTiles = 4;       // vectors of rows sharing one table load
constexpr int kMaxTokens = 4;      // tokens per pass over the codes
constexpr int64_t kCacheBytes = 256 << 10;  // tables of a block chunk: a quarter of L2 (measured)

// A group of up to kMaxTiles * 16 consecutive rows starting at r0.
struct Group {
  int64_t r0;
  __mmask16 mask[kMaxTiles];     // lanes holding real rows
  __m512i word_idx[kMaxTiles];   // word offset of each lane's row from r0 (clamped to a real row)
  __m512i buf_idx[kMaxTiles];    // offset of each lane's row in the converted scale buffers
};

SDQ_AVX512 Group make_group(const GemmCtx& c, int64_t r0, int rows) {
  Group g;
  g.r0 = r0;
  for (int j = 0; j < kMaxTiles; ++j) {
    alignas(64) int32_t words[kLanes], bufs[kLanes];
    int live = 0;
    for (int i = 0; i < kLanes; ++i) {
      const int row = j * kLanes + i;
      live += row < rows;
      const int clamped = std::min(row, rows - 1);  // padding lanes re-read a real row
      words[i] = static_cast<int32_t>(clamped * c.words);
      bufs[i] = static_cast<int32_t>(clamped * c.nb);
    }
    g.mask[j] = static_cast<__mmask16>((1u << live) - 1);
    g.word_idx[j] = _mm512_load_si512(words);
    g.buf_idx[j] = _mm512_load_si512(bufs);
  }
  return g;
}

// Converts fp16 scale and mean of `rows` rows from r0, blocks [b0, b1), into [rows, nb] floats.
SDQ_AVX512 void convert_scales(const GemmCtx& c, int64_t r0, int rows, int64_t b0, int64_t b1,
                               float* s, float* mu) {
  for (int i = 0; i < rows; ++i) {
    const uint16_t* hs = c.scale + (r0 + i) * c.nb;
    const uint16_t* hm = c.mean + (r0 + i) * c.nb;
    int64_t b = b0;
    for (; b + 16 <= b1; b += 16) {
      _mm512_storeu_ps(s + i * c.nb + b, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(hs + b))));
      _mm512_storeu_ps(mu + i * c.nb + b, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(hm + b))));
    }
    for (; b < b1; ++b) {
      s[i * c.nb + b] = half_to_float(hs[b]);
      mu[i * c.nb + b] = half_to_float(hm[b]);
    }
  }
}

// One code word of RT row vectors, TT tokens: each table register is loaded once and permuted
// by every row vector's nibble (vpermps reads only the low 4 bits of each lane).
template <int RT, int TT, bool kTernary>
SDQ_AVX512 inline void lookup_word(__m512i* pos, __m512i* neg, const float* lut, int64_t stride,
                                   __m512 (*acc)[TT]) {
  for (int k = 0; k < kNibblesPerWord; ++k) {
    for (int t = 0; t < TT; ++t) {
      const __m512 table = _mm512_loadu_ps(lut + t * stride + k * kLutEntries);
      for (int j = 0; j < RT; ++j) {
        acc[j][t] = _mm512_add_ps(acc[j][t], _mm512_permutexvar_ps(pos[j], table));
        if (kTernary) acc[j][t] = _mm512_sub_ps(acc[j][t], _mm512_permutexvar_ps(neg[j], table));
      }
    }
    for (int j = 0; j < RT; ++j) {
      pos[j] = _mm512_srli_epi32(pos[j], kGroup);
      if (kTernary) neg[j] = _mm512_srli_epi32(neg[j], kGroup);
    }
  }
}

// Loads words [w, w + 16) of the 16 rows of tile j (clamped rows; words past the row end read as
// 0) and transposes them, so out[i] holds word w + i of every row: 16 contiguous loads and 64
// shuffles instead of 16 gathers, which cost several times more on the CPUs measured.
SDQ_AVX512 void load_transposed(const GemmCtx& c, const word_t* plane, const Group& g, int j,
                                int64_t w, uint32_t* out) {
  alignas(64) int32_t idx[kLanes];
  _mm512_store_si512(idx, g.word_idx[j]);
  const __mmask16 valid = static_cast<__mmask16>(
      c.words - w >= kLanes ? 0xffffu : (1u << (c.words - w)) - 1);
  const word_t* base = plane + g.r0 * c.words + w;
  __m512i r[kLanes], t[kLanes];
  for (int i = 0; i < kLanes; ++i) {
    r[i] = _mm512_maskz_loadu_epi32(valid, base + idx[i]);
    // 16 x kMaxTiles rows are 64 streams, more than the hardware prefetcher follows: ask for the
    // row's next line ourselves (a prefetch past the end of the array is harmless).
    _mm_prefetch(reinterpret_cast<const char*>(base + idx[i] + 2 * kLanes), _MM_HINT_T0);
  }
  for (int k = 0; k < 8; ++k) {  // pairs of rows, interleaved by 32 bits
    t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {  // u[4k + m], 128-bit lane L: word 4L + m of rows 4k .. 4k + 3
    r[4 * k] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
    r[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
    r[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
    r[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
  }
  for (int m = 0; m < 4; ++m) {  // a 4 x 4 transpose of 128-bit lanes
    const __m512i v0 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(r[m], r[4 + m], 0xee);
    const __m512i v2 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(r[8 + m], r[12 + m], 0xee);
    _mm512_store_si512(out + (0 + m) * kLanes, _mm512_shuffle_i32x4(v0, v2, 0x88));
    _mm512_store_si512(out + (4 + m) * kLanes, _mm512_shuffle_i32x4(v0, v2, 0xdd));
    _mm512_store_si512(out + (8 + m) * kLanes, _mm512_shuffle_i32x4(v1, v3, 0x88));
    _mm512_store_si512(out + (12 + m) * kLanes, _mm512_shuffle_i32x4(v1, v3, 0xdd));
  }
}

// Rows of group g (RT vectors), tokens [t0, t0 + TT), blocks [b0, b1); y accumulates across chunks.
template <int RT, int TT, bool kTernary>
SDQ_AVX512 void group_pass(const GemmCtx& c, const Group& g, int64_t t0, int64_t b0, int64_t b1,
                           const float* s, const float* mu) {
  alignas(64) uint32_t pos_t[RT][kLanes * kLanes], neg_t[kTernary ? RT : 1][kLanes * kLanes];
  int64_t loaded = -kLanes - 1;  // first word held in pos_t / neg_t
  __m512 y[RT][TT];
  for (int j = 0; j < RT; ++j)
    for (int t = 0; t < TT; ++t)
      y[j][t] = b0 == 0 ? _mm512_setzero_ps()
                        : _mm512_maskz_loadu_ps(g.mask[j], c.y + (t0 + t) * c.out + g.r0 + j * kLanes);
  for (int64_t b = b0; b < b1; ++b) {
    __m512 acc[RT][TT];
    for (int j = 0; j < RT; ++j)
      for (int t = 0; t < TT; ++t) acc[j][t] = _mm512_setzero_ps();
    const int64_t w0 = b * c.words_per_block, nw = c.block_words(b);
    for (int64_t w = w0; w < w0 + nw; ++w) {
      if (w >= loaded + kLanes) {
        loaded = w;
        for (int j = 0; j < RT; ++j) {
          load_transposed(c, c.sign, g, j, w, pos_t[j]);
          if (kTernary) load_transposed(c, c.nonzero, g, j, w, neg_t[j]);
        }
      }
      __m512i pos[RT], neg[RT];
      for (int j = 0; j < RT; ++j) {
        pos[j] = _mm512_load_si512(pos_t[j] + (w - loaded) * kLanes);
        if (kTernary)  // the -1 codes: nonzero and not sign
          neg[j] = _mm512_andnot_si512(pos[j], _mm512_load_si512(neg_t[j] + (w - loaded) * kLanes));
      }
      const float* lut = c.lut + t0 * c.lut_stride + w * kNibblesPerWord * kLutEntries;
      lookup_word<RT, TT, kTernary>(pos, neg, lut, c.lut_stride, acc);
    }
    for (int j = 0; j < RT; ++j) {
      const __m512 sv = _mm512_i32gather_ps(g.buf_idx[j], s + b, 4);
      const __m512 mv = _mm512_i32gather_ps(g.buf_idx[j], mu + b, 4);
      for (int t = 0; t < TT; ++t) {
        __m512 dot = acc[j][t];
        if (!kTernary)  // <q, x> = 2 * (sum where bit set) - sum
          dot = _mm512_sub_ps(_mm512_add_ps(dot, dot), _mm512_set1_ps(c.xtsum[(t0 + t) * c.nb + b]));
        const __m512 xs = _mm512_set1_ps(c.xsum[(t0 + t) * c.nb + b]);
        y[j][t] = _mm512_fmadd_ps(sv, dot, _mm512_fmadd_ps(mv, xs, y[j][t]));
      }
    }
  }
  for (int j = 0; j < RT; ++j)
    for (int t = 0; t < TT; ++t)
      _mm512_mask_storeu_ps(c.y + (t0 + t) * c.out + g.r0 + j * kLanes, g.mask[j], y[j][t]);
}

// All kMaxTiles row vectors in every pass: measured faster than fewer tiles for more tokens, even
// though 4 x 4 accumulators and 4 x 4 y sums exceed 32 registers (the y sums, touched once per
// block, are the cheap ones to keep in memory).
template <int TT, bool kTernary>
SDQ_AVX512 void token_tile(const GemmCtx& c, int64_t begin, int64_t end, int64_t t0, float* s,
                           float* mu) {
  constexpr int RT = kMaxTiles;
  const int64_t block_bytes = c.words_per_block * kNibblesPerWord * kLutEntries * 4;
  const int64_t chunk = std::max<int64_t>(1, kCacheBytes / (block_bytes * TT));
  for (int64_t b0 = 0; b0 < c.nb; b0 += chunk) {
    const int64_t b1 = std::min(c.nb, b0 + chunk);
    for (int64_t r0 = begin; r0 < end; r0 += RT * kLanes) {
      const int rows = static_cast<int>(std::min<int64_t>(RT * kLanes, end - r0));
      const Group g = make_group(c, r0, rows);
      convert_scales(c, r0, rows, b0, b1, s, mu);
      group_pass<RT, TT, kTernary>(c, g, t0, b0, b1, s, mu);
    }
  }
}

template <bool kTernary>
SDQ_AVX512 void all_tokens(const GemmCtx& c, int64_t begin, int64_t end, float* s, float* mu) {
  for (int64_t t0 = 0; t0 < c.tokens; t0 += kMaxTokens) {
    switch (std::min<int64_t>(kMaxTokens, c.tokens - t0)) {
      case 1: token_tile<1, kTernary>(c, begin, end, t0, s, mu); break;
      case 2: token_tile<2, kTernary>(c, begin, end, t0, s, mu); break;
      case 3: token_tile<3, kTernary>(c, begin, end, t0, s, mu); break;
      default: token_tile<4, kTernary>(c, begin, end, t0, s, mu); break;
    }
  }
}

}  // namespace

SDQ_AVX512 void gemm_rows_avx512(const GemmCtx& c, int64_t begin, int64_t end) {
  // Scales of one row group: converted for the blocks of a chunk before they are read.
  float* s = scratch<float>(ScratchSlot::gemm_rows, 2 * kMaxTiles * kLanes * c.nb);
  float* mu = s + kMaxTiles * kLanes * c.nb;
  if (c.ternary)
    all_tokens<true>(c, begin, end, s, mu);
  else
    all_tokens<false>(c, begin, end, s, mu);
}

}  // namespace sdq::detail

#else  // not x86-64: never selected (cpu_has is false), defined so the build links

namespace sdq::detail {
void gemm_rows_avx512(const GemmCtx& c, int64_t begin, int64_t end) {
  gemm_rows_portable(c, begin, end);
}
}  // namespace sdq::detail

#endif
