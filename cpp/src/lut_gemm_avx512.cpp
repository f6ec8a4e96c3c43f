// AVX-512BW int8 look-up GEMM (sdq/lut_gemm.h). One 64-byte load of a packed tile holds two
// pairs of groups (16 codes) of 32 rows: 128-bit lanes [pair p: rows 0-15 | p: 16-31 |
// p+1: 0-15 | p+1: 16-31]. The four tables of the two pairs are one 64-byte load, spread to
// [T2p, T2p, T2p+2, T2p+2] (low nibbles) and [T2p+1, .., T2p+3, ..] (high nibbles) by vshufi64x2;
// then vpshufb, vpunpck{l,h}bw and vpmaddubsw by 1 as in the AVX2 variant, 16 codes x 32 rows per
// vector. The two pairs' int16 sums sit in different lanes and are added as int32 at a flush.
// Table building is the AVX2 one (lut_gemm_avx2.cpp); the scales come laid out per tile
// (scale_tiles.h).
// Compiled with a target attribute so the build needs no -mavx512bw; chosen at run time.
#include "lut_gemm.h"
#include "scale_tiles.h"
#include "scratch.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// GCC 12's avx512fintrin.h seeds masked and shuffle intrinsics with _mm512_undefined_*(), which
// its own -W(maybe-)uninitialized flags when inlined into a target-attribute function: a false
// positive.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#define SDQ_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw")))
#define SDQ_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vbmi,avx512vnni")))

namespace sdq::detail {
namespace {

constexpr int kTile = static_cast<int>(kLutTileRows);
constexpr int kMaxR = 2;  // tiles per pass

// Sums of the look-ups of pairs [p0, p0 + np) (np even) of R tiles for one token's tables q,
// added to acc[r][0] = int32 sums of rows 0-15 and acc[r][1] = rows 16-31 of tile r.
template <int R>
SDQ_AVX512 void block_sums(const uint8_t* codes, int64_t tile_bytes, const int8_t* q, int64_t p0,
                           int64_t np, __m512i (*acc)[2]) {
  const __m512i low = _mm512_set1_epi8(0x0f), ones = _mm512_set1_epi8(1);
  for (int64_t c0 = p0; c0 < p0 + np; c0 += kLutFlushPairs) {
    const int64_t c1 = std::min(p0 + np, c0 + kLutFlushPairs);
    __m512i lo[R], hi[R];  // int16; lo lanes: rows 0-7 | 16-23 (pair p) | 0-7 | 16-23 (p+1)
    for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm512_setzero_si512();
    for (int64_t p = c0; p < c1; p += 2) {
      const __m512i t4 = _mm512_loadu_si512(q + 2 * p * kLutEntries);
      const __m512i tlo = _mm512_shuffle_i64x2(t4, t4, 0xA0);  // 128-bit lanes 0, 0, 2, 2
      const __m512i thi = _mm512_shuffle_i64x2(t4, t4, 0xF5);  // 1, 1, 3, 3
      for (int r = 0; r < R; ++r) {
        _mm_prefetch((const char*)(codes + r * tile_bytes + p * kTile + kLutPrefetchBytes), _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(codes + r * tile_bytes + p * kTile);
        const __m512i a = _mm512_shuffle_epi8(tlo, _mm512_and_si512(v, low));
        const __m512i b = _mm512_shuffle_epi8(thi, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
        lo[r] = _mm512_add_epi16(lo[r], _mm512_maddubs_epi16(ones, _mm512_unpacklo_epi8(a, b)));
        hi[r] = _mm512_add_epi16(hi[r], _mm512_maddubs_epi16(ones, _mm512_unpackhi_epi8(a, b)));
      }
    }
    for (int r = 0; r < R; ++r) {
      // int32 of rows [0-7, 16-23] and [8-15, 24-31], the two pairs added
      const __m512i a = _mm512_add_epi32(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(lo[r])),
                                         _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(lo[r], 1)));
      const __m512i b = _mm512_add_epi32(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(hi[r])),
                                         _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(hi[r], 1)));
      acc[r][0] = _mm512_add_epi32(acc[r][0], _mm512_shuffle_i64x2(a, b, 0x44));  // rows 0-15
      acc[r][1] = _mm512_add_epi32(acc[r][1], _mm512_shuffle_i64x2(a, b, 0xEE));  // rows 16-31
    }
  }
}

// avx512-vnni: the codes of 4 pairs (one word) of 32 rows are two 64-byte loads; vpermt2b gathers
// each row's 4 bytes into one dword (16 rows per vector). With the tables in word order
// (lut_table_slot), the low nibbles of those 4 bytes look up groups 2p, 2p+2, 2p+4, 2p+6: one
// 64-entry vpermb on one 64-byte table load, the byte's position in its dword picking the table
// (index | 16 j); likewise the high nibbles in the next 64 bytes. vpdpbusd by 1 then adds each
// dword's 4 bytes into an int32 lane: no int16 stage, no flush. Same acc as block_sums.
template <int R>
__attribute__((noinline)) SDQ_VNNI void block_sums_vnni(const uint8_t* codes, int64_t tile_bytes, const int8_t* q, int64_t p0,
                              int64_t np, __m512i (*acc)[2]) {
  alignas(64) static const auto idx = [] {  // byte 4i + j of half h: pair j of row 16h + i
    struct { uint8_t b[2][64]; } t{};
    for (int h = 0; h < 2; ++h)
      for (int i = 0; i < 16; ++i)
        for (int j = 0; j < 4; ++j) t.b[h][4 * i + j] = static_cast<uint8_t>(32 * j + 16 * h + i);
    return t;
  }();
  const __m512i gather[2] = {_mm512_load_si512(idx.b[0]), _mm512_load_si512(idx.b[1])};
  const __m512i low = _mm512_set1_epi8(0x0f), ones = _mm512_set1_epi8(1);
  const __m512i sel = _mm512_set1_epi32(0x30201000);  // byte j of a dword: table j (16 j)
  for (int64_t p = p0; p < p0 + np; p += 4) {
    const __m512i ta = _mm512_loadu_si512(q + 2 * p * kLutEntries);       // low nibbles' tables
    const __m512i tb = _mm512_loadu_si512(q + 2 * p * kLutEntries + 64);  // high nibbles'
    for (int r = 0; r < R; ++r) {
      const uint8_t* v = codes + r * tile_bytes + p * kTile;
      _mm_prefetch((const char*)(v + kLutPrefetchBytes), _MM_HINT_T0);
      _mm_prefetch((const char*)(v + kLutPrefetchBytes + 64), _MM_HINT_T0);
      const __m512i v0 = _mm512_loadu_si512(v), v1 = _mm512_loadu_si512(v + 64);
      for (int h = 0; h < 2; ++h) {
        const __m512i w = _mm512_permutex2var_epi8(v0, gather[h], v1);
        const __m512i ilo = _mm512_ternarylogic_epi32(w, low, sel, 0xEA);  // (w & low) | sel
        const __m512i ihi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), low, sel, 0xEA);
        acc[r][h] = _mm512_dpbusd_epi32(acc[r][h], ones, _mm512_permutexvar_epi8(ilo, ta));
        acc[r][h] = _mm512_dpbusd_epi32(acc[r][h], ones, _mm512_permutexvar_epi8(ihi, tb));
      }
    }
  }
}

// R tiles from tile k0, every token: y over all blocks, then stored (rows < out).
// kVnni: block_sums_vnni, compiled for VBMI + VNNI and called (not inlined: its target is wider),
// so that the avx512 variant's code never holds a VBMI instruction.
template <int R, bool kVnni>
SDQ_AVX512 void tiles(const LutCtx& c, int64_t k0, float* ybuf) {
  constexpr int W = R * kTile;
  const int64_t r0 = k0 * kTile;
  std::memset(ybuf, 0, sizeof(float) * W * c.tokens);
  const uint8_t* codes = c.packed + k0 * c.tile_bytes;
  for (int64_t b = 0, p0 = 0; b < c.nb; p0 += c.block_pairs(b), ++b) {
    for (int64_t t = 0; t < c.tokens; ++t) {
      __m512i acc[R][2];
      for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
      const int8_t* q = c.q + t * c.groups * kLutEntries;
      if (kVnni)
        block_sums_vnni<R>(codes, c.tile_bytes, q, p0, c.block_pairs(b), acc);
      else
        block_sums<R>(codes, c.tile_bytes, q, p0, c.block_pairs(b), acc);
      const __m512 ts = _mm512_set1_ps(c.tscale[t * c.nb + b]);
      const __m512 xs = _mm512_set1_ps(c.xsum[t * c.nb + b]);
      for (int r = 0; r < R; ++r)
        for (int k = 0; k < 2; ++k) {
          const int i = r * kTile + 16 * k;
          const uint16_t* sp = tile_scales(c.scale_tiles, c.nb, k0 + r, b) + 16 * k;
          const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)sp));
          const __m512 mu =
              _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sp + c.nb * kTile)));
          float* yp = ybuf + t * W + i;
          const __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][k]), ts);
          _mm512_storeu_ps(yp, _mm512_fmadd_ps(f, s, _mm512_fmadd_ps(mu, xs, _mm512_loadu_ps(yp))));
        }
    }
  }
  const int64_t rows = std::min<int64_t>(W, c.out - r0);
  for (int64_t t = 0; t < c.tokens; ++t)
    std::memcpy(c.y + t * c.out + r0, ybuf + t * W, sizeof(float) * rows);
}

}  // namespace

template <bool kVnni>
SDQ_AVX512 void rows(const LutCtx& c, int64_t tile_begin, int64_t tile_end) {
  // Per worker: y [tokens, R * 32].
  constexpr int64_t W = kMaxR * kTile;
  auto* ybuf = scratch<float>(ScratchSlot::lut_rows, c.tokens * W);
  int64_t k = tile_begin;
  for (; k + kMaxR <= tile_end; k += kMaxR) tiles<kMaxR, kVnni>(c, k, ybuf);
  for (; k < tile_end; ++k) tiles<1, kVnni>(c, k, ybuf);
}

SDQ_AVX512 void lut_rows_avx512(const LutCtx& c, int64_t tile_begin, int64_t tile_end) {
  rows<false>(c, tile_begin, tile_end);
}

SDQ_AVX512 void lut_rows_avx512_vnni(const LutCtx& c, int64_t tile_begin, int64_t tile_end) {
  rows<true>(c, tile_begin, tile_end);
}

}  // namespace sdq::detail

#else  // not x86-64: never selected (cpu_has is false), defined so the build links

namespace sdq::detail {
void lut_rows_avx512(const LutCtx& c, int64_t tile_begin, int64_t tile_end) {
  lut_rows_portable(c, tile_begin, tile_end);
}
void lut_rows_avx512_vnni(const LutCtx& c, int64_t tile_begin, int64_t tile_end) {
  lut_rows_portable(c, tile_begin, tile_end);
}
}  // namespace sdq::detail

#endif
