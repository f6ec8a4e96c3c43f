// AVX2 int8 look-up GEMM (sdq/lut_gemm.h). One 32-byte load of a packed tile holds one pair of
// groups (8 codes) of 32 rows; vpshufb looks up the low nibbles in group 2p's 16-byte table and
// the high nibbles in group 2p+1's (each table broadcast to both 128-bit lanes straight from
// memory), vpunpck{l,h}bw interleaves the two results per row and vpmaddubsw by 1 adds them into
// int16 lanes: 8 codes x 32 rows per ~11 instructions, no float work until the end of a block.
// R tiles share every table load. Also the AVX2 table builder and scale transpose, which the
// AVX-512 variant uses too (every AVX-512 CPU has AVX2).
// Compiled with a target attribute so the build needs no -mavx2; chosen at run time.
#include "fp16_rows.h"
#include "lut_gemm.h"
#include "scale_tiles.h"
#include "scratch.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#define SDQ_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace sdq::detail {
namespace {

constexpr int kTile = static_cast<int>(kLutTileRows);
constexpr int kMaxR = 2;  // tiles per pass (registers: 2 int16 sums per tile)

// Entries of one group: lanes i = 0..7 of lo are e[i], of hi e[8 + i] (sdq/lut_gemm.h): the
// same float additions in the same order as lut_tables_portable. Signs flip by xor: exact.
SDQ_AVX2 inline void group_entries(const float* x, __m256& lo, __m256& hi) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  // lane i: sign bit set where bit j of i is clear (that x_j enters negated)
  const __m256 m0 = _mm256_castsi256_ps(_mm256_setr_epi32(
      INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0, INT32_MIN, 0));
  const __m256 m1 = _mm256_castsi256_ps(_mm256_setr_epi32(
      INT32_MIN, INT32_MIN, 0, 0, INT32_MIN, INT32_MIN, 0, 0));
  const __m256 m2 = _mm256_castsi256_ps(_mm256_setr_epi32(
      INT32_MIN, INT32_MIN, INT32_MIN, INT32_MIN, 0, 0, 0, 0));
  const __m256 c = _mm256_add_ps(
      _mm256_add_ps(_mm256_xor_ps(_mm256_broadcast_ss(x), m0),
                    _mm256_xor_ps(_mm256_broadcast_ss(x + 1), m1)),
      _mm256_xor_ps(_mm256_broadcast_ss(x + 2), m2));
  const __m256 x3 = _mm256_broadcast_ss(x + 3);
  lo = _mm256_add_ps(c, _mm256_xor_ps(x3, sign));
  hi = _mm256_add_ps(c, x3);
}

SDQ_AVX2 inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}

// 8x8 transpose of 16-bit values: in[i] = 8 values of row i; out[j] = value j of rows 0..7.
SDQ_AVX2 inline void transpose8x8_epi16(const __m128i* in, __m128i* out) {
  __m128i t[8], u[8];
  for (int k = 0; k < 4; ++k) {
    t[2 * k] = _mm_unpacklo_epi16(in[2 * k], in[2 * k + 1]);
    t[2 * k + 1] = _mm_unpackhi_epi16(in[2 * k], in[2 * k + 1]);
  }
  for (int k = 0; k < 2; ++k) {  // rows 4k .. 4k+3: u[4k + m] holds columns 2m, 2m+1
    u[4 * k] = _mm_unpacklo_epi32(t[4 * k], t[4 * k + 2]);
    u[4 * k + 1] = _mm_unpackhi_epi32(t[4 * k], t[4 * k + 2]);
    u[4 * k + 2] = _mm_unpacklo_epi32(t[4 * k + 1], t[4 * k + 3]);
    u[4 * k + 3] = _mm_unpackhi_epi32(t[4 * k + 1], t[4 * k + 3]);
  }
  for (int m = 0; m < 4; ++m) {
    out[2 * m] = _mm_unpacklo_epi64(u[m], u[4 + m]);
    out[2 * m + 1] = _mm_unpackhi_epi64(u[m], u[4 + m]);
  }
}

// Sums of the look-ups of pairs [p0, p0 + np) of R tiles (codes: the first tile) for one token's
// tables q, added to acc[r][k] = int32 sums of rows 8k .. 8k+7 of tile r.
template <int R>
SDQ_AVX2 void block_sums(const uint8_t* codes, int64_t tile_bytes, const int8_t* q, int64_t p0,
                         int64_t np, __m256i (*acc)[4]) {
  const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi8(1);
  for (int64_t c0 = p0; c0 < p0 + np; c0 += kLutFlushPairs) {
    const int64_t c1 = std::min(p0 + np, c0 + kLutFlushPairs);
    __m256i lo[R], hi[R];  // int16 sums; lo: rows 0-7 | 16-23, hi: rows 8-15 | 24-31
    for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
    for (int64_t p = c0; p < c1; ++p) {
      const int8_t* t = q + 2 * p * kLutEntries;
      const __m256i tlo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)t));
      const __m256i thi =
          _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(t + kLutEntries)));
      for (int r = 0; r < R; ++r) {
        if (p % 2 == 0) _mm_prefetch((const char*)(codes + r * tile_bytes + p * kTile + kLutPrefetchBytes), _MM_HINT_T0);
        const __m256i v = _mm256_loadu_si256((const __m256i*)(codes + r * tile_bytes + p * kTile));
        const __m256i a = _mm256_shuffle_epi8(tlo, _mm256_and_si256(v, low));
        const __m256i b = _mm256_shuffle_epi8(thi, _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
        lo[r] = _mm256_add_epi16(lo[r], _mm256_maddubs_epi16(ones, _mm256_unpacklo_epi8(a, b)));
        hi[r] = _mm256_add_epi16(hi[r], _mm256_maddubs_epi16(ones, _mm256_unpackhi_epi8(a, b)));
      }
    }
    for (int r = 0; r < R; ++r) {
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(lo[r])));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(hi[r])));
      acc[r][2] = _mm256_add_epi32(acc[r][2], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(lo[r], 1)));
      acc[r][3] = _mm256_add_epi32(acc[r][3], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(hi[r], 1)));
    }
  }
}

// R tiles from tile k0, every token: y over all blocks, then stored (rows < out).
template <int R>
SDQ_AVX2 void tiles(const LutCtx& c, int64_t k0, float* ybuf) {
  constexpr int W = R * kTile;
  const int64_t r0 = k0 * kTile;
  std::memset(ybuf, 0, sizeof(float) * W * c.tokens);
  const uint8_t* codes = c.packed + k0 * c.tile_bytes;
  for (int64_t b = 0, p0 = 0; b < c.nb; p0 += c.block_pairs(b), ++b) {
    for (int64_t t = 0; t < c.tokens; ++t) {
      __m256i acc[R][4];
      for (int r = 0; r < R; ++r)
        for (int k = 0; k < 4; ++k) acc[r][k] = _mm256_setzero_si256();
      block_sums<R>(codes, c.tile_bytes, c.q + t * c.groups * kLutEntries, p0, c.block_pairs(b), acc);
      const __m256 ts = _mm256_set1_ps(c.tscale[t * c.nb + b]);
      const __m256 xs = _mm256_set1_ps(c.xsum[t * c.nb + b]);
      for (int r = 0; r < R; ++r)
        for (int k = 0; k < 4; ++k) {
          const int i = r * kTile + 8 * k;
          const uint16_t* sp = tile_scales(c.scale_tiles, c.nb, k0 + r, b) + 8 * k;
          const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)sp));
          const __m256 mu = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sp + c.nb * kTile)));
          float* yp = ybuf + t * W + i;
          const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][k]), ts);
          _mm256_storeu_ps(yp, _mm256_fmadd_ps(f, s, _mm256_fmadd_ps(mu, xs, _mm256_loadu_ps(yp))));
        }
    }
  }
  const int64_t rows = std::min<int64_t>(W, c.out - r0);
  for (int64_t t = 0; t < c.tokens; ++t)
    std::memcpy(c.y + t * c.out + r0, ybuf + t * W, sizeof(float) * rows);
}

}  // namespace

SDQ_AVX2 void lut_block_tables_avx2(const LutTableShape& s, const float* xt, int64_t b, int8_t* q,
                                    float* tscale) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const int64_t g0 = b * s.groups_per_block;
  const int64_t n = b == s.nb - 1 ? s.last_groups : s.groups_per_block;  // a multiple of 8
  __m256 m = _mm256_setzero_ps();
  for (int64_t g = g0; g < g0 + n; ++g) {  // max |e| = max of the hi half's |e| (e[15-i] = -e[i])
    __m256 lo, hi;
    group_entries(xt + g * kLutGroup, lo, hi);
    m = _mm256_max_ps(m, _mm256_and_ps(hi, abs_mask));
  }
  const float amax = hmax(m);
  const bool tiny = !(amax >= kLutTinyAmax);
  const __m256 inv = _mm256_set1_ps(tiny ? 0.0f : static_cast<float>(kLutQMax) / amax);
  tscale[b] = tiny ? 0.0f : amax / static_cast<float>(kLutQMax);
  for (int64_t g = g0; g < g0 + n; g += 2) {  // two groups: 32 entries, one 32-byte store
    __m256 e[4];
    group_entries(xt + g * kLutGroup, e[0], e[1]);
    group_entries(xt + (g + 1) * kLutGroup, e[2], e[3]);
    __m256i v[4];
    for (int k = 0; k < 4; ++k) v[k] = _mm256_cvtps_epi32(_mm256_mul_ps(e[k], inv));  // rint
    // packs work per 128-bit lane: [g: 0-3 8-11, g+1: 0-3 8-11 | g: 4-7 12-15, g+1: 4-7 12-15]
    const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    const __m256i bounded = _mm256_max_epi8(w, _mm256_set1_epi8(-kLutQMax));
    const __m256i both = _mm256_permutevar8x32_epi32(bounded, order);  // [table g | table g+1]
    if (s.word_order) {
      _mm_storeu_si128((__m128i*)(q + lut_table_slot(g, true) * kLutEntries), _mm256_castsi256_si128(both));
      _mm_storeu_si128((__m128i*)(q + lut_table_slot(g + 1, true) * kLutEntries),
                       _mm256_extracti128_si256(both, 1));
    } else {
      _mm256_storeu_si256((__m256i*)(q + g * kLutEntries), both);
    }
  }
}

SDQ_AVX2 void lut_transpose_scales_avx2(const LutCtx& c, int64_t r0, int64_t width, uint16_t* s,
                                        uint16_t* mu) {
  const uint16_t* src[2] = {c.scale, c.mean};
  uint16_t* dst[2] = {s, mu};
  for (int which = 0; which < 2; ++which) {
    for (int64_t i0 = 0; i0 < width; i0 += 8) {
      // Every block through the 8x8 transpose, the last nb % 8 too (a 576-wide layer has 5 in
      // all); rows past out are zero.
      for (int64_t b0 = 0; b0 < c.nb; b0 += 8) {
        const int64_t n = std::min<int64_t>(8, c.nb - b0);
        __m128i in[8], out[8];
        for (int i = 0; i < 8; ++i)
          in[i] = r0 + i0 + i < c.out
                      ? load_fp16x8(src[which], (r0 + i0 + i) * c.nb + b0, c.out * c.nb, n)
                      : _mm_setzero_si128();
        transpose8x8_epi16(in, out);
        for (int64_t j = 0; j < n; ++j)
          _mm_storeu_si128((__m128i*)(dst[which] + (b0 + j) * width + i0), out[j]);
      }
    }
  }
}

SDQ_AVX2 void lut_rows_avx2(const LutCtx& c, int64_t tile_begin, int64_t tile_end) {
  // Per worker: y [tokens, R * 32].
  constexpr int64_t W = kMaxR * kTile;
  auto* ybuf = scratch<float>(ScratchSlot::lut_rows, c.tokens * W);
  int64_t k = tile_begin;
  for (; k + kMaxR <= tile_end; k += kMaxR) tiles<kMaxR>(c, k, ybuf);
  for (; k < tile_end; ++k) tiles<1>(c, k, ybuf);
}

}  // namespace sdq::detail

#else  // not x86-64: never selected (cpu_has is false), defined so the build links

namespace sdq::detail {
void lut_block_tables_avx2(const LutTableShape& s, const float* xt, int64_t b, int8_t* q,
                           float* tscale) {
  lut_block_tables_portable(s, xt, b, q, tscale);
}
void lut_transpose_scales_avx2(const LutCtx&, int64_t, int64_t, uint16_t*, uint16_t*) {}
void lut_rows_avx2(const LutCtx& c, int64_t tile_begin, int64_t tile_end) {
  lut_rows_portable(c, tile_begin, tile_end);
}
}  // namespace sdq::detail

#endif
