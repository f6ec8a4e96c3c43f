// amx_gemm_binary / amx_gemm_ternary (sdq/amx_gemm.h): activations rounded to int8 per (token,
// span of blocks), the codes of each 32-row tile and block unpacked to int8 in AMX's B-tile layout
// (binary: times the block's int8 scale; one policy per code format: BinaryCodes, Trit5Codes),
// TDPBSSD summing a whole span in the tiles, and a float epilogue per span.
// Compiled with target attributes (the build needs no -mamx-*), chosen at run time; elsewhere
// (not x86-64 Linux, or a compiler without these intrinsics) not_built.
#include "sdq/amx_gemm.h"

#include "amx_tiles.h"
#include "guard.h"
#include "lut_gemm.h"
#include "parallel.h"
#include "scale_tiles.h"
#include "scratch.h"
#include "sdq/trit5.h"

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define SDQ_HAVE_AMX 1
#endif

#ifdef SDQ_HAVE_AMX
// GCC 12's avx512fintrin.h seeds masked intrinsics with _mm512_undefined_*(): a false positive of
// -W(maybe-)uninitialized once inlined into a target-attribute function (lut_gemm_avx512.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#define SDQ_AMX \
  __attribute__((target("avx2,fma,f16c,bmi2,avx512f,avx512bw,avx512vbmi,amx-tile,amx-int8")))

namespace sdq {
namespace {

constexpr int kTokens = 16;   // rows of an A (and C) tile: tokens
constexpr int kStep = 64;     // code columns per TDPBSSD: bytes of an A-tile row
constexpr int kHalf = 16;     // packed-tile rows per B (and C) tile: a 32-row tile is two halves
constexpr int kTileBytes = 1024;  // 16 rows x 64 bytes: every tile this kernel configures
constexpr float kTinyAmax = 0x1p-120f;
constexpr int64_t kGroupTiles = 4;  // packed tiles that share one pass over the activations
// |a| <= 127 and |code x q| <= 127: int32 sums of up to 2^31 / 127^2 columns cannot overflow, so
// the C tiles are flushed every kFlushSteps steps (only blocks over 131072 code columns need it).
constexpr int64_t kFlushSteps = 2048;
static_assert(kFlushSteps * 64 * 127 * 127 < (int64_t{1} << 31), "int32 sums overflow");
constexpr double kMinChunkBytes = 1 << 14;  // as lut_gemm.cpp: a few microseconds of work

static_assert(kLutTileRows == 2 * kHalf, "a packed tile is two B tiles of rows");

using detail::grain_for;

bool cpu_and_os_support() noexcept {
  unsigned a, b, c, d;  // AMX-TILE and AMX-INT8 by CPUID (older compilers' cpu_supports lack them)
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d >> 24 & 1) || !(d >> 25 & 1)) return false;
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2") &&
        __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vbmi")))
    return false;
  // Linux keeps the 8 KB tile state off until a process asks for it (ARCH_REQ_XCOMP_PERM,
  // XFEATURE_XTILEDATA); a kernel without that call (< 5.16) does not enable AMX at all.
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
}

// Tiles (amx_tiles.h): 0-3 C (int32 sums), 4-5 A (int8 activations), 6-7 B (+-1 codes).
static_assert(kStep == 64 && kTokens == 16, "every tile is 16 rows of 64 bytes (amx_tiles.h)");

struct Geometry {
  int64_t nb, steps0, steps_last;  // K steps of every block but the last; of the last
  int64_t tokens;                  // tokens padded to a multiple of kTokens
  int64_t span, spans;             // blocks per span (amx_gemm.h), spans per row
  int64_t steps(int64_t b) const noexcept { return b == nb - 1 ? steps_last : steps0; }
  int64_t span_end(int64_t sp) const noexcept { return std::min(nb, (sp + 1) * span); }
  // The int8 activations are block-major: block b's rows (steps(b) * kStep bytes per token,
  // zero past its codes) start at a_offset(b), so that an A tile is 1 KB in one run.
  int64_t a_offset(int64_t b) const noexcept { return b * tokens * steps0 * kStep; }
  int64_t a_bytes() const noexcept { return a_offset(nb - 1) + tokens * steps_last * kStep; }
};

template <typename Codes>
Geometry geometry_of(const BlockLayout& L, const Codes& codes, int64_t batch) noexcept {
  const int64_t nb = L.num_blocks();
  Geometry g{};
  g.nb = nb;
  g.steps0 = codes.steps(0);
  g.steps_last = codes.steps(nb - 1);
  g.tokens = (batch + kTokens - 1) / kTokens * kTokens;
  g.span = Codes::kScaled ? amx_span_blocks(L) : 1;
  g.spans = (nb + g.span - 1) / g.span;
  return g;
}

// x [n] (n a multiple of 16) rounded to int8 by inv (half to even, clamped to +-127) into q.
SDQ_AMX void round_to_int8(const float* x, int64_t n, __m512 inv, int8_t* q) {
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int64_t k = 0; k < n; k += 16) {
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), inv));
    v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtepi32_epi8(v));
  }
}

// Token t's xt row -> its int8 rows of a (Geometry::a_offset), laid out by the codes, and
// ascale [spans]: one scale per span, amax over its blocks' code columns (zero past m_b).
template <typename Codes>
SDQ_AMX void quantize_token(const BlockLayout& L, const Codes& codes, const Geometry& g,
                            const float* xt, int64_t t, int8_t* a, float* ascale) {
  for (int64_t sp = 0; sp < g.spans; ++sp) {
    const int64_t b0 = sp * g.span, b1 = g.span_end(sp);
    __m512 m = _mm512_setzero_ps();
    for (int64_t b = b0; b < b1; ++b) {
      const float* x = xt + L.code_offset(b);
      for (int64_t k = 0, cols = L.code_cols(b); k < cols; k += 16)  // cols: a multiple of 32
        m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
    }
    const float amax = _mm512_reduce_max_ps(m);
    const bool live = amax >= kTinyAmax;  // else (or NaN) the span adds only MU * xsum
    for (int64_t b = b0; b < b1; ++b) {
      int8_t* dst = a + g.a_offset(b) + t * g.steps(b) * kStep;
      if (live)
        codes.activations(xt + L.code_offset(b), L.code_cols(b), g.steps(b),
                          _mm512_set1_ps(127.0f / amax), dst);
      else
        std::memset(dst, 0, static_cast<size_t>(g.steps(b) * kStep));
    }
    ascale[sp] = live ? amax / 127.0f : 0.0f;
  }
}

// The 64-byte vectors +q and -q of a B tile's half h: byte 4n + j holds row 16h + n's q (q32: the
// block's int8 scales of the packed tile's 32 rows).
struct RowScales {
  __m512i plus[2], minus[2];
  SDQ_AMX RowScales(const int8_t* q32, const __m512i (&spread)[2]) {
    const __m512i q =
        _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q32)));
    for (int h = 0; h < 2; ++h) {
      plus[h] = _mm512_permutexvar_epi8(spread[h], q);
      minus[h] = _mm512_sub_epi8(_mm512_setzero_si512(), plus[h]);
    }
  }
};

// spread[h] byte i = 16h + i / 4: RowScales' look-up of row 16h + n for the 4 bytes of dword n
SDQ_AMX void row_spread(__m512i (&spread)[2]) {
  alignas(64) uint8_t t[64];
  for (int h = 0; h < 2; ++h) {
    for (int i = 0; i < 64; ++i) t[i] = static_cast<uint8_t>(kHalf * h + i / 4);
    spread[h] = _mm512_load_si512(t);
  }
}

// ---- binary codes (lut_pack_binary's tiles): K = code columns

// Byte 4n + j of B-tile row r holds the code of row n (of the half), column 4r + j of the step.
// Code column 8p + i is bit i of byte p of a row (lut_gemm.h); one 64-byte load of a packed tile
// holds bytes p and p+1 of its 32 rows. So B row r = 4q + 2e + o of half h takes, from load q,
// byte 32e + 16h + n for each n (vpermb), and bit 4o + j of it (vptestmb), as +-1 (blend).
struct BinaryCodes {
  static constexpr bool kScaled = true;  // B holds code x q (amx_gemm.h: spans of blocks)
  const BlockLayout* L;
  const uint8_t* packed;
  int64_t tile_bytes, row_bytes;  // per packed tile; packed code bytes per row
  __m512i idx[2][2], bit[2], spread[2];

  SDQ_AMX BinaryCodes(const BlockLayout& layout, const uint8_t* codes)
      : L(&layout), packed(codes), tile_bytes(lut_tile_bytes(layout)),
        row_bytes(layout.words_per_row() * static_cast<int64_t>(sizeof(word_t))) {
    alignas(64) uint8_t t[64];
    for (int e = 0; e < 2; ++e)
      for (int h = 0; h < 2; ++h) {
        for (int i = 0; i < 64; ++i) t[i] = static_cast<uint8_t>(32 * e + kHalf * h + i / 4);
        idx[e][h] = _mm512_load_si512(t);
      }
    for (int o = 0; o < 2; ++o) {
      for (int i = 0; i < 64; ++i) t[i] = static_cast<uint8_t>(1u << (4 * o + i % 4));
      bit[o] = _mm512_load_si512(t);
    }
    row_spread(spread);
  }

  int64_t steps(int64_t b) const noexcept { return (L->code_cols(b) + kStep - 1) / kStep; }

  // One token's block x [cols] -> its A row: the code columns in order, zero past cols.
  SDQ_AMX void activations(const float* x, int64_t cols, int64_t steps, __m512 inv,
                           int8_t* dst) const {
    round_to_int8(x, cols, inv, dst);
    std::memset(dst + cols, 0, static_cast<size_t>(steps * kStep - cols));
  }

  // B tiles of block b of packed tile k, each code times its row's q (q32):
  // b_tiles[(s * 2 + h) * kTileBytes] for step s, half h. Bytes past the row (the last block's
  // last step) read as code -1: their activations are 0.
  SDQ_AMX void unpack(int64_t k, int64_t b, const int8_t* q32, int8_t* b_tiles) const {
    const RowScales rs(q32, spread);
    const uint8_t* tile = packed + k * tile_bytes;
    const int64_t p0 = L->code_offset(b) / 8;
    for (int64_t s = 0; s < steps(b); ++s)
      for (int q = 0; q < 4; ++q) {
        const int64_t p = p0 + 8 * s + 2 * q;  // even; row_bytes is a multiple of 4
        const __m512i v = p < row_bytes
                              ? _mm512_loadu_si512(tile + p * kLutTileRows)
                              : _mm512_setzero_si512();
        for (int e = 0; e < 2; ++e)
          for (int h = 0; h < 2; ++h) {
            const __m512i w = _mm512_permutexvar_epi8(idx[e][h], v);
            int8_t* dst = b_tiles + (s * 2 + h) * kTileBytes + (4 * q + 2 * e) * kStep;
            for (int o = 0; o < 2; ++o)
              _mm512_store_si512(dst + o * kStep,
                                 _mm512_mask_blend_epi8(_mm512_test_epi8_mask(w, bit[o]),
                                                        rs.minus[h], rs.plus[h]));
          }
      }
  }
};

// ---- ternary codes (trit5.h): K = groups of 3 code columns, each padded to 4 (one dword of a
// B-tile row: byte j of dword n = trit j of row n's group), so a group's 4-bit pattern index
// becomes its dword by one 16-entry look-up (vpermd) and its sign bit negates it.

struct Trit5Codes {
  static constexpr bool kScaled = false;  // B holds the codes; a block is its own span, f = S
  const BlockLayout* L;
  const uint8_t* trits;
  const uint32_t* signs;
  int64_t total_groups, tile_trit_bytes;  // groups per row; trits bytes per tile
  __m512i pattern, spread;  // dword i: the trits of index i as int8 (0 past 13); 3 -> 4 bytes

  SDQ_AMX Trit5Codes(const BlockLayout& layout, const uint8_t* t, const uint32_t* s)
      : L(&layout), trits(t), signs(s), total_groups(trit5_total_groups(layout)),
        tile_trit_bytes(trit5_total_groups(layout) / 2 * kTrit5TileRows) {
    alignas(64) int8_t p[64] = {};
    for (int i = 0; i < 14; ++i) {  // trit5.h: w = 13 + idx, t0 = w / 9 - 1, ...
      const int w = 13 + i;
      p[4 * i] = static_cast<int8_t>(w / 9 - 1);
      p[4 * i + 1] = static_cast<int8_t>(w / 3 % 3 - 1);
      p[4 * i + 2] = static_cast<int8_t>(w % 3 - 1);
    }
    pattern = _mm512_load_si512(p);
    alignas(64) uint8_t q[64];
    for (int i = 0; i < 64; ++i) q[i] = static_cast<uint8_t>(i % 4 == 3 ? 0 : 3 * (i / 4) + i % 4);
    spread = _mm512_load_si512(q);
  }

  int64_t steps(int64_t b) const noexcept {
    return (trit5_padded_groups(*L, b) + kTokens - 1) / kTokens;  // 16 groups per step
  }

  // One token's block x [cols] -> its A row: group g's columns 3g, 3g+1, 3g+2 at bytes 4g..4g+2,
  // byte 4g+3 zero; zero past the block's codes (xt is zero past m_b).
  SDQ_AMX void activations(const float* x, int64_t cols, int64_t steps, __m512 inv,
                           int8_t* dst) const {
    int8_t q[kStep + 16];  // one step's 48 columns, rounded; read as one 64-byte vector
    for (int64_t s = 0; s < steps; ++s) {
      const int64_t c0 = 48 * s, n = std::min<int64_t>(48, cols - c0);
      std::memset(q, 0, sizeof q);
      if (n > 0) round_to_int8(x + c0, (n + 15) / 16 * 16, inv, q);
      _mm512_storeu_si512(dst + s * kStep,
                          _mm512_maskz_permutexvar_epi8(0x7777777777777777ull, spread,
                                                        _mm512_loadu_si512(q)));
    }
  }

  // B tiles of block b of tile k, as BinaryCodes::unpack but the codes themselves (the block's
  // scale is applied in the epilogue). B row r of step s is group group_offset(b) + 16 s + r;
  // groups past the row's end read as 0 (their activations are 0).
  SDQ_AMX void unpack(int64_t k, int64_t b, const int8_t*, int8_t* b_tiles) const {
    const uint8_t* tile = trits + k * tile_trit_bytes;
    const uint32_t* neg = signs + k * total_groups;
    const int64_t g0 = trit5_group_offset(*L, b);
    constexpr uint64_t kNibbles = 0x1111111111111111ull;  // bit i -> bit 4i (pdep), then x 0xF
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t s = 0; s < steps(b); ++s) {
      int8_t* lo = b_tiles + (s * 2) * kTileBytes;  // half 0: rows 0-15; half 1: rows 16-31
      int8_t* hi = lo + kTileBytes;
      for (int r = 0; r < kTokens; ++r) {
        const int64_t g = g0 + kTokens * s + r;
        if (g >= total_groups) {
          _mm512_store_si512(lo + r * kStep, zero);
          _mm512_store_si512(hi + r * kStep, zero);
          continue;
        }
        // the 32 rows' bytes of groups 2p, 2p+1; vpermd reads the low 4 bits of each dword
        __m256i idx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + g / 2 * kTrit5TileRows));
        if (g & 1) idx = _mm256_srli_epi16(idx, 4);
        const __m512i w0 = _mm512_permutexvar_epi32(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(idx)), pattern);
        const __m512i w1 = _mm512_permutexvar_epi32(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(idx, 1)), pattern);
        const uint64_t bits = neg[g];
        const __mmask64 n0 = _pdep_u64(bits & 0xFFFFu, kNibbles) * 0xF;  // 4 bytes per row
        const __mmask64 n1 = _pdep_u64(bits >> 16, kNibbles) * 0xF;
        _mm512_store_si512(lo + r * kStep, _mm512_mask_sub_epi8(w0, n0, zero, w0));
        _mm512_store_si512(hi + r * kStep, _mm512_mask_sub_epi8(w1, n1, zero, w1));
      }
    }
  }
};

// Byte offsets in a worker's scratch (tile_group), for a full group of kGroupTiles tiles.
// transposed: the call lays the fp16 scales and means out itself, at the start (no plan tiles).
struct Layout {
  int64_t q, f, mu, b_tiles, c_tiles, y, bytes;
};

Layout scratch_layout(const Geometry& g, int64_t batch, bool transposed) {
  constexpr int64_t W = kGroupTiles * kLutTileRows;
  auto up = [](int64_t v) { return (v + 63) / 64 * 64; };
  Layout l{};
  l.q = transposed ? up(2 * g.nb * W * 2) : 0;
  l.f = l.q + up(g.nb * W);
  l.mu = l.f + up(g.spans * W * 4);
  l.b_tiles = l.mu + up(g.nb * W * 4);
  l.c_tiles = l.b_tiles + g.span * std::max(g.steps0, g.steps_last) * 2 * kTileBytes;
  l.y = l.c_tiles + 4 * kTileBytes;
  l.bytes = l.y + batch * W * 4;
  return l;
}

// C tiles 2m + h (tiles 0-3) += (A tile m: tokens 16m..) x (B tile h: rows 16h..) over `steps`
// steps of one block. a: the block's row of the first token, kp bytes per token row.
template <int MA>
SDQ_AMX void block_products(const int8_t* a, int64_t kp, const int8_t* b_tiles, int64_t steps) {
  // Each operand tile is reloaded as soon as its last reader of this step has been issued, so
  // that the loads of step s + 1 overlap the products of step s (tiles are not renamed).
  const int8_t* a1 = a + kTokens * kp;
  _tile_loadd(4, a, kp);
  _tile_loadd(6, b_tiles, kStep);
  _tile_loadd(7, b_tiles + kTileBytes, kStep);
  if (MA == 2) _tile_loadd(5, a1, kp);
  for (int64_t s = 0; s < steps; ++s) {
    const bool more = s + 1 < steps;
    const int64_t next = (s + 1) * kStep;
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    if (more) _tile_loadd(4, a + next, kp);
    if (MA == 2) {
      _tile_dpbssd(2, 5, 6);
      if (more) _tile_loadd(6, b_tiles + (2 * s + 2) * kTileBytes, kStep);
      _tile_dpbssd(3, 5, 7);
      if (more) _tile_loadd(5, a1 + next, kp);
    } else if (more) {
      _tile_loadd(6, b_tiles + (2 * s + 2) * kTileBytes, kStep);
    }
    if (more) _tile_loadd(7, b_tiles + (2 * s + 3) * kTileBytes, kStep);
  }
}

template <int MA>
SDQ_AMX void zero_sums() {
  _tile_zero(0);
  _tile_zero(1);
  if (MA == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
}

// c_tiles[(2m + h) * 256] int32 = C tile 2m + h.
template <int MA>
SDQ_AMX void store_sums(int32_t* c_tiles) {
  _tile_stored(0, c_tiles, kStep);
  _tile_stored(1, c_tiles + 256, kStep);
  if (MA == 2) {
    _tile_stored(2, c_tiles + 512, kStep);
    _tile_stored(3, c_tiles + 768, kStep);
  }
}

struct Call {
  Geometry g;
  detail::LutCtx scales;  // scale, mean, out, nb: for lut_transpose_scales_avx2
  const uint16_t* tiles;  // a plan's scales laid out per tile (scale_tiles.h), or null
  const int8_t* a;       // block-major (Geometry::a_offset)
  const float* ascale;   // [batch, spans]
  const float* xsum;     // [batch, nb]
  int64_t batch;
  float* y;
};

// ybuf[t * width + 16h + i] += the stored C tiles x ascale x f for span sp, tokens t0 .. t0 + 31
// (those < batch). f: the span's row factors of the packed tile's 32 rows; y: ybuf at the packed
// tile's first column.
SDQ_AMX void epilogue(const Call& c, const int32_t* c_tiles, int64_t sp, int64_t t0,
                      const float* f, float* y, int64_t width) {
  const int64_t spans = c.g.spans;
  const __m512 f0 = _mm512_loadu_ps(f), f1 = _mm512_loadu_ps(f + 16);
  const int64_t n = std::min<int64_t>(2 * kTokens, c.batch - t0);
  const float* as = c.ascale + t0 * spans + sp;
  float* yp = y + t0 * width;
  for (int64_t u = 0; u < n; ++u, as += spans, yp += width) {
    const int32_t* acc = c_tiles + (u >= kTokens ? 512 - kTokens * 16 : 0) + u * 16;
    const __m512 a = _mm512_set1_ps(*as);
    const __m512 p0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(acc)), a);
    const __m512 p1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(acc + 256)), a);
    _mm512_storeu_ps(yp, _mm512_fmadd_ps(p0, f0, _mm512_loadu_ps(yp)));
    _mm512_storeu_ps(yp + 16, _mm512_fmadd_ps(p1, f1, _mm512_loadu_ps(yp + 16)));
  }
}

// A packed tile's scales for one call: per block its 32 rows' int8 q (amx_gemm.h; scaled codes
// only), per span their float factors f, per block their means as float. Laid out [n][nb][32] /
// [n][spans][32].
struct TileScales {
  int8_t* q;
  float* f;
  float* mu;
};

// 16 fp16 values as float
SDQ_AMX __m512 half16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The n packed tiles from k0: fp16 scales and means transposed to [nb][width], then per span the
// rows' largest |S|, f = that / 127 and q = rint(S * (127 / that)) (0 where it is below 2^-120);
// codes that are not scaled (a span per block) take f = S.
template <bool Scaled>
SDQ_AMX void prepare_scales(const Call& c, int64_t k0, int64_t n, uint16_t* st, uint16_t* mt,
                            const TileScales& out) {
  const Geometry& g = c.g;
  const int64_t width = n * kLutTileRows;
  // The fp16 scale and mean of 16 rows from row j of the group, block b: from the plan's tiles,
  // else from this call's transposition ([nb][width]).
  if (!c.tiles) detail::lut_transpose_scales_avx2(c.scales, k0 * kLutTileRows, width, st, mt);
  auto scale = [&](int64_t j, int64_t b) {
    return c.tiles ? detail::tile_scales(c.tiles, g.nb, k0 + j / 32, b) + j % 32
                   : st + b * width + j;
  };
  auto mean = [&](int64_t j, int64_t b) {
    return c.tiles ? detail::tile_means(c.tiles, g.nb, k0 + j / 32, b) + j % 32
                   : mt + b * width + j;
  };
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int64_t j = 0; j < width; j += 16) {  // 16 rows of tile j / 32
    const int64_t k = j / 32, i = j % 32;
    for (int64_t b = 0; b < g.nb; ++b)
      _mm512_storeu_ps(out.mu + (k * g.nb + b) * 32 + i, half16(mean(j, b)));
    if (!Scaled) {
      for (int64_t b = 0; b < g.nb; ++b)
        _mm512_storeu_ps(out.f + (k * g.nb + b) * 32 + i, half16(scale(j, b)));
      continue;
    }
    for (int64_t sp = 0; sp < g.spans; ++sp) {
      const int64_t b0 = sp * g.span, b1 = g.span_end(sp);
      __m512 m = _mm512_setzero_ps();
      for (int64_t b = b0; b < b1; ++b)
        m = _mm512_max_ps(m, _mm512_abs_ps(half16(scale(j, b))));
      const __mmask16 live = _mm512_cmp_ps_mask(m, _mm512_set1_ps(kTinyAmax), _CMP_GE_OQ);
      const __m512 inv = _mm512_maskz_div_ps(live, _mm512_set1_ps(127.0f), m);
      _mm512_storeu_ps(out.f + (k * g.spans + sp) * 32 + i,
                       _mm512_maskz_div_ps(live, m, _mm512_set1_ps(127.0f)));
      for (int64_t b = b0; b < b1; ++b) {
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(half16(scale(j, b)), inv));
        v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q + (k * g.nb + b) * 32 + i),
                         _mm512_cvtepi32_epi8(v));
      }
    }
  }
}

// ybuf [batch][width] = sum_b MU x xsum (the part of y that needs no codes): 4 tokens x 2 halves
// of a tile at a time, so that each mean vector loaded serves 4 tokens and 8 sums run side by side.
SDQ_AMX void mean_terms(const Call& c, int64_t n, const float* mu, float* ybuf, int64_t width) {
  const int64_t nb = c.g.nb;
  for (int64_t t0 = 0; t0 < c.batch; t0 += 4) {
    const int64_t nt = std::min<int64_t>(4, c.batch - t0);
    const float* xs[4];
    for (int i = 0; i < 4; ++i) xs[i] = c.xsum + (t0 + std::min<int64_t>(i, nt - 1)) * nb;
    for (int64_t k = 0; k < n; ++k) {
      const float* m = mu + k * nb * 32;
      __m512 y[4][2];
      for (auto& v : y) v[0] = v[1] = _mm512_setzero_ps();
      for (int64_t b = 0; b < nb; ++b, m += 32) {
        const __m512 m0 = _mm512_loadu_ps(m), m1 = _mm512_loadu_ps(m + 16);
        for (int i = 0; i < 4; ++i) {
          const __m512 x = _mm512_set1_ps(xs[i][b]);
          y[i][0] = _mm512_fmadd_ps(m0, x, y[i][0]);
          y[i][1] = _mm512_fmadd_ps(m1, x, y[i][1]);
        }
      }
      for (int64_t i = 0; i < nt; ++i) {
        _mm512_storeu_ps(ybuf + (t0 + i) * width + k * 32, y[i][0]);
        _mm512_storeu_ps(ybuf + (t0 + i) * width + k * 32 + 16, y[i][1]);
      }
    }
  }
}

// The products of span sp for the token tiles from t0 (MA of them), flushed into ybuf at the
// span's end and every kFlushSteps steps.
template <int MA>
SDQ_AMX void span_products(const Call& c, int64_t sp, int64_t t0, const int8_t* b_tiles,
                           const float* f, int32_t* c_tiles, float* y, int64_t width) {
  const Geometry& g = c.g;
  zero_sums<MA>();
  int64_t budget = kFlushSteps;
  for (int64_t b = sp * g.span, e = g.span_end(sp); b < e; ++b) {
    const int64_t steps = g.steps(b), kp = steps * kStep;
    const int8_t* a = c.a + g.a_offset(b) + t0 * kp;
    for (int64_t s = 0; s < steps;) {
      const int64_t n = std::min(steps - s, budget);
      block_products<MA>(a + s * kStep, kp, b_tiles + s * 2 * kTileBytes, n);
      s += n;
      budget -= n;
      if (budget == 0 && (s < steps || b + 1 < e)) {
        store_sums<MA>(c_tiles);
        epilogue(c, c_tiles, sp, t0, f, y, width);
        zero_sums<MA>();
        budget = kFlushSteps;
      }
    }
    b_tiles += steps * 2 * kTileBytes;
  }
  store_sums<MA>(c_tiles);
  epilogue(c, c_tiles, sp, t0, f, y, width);
}

// Tiles of 32 rows [k0, k0 + n), n <= kGroupTiles, every token. Span by span: a tile's codes of
// the span are unpacked once (16 KB at 512 code columns) and multiplied with every token.
template <typename Codes>
SDQ_AMX void tile_group(const Call& c, const Codes& codes, int64_t k0, int64_t n, uint8_t* buf) {
  const Geometry& g = c.g;
  const int64_t width = n * kLutTileRows;
  const Layout at = scratch_layout(g, c.batch, !c.tiles);
  auto* st = reinterpret_cast<uint16_t*>(buf);  // [nb][width] fp16 scales, then means (no tiles)
  uint16_t* mt = st + g.nb * width;
  const TileScales ts{reinterpret_cast<int8_t*>(buf + at.q), reinterpret_cast<float*>(buf + at.f),
                      reinterpret_cast<float*>(buf + at.mu)};
  auto* b_tiles = reinterpret_cast<int8_t*>(buf + at.b_tiles);
  auto* c_tiles = reinterpret_cast<int32_t*>(buf + at.c_tiles);
  auto* ybuf = reinterpret_cast<float*>(buf + at.y);  // [batch][width]
  prepare_scales<Codes::kScaled>(c, k0, n, st, mt, ts);
  mean_terms(c, n, ts.mu, ybuf, width);
  for (int64_t sp = 0; sp < g.spans; ++sp) {
    for (int64_t k = 0; k < n; ++k) {
      int8_t* bt = b_tiles;
      for (int64_t b = sp * g.span, e = g.span_end(sp); b < e; ++b) {
        codes.unpack(k0 + k, b, ts.q + (k * g.nb + b) * 32, bt);
        bt += g.steps(b) * 2 * kTileBytes;
      }
      const float* f = ts.f + (k * g.spans + sp) * 32;
      float* y = ybuf + k * kLutTileRows;
      for (int64_t t0 = 0; t0 < g.tokens; t0 += 2 * kTokens) {
        if (t0 + 2 * kTokens <= g.tokens)
          span_products<2>(c, sp, t0, b_tiles, f, c_tiles, y, width);
        else
          span_products<1>(c, sp, t0, b_tiles, f, c_tiles, y, width);
      }
    }
  }
  const int64_t r0 = k0 * kLutTileRows, rows = std::min(width, c.scales.out - r0);
  for (int64_t t = 0; t < c.batch; ++t)
    std::memcpy(c.y + t * c.scales.out + r0, ybuf + t * width, sizeof(float) * rows);
}

// Groups [group_begin, group_end) of kGroupTiles tiles (the last one may be shorter).
template <typename Codes>
SDQ_AMX void groups(const Call& c, const Codes& codes, int64_t group_begin, int64_t group_end) {
  auto* buf = detail::scratch<uint8_t>(detail::ScratchSlot::amx_rows,
                                       scratch_layout(c.g, c.batch, !c.tiles).bytes);
  const detail::AmxTileConfig cfg;
  _tile_loadconfig(&cfg);
  const int64_t tiles = (c.scales.out + kLutTileRows - 1) / kLutTileRows;
  for (int64_t q = group_begin; q < group_end; ++q) {
    const int64_t k0 = q * kGroupTiles;
    tile_group(c, codes, k0, std::min(kGroupTiles, tiles - k0), buf);
  }
  _tile_release();
}

template <typename Codes>
Status run(const BlockLayout& L, const Codes& codes, const uint16_t* scale, const uint16_t* mean,
           const uint16_t* tiles, int64_t out, const float* xt, const float* xsum, int64_t batch,
           float* y, int threads) {
  Call c{};
  c.g = geometry_of(L, codes, batch);
  c.tiles = tiles;
  c.scales.scale = scale;
  c.scales.mean = mean;
  c.scales.out = out;
  c.scales.nb = c.g.nb;
  c.batch = batch;
  c.xsum = xsum;
  c.y = y;
  const Geometry& g = c.g;
  const int64_t a_bytes = (g.a_bytes() + 63) / 64 * 64;
  auto* buf = detail::scratch<uint8_t>(detail::ScratchSlot::amx_acts,
                                       a_bytes + batch * g.spans * int64_t{sizeof(float)});
  auto* a = reinterpret_cast<int8_t*>(buf);
  auto* ascale = reinterpret_cast<float*>(buf + a_bytes);
  for (int64_t b = 0; b < g.nb; ++b) {  // the padding tokens' rows
    const int64_t row = g.steps(b) * kStep;
    std::memset(a + g.a_offset(b) + batch * row, 0, static_cast<size_t>((g.tokens - batch) * row));
  }
  const int64_t cols = L.total_code_cols();
  detail::parallel_for(batch, threads, grain_for(8192, static_cast<double>(cols)),
                       [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      quantize_token(L, codes, g, xt + t * cols, t, a, ascale + t * g.spans);
  });
  c.a = a;
  c.ascale = ascale;
  const int64_t n_tiles = (out + kLutTileRows - 1) / kLutTileRows;
  const int64_t n_groups = (n_tiles + kGroupTiles - 1) / kGroupTiles;
  // bytes of B tiles a group unpacks, times the token tiles that multiply them
  const double group_cost = static_cast<double>(g.steps0 * g.nb * 2 * kTileBytes * kGroupTiles) *
                            static_cast<double>(g.tokens / kTokens);
  detail::parallel_for(n_groups, threads, grain_for(kMinChunkBytes, group_cost),
                       [&](int64_t b, int64_t e) { groups(c, codes, b, e); });
  return Status::ok;
}

}  // namespace

bool amx_gemm_supported() noexcept {
  static const bool ok = cpu_and_os_support();
  return ok;
}

namespace detail {

Status amx_gemm_binary_tiled(const BlockLayout& L, const uint8_t* packed, const uint16_t* scale,
                             const uint16_t* mean, const uint16_t* scale_tiles, int64_t out,
                             const float* xt, const float* xsum, int64_t batch, float* y,
                             int threads) noexcept {
  if (!L.valid() || out < 0 || batch < 0) return Status::bad_size;
  if (out == 0 || batch == 0) return Status::ok;
  if (!packed || !scale || !mean || !xt || !xsum || !y) return Status::null_pointer;
  if (!amx_gemm_supported()) return Status::not_built;
  return guarded([&] {
    return run(L, BinaryCodes(L, packed), scale, mean, scale_tiles, out, xt, xsum, batch, y,
               threads);
  });
}

Status amx_gemm_ternary_tiled(const BlockLayout& L, const uint8_t* trits,
                              const uint32_t* trit_signs, const uint16_t* scale,
                              const uint16_t* mean, const uint16_t* scale_tiles, int64_t out,
                              const float* xt, const float* xsum, int64_t batch, float* y,
                              int threads) noexcept {
  if (!L.valid() || out < 0 || batch < 0) return Status::bad_size;
  if (out == 0 || batch == 0) return Status::ok;
  if (!trits || !trit_signs || !scale || !mean || !xt || !xsum || !y) return Status::null_pointer;
  if (!amx_gemm_supported()) return Status::not_built;
  return guarded([&] {
    return run(L, Trit5Codes(L, trits, trit_signs), scale, mean, scale_tiles, out, xt, xsum,
               batch, y, threads);
  });
}

}  // namespace detail

}  // namespace sdq

#else  // no AMX build: never supported

namespace sdq {
bool amx_gemm_supported() noexcept { return false; }
namespace detail {
Status amx_gemm_binary_tiled(const BlockLayout& L, const uint8_t*, const uint16_t*,
                             const uint16_t*, const uint16_t*, int64_t out, const float*,
                             const float*, int64_t batch, float*, int) noexcept {
  if (!L.valid() || out < 0 || batch < 0) return Status::bad_size;
  return out == 0 || batch == 0 ? Status::ok : Status::not_built;
}
Status amx_gemm_ternary_tiled(const BlockLayout& L, const uint8_t*, const uint32_t*,
                              const uint16_t*, const uint16_t*, const uint16_t*, int64_t out,
                              const float*, const float*, int64_t batch, float*, int) noexcept {
  if (!L.valid() || out < 0 || batch < 0) return Status::bad_size;
  return out == 0 || batch == 0 ? Status::ok : Status::not_built;
}
}  // namespace detail
}  // namespace sdq

#endif

namespace sdq {

// The public entries lay the scales out per call (a plan passes its own layout).
Status amx_gemm_binary(const BlockLayout& L, const uint8_t* packed, const uint16_t* scale,
                       const uint16_t* mean, int64_t out, const float* xt, const float* xsum,
                       int64_t batch, float* y, int threads) noexcept {
  return detail::amx_gemm_binary_tiled(L, packed, scale, mean, nullptr, out, xt, xsum, batch, y,
                                       threads);
}

Status amx_gemm_ternary(const BlockLayout& L, const uint8_t* trits, const uint32_t* trit_signs,
                        const uint16_t* scale, const uint16_t* mean, int64_t out, const float* xt,
                        const float* xsum, int64_t batch, float* y, int threads) noexcept {
  return detail::amx_gemm_ternary_tiled(L, trits, trit_signs, scale, mean, nullptr, out, xt, xsum,
                                        batch, y, threads);
}

}  // namespace sdq
