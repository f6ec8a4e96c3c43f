// The projection (project.h) on Intel AMX in bf16: for the transforms whose output an int8 GEMM
// rounds next (the AMX GEMMs, amx_gemm.h). Both operands are rounded to bf16 (8 significant bits,
// half to even), the products summed in float32 by TDPBF16PS; the int8 rounding that follows
// (a step of max/127 per block) is several times coarser than that. One TDPBF16PS is 16 x 16 x 32
// multiply-adds, where an AVX-512 FMA is 16: the float32 projection was most of the transform of
// a prefill, and the transform a third of a 64-token AMX layer call.
#include "project.h"

#include <algorithm>
#include <cstring>

#include "amx_tiles.h"
#include "sdq/amx_gemm.h"

#if defined(__x86_64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define SDQ_HAVE_AMX_BF16 1
#endif

namespace sdq::detail {

namespace {

constexpr int64_t kK = 32;     // K per TDPBF16PS: bf16 values in a 64-byte A-tile row
constexpr int64_t kCols = 16;  // outputs per C tile
constexpr int kRows = 16;      // vectors per A tile

int64_t round_up(int64_t n, int64_t k) noexcept { return (n + k - 1) / k * k; }

// float -> bf16 bits, half to even (finite values; the down-samplers hold nothing else).
uint16_t to_bf16(float f) noexcept {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace

int64_t project_amx_scratch_size(int64_t padded, int64_t tokens) noexcept {
  return round_up(tokens, kRows) * round_up(padded, kK);
}

int64_t project_amx_packed_size(int64_t padded, int64_t m) noexcept {
  return round_up(padded, kK) * round_up(m, kCols);
}

// Column tile j, row pair i: 16 columns x (down[2i][.], down[2i+1][.]) interleaved, the B-tile
// row layout of TDPBF16PS; so the B tile of column tile j and K step s is 16 rows of 64 bytes at
// (j * K/2 + 16 s) * 32. Zero past padded rows and m columns.
void project_amx_pack(const float* down, int64_t padded, int64_t m, uint16_t* packed) noexcept {
  const int64_t k_pairs = round_up(padded, kK) / 2, tiles = round_up(m, kCols) / kCols;
  for (int64_t j = 0; j < tiles; ++j)
    for (int64_t i = 0; i < k_pairs; ++i)
      for (int64_t c = 0; c < kCols; ++c)
        for (int64_t e = 0; e < 2; ++e) {
          const int64_t row = 2 * i + e, col = kCols * j + c;
          packed[((j * k_pairs + i) * kCols + c) * 2 + e] =
              row < padded && col < m ? to_bf16(down[row * m + col]) : 0;
        }
}

std::vector<uint16_t> project_amx_packed(const float* down, int64_t padded, int64_t m) {
  std::vector<uint16_t> packed;
  if (!down || !project_amx_supported()) return packed;
  packed.resize(project_amx_packed_size(padded, m));
  project_amx_pack(down, padded, m, packed.data());
  return packed;
}

}  // namespace sdq::detail

#ifdef SDQ_HAVE_AMX_BF16
// GCC 12's avx512fintrin.h seeds masked intrinsics with _mm512_undefined_*(): a false positive of
// -W(maybe-)uninitialized once inlined into a target-attribute function (lut_gemm_avx512.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <cpuid.h>
#include <immintrin.h>

#define SDQ_AMX_BF16 \
  __attribute__((target("avx2,fma,avx512f,avx512bw,avx512bf16,amx-tile,amx-bf16")))

namespace sdq::detail {
namespace {

// Tiles (amx_tiles.h): C 0-3 (2 vector tiles x 2 column tiles), A 4-5 (16 vectors each), B 6-7
// (16 columns each): every operand loaded once per K step serves two products, and no tile is
// reloaded while a product of the same step may still read it (one B tile reused within a step
// held each product behind the previous one: 4x slower).
static_assert(kRows == 16 && kK * 2 == 64, "every tile is 16 rows of 64 bytes (amx_tiles.h)");

bool cpu_support() noexcept {
  unsigned a, b, c, d;  // AMX-BF16: CPUID.(7,0):EDX[22]; AVX512-BF16: CPUID.(7,1):EAX[5]
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d >> 22 & 1)) return false;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a >> 5 & 1)) return false;
  return amx_gemm_supported();  // AMX-TILE, AVX-512 and the OS's tile-state permission
}

// c [32][2 * kCols] = the MA vector tiles from a x the NB column tiles from b, over every K
// step: C tile 2m + h is vectors 16m.. x columns 16h.. .
template <int MA, int NB>
SDQ_AMX_BF16 void tile_block(const uint16_t* a, int64_t a_stride, const uint16_t* b,
                             int64_t k_steps, int64_t k_pairs, float* c) {
  constexpr int64_t kStride = 2 * kCols * sizeof(float);
  const uint16_t* a1 = a + kRows * a_stride / 2;
  const uint16_t* b1 = b + k_pairs * kCols * 2;
  _tile_zero(0);
  if (NB == 2) _tile_zero(1);
  if (MA == 2) _tile_zero(2);
  if (MA == 2 && NB == 2) _tile_zero(3);
  for (int64_t s = 0; s < k_steps; ++s) {
    const int64_t bs = s * kK / 2 * kCols * 2;
    _tile_loadd(4, a + s * kK, a_stride);
    _tile_loadd(6, b + bs, 64);
    if (NB == 2) _tile_loadd(7, b1 + bs, 64);
    if (MA == 2) _tile_loadd(5, a1 + s * kK, a_stride);
    _tile_dpbf16ps(0, 4, 6);
    if (NB == 2) _tile_dpbf16ps(1, 4, 7);
    if (MA == 2) _tile_dpbf16ps(2, 5, 6);
    if (MA == 2 && NB == 2) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, kStride);
  if (NB == 2) _tile_stored(1, c + kCols, kStride);
  if (MA == 2) _tile_stored(2, c + kRows * 2 * kCols, kStride);
  if (MA == 2 && NB == 2) _tile_stored(3, c + kRows * 2 * kCols + kCols, kStride);
}

}  // namespace

bool project_amx_supported() noexcept {
  static const bool ok = cpu_support();
  return ok;
}

SDQ_AMX_BF16 void project_amx(const uint16_t* packed, int64_t padded, int64_t m, const float* v,
                              int64_t tokens, float* const* out_rows, uint16_t* a) {
  const int64_t k_pad = round_up(padded, kK), k_pairs = k_pad / 2, k_steps = k_pad / kK;
  const int64_t tiles = round_up(m, kCols) / kCols, rows = round_up(tokens, kRows);
  const int64_t a_stride = k_pad * static_cast<int64_t>(sizeof(uint16_t));
  // a: the vectors in bf16 [rows][k_pad] (an A tile per 16 vectors and K step), zero past
  // `tokens` rows and `padded` columns.
  for (int64_t t = 0; t < rows; ++t) {
    uint16_t* row = a + t * k_pad;
    if (t >= tokens) {
      std::memset(row, 0, sizeof(uint16_t) * k_pad);
      continue;
    }
    const float* x = v + t * padded;
    for (int64_t k = 0; k < k_pad; k += 16) {
      const int64_t live = std::clamp<int64_t>(padded - k, 0, 16);
      const __mmask16 mask = live == 16 ? __mmask16(0xFFFF) : __mmask16((1u << live) - 1);
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, x + k));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + k), reinterpret_cast<const __m256i&>(h));
    }
  }
  alignas(64) float c[2 * kRows * 2 * kCols];
  const AmxTileConfig cfg;
  _tile_loadconfig(&cfg);
  // Column pairs outermost: a pair's B tiles (8 KB at 128 rows) stay in L1 for every vector.
  for (int64_t j0 = 0; j0 < tiles; j0 += 2) {
    const uint16_t* b = packed + j0 * k_pairs * kCols * 2;
    const bool two_cols = j0 + 1 < tiles;
    const int64_t cols = std::min<int64_t>(2 * kCols, m - j0 * kCols);
    const __mmask16 lo = cols >= kCols ? __mmask16(0xFFFF) : __mmask16((1u << cols) - 1);
    const __mmask16 hi = cols <= kCols ? __mmask16(0)
                         : cols >= 2 * kCols ? __mmask16(0xFFFF)
                                             : __mmask16((1u << (cols - kCols)) - 1);
    for (int64_t t0 = 0; t0 < tokens; t0 += 2 * kRows) {
      const uint16_t* at = a + t0 * k_pad;
      const bool two_rows = t0 + kRows < tokens;
      if (two_rows && two_cols) tile_block<2, 2>(at, a_stride, b, k_steps, k_pairs, c);
      else if (two_rows) tile_block<2, 1>(at, a_stride, b, k_steps, k_pairs, c);
      else if (two_cols) tile_block<1, 2>(at, a_stride, b, k_steps, k_pairs, c);
      else tile_block<1, 1>(at, a_stride, b, k_steps, k_pairs, c);
      // each vector's (up to) 32 outputs to its row: two masked moves (a memcpy call per
      // 128 bytes took a third of the projection)
      const int64_t n = std::min<int64_t>(2 * kRows, tokens - t0);
      for (int64_t t = 0; t < n; ++t) {
        float* dst = out_rows[t0 + t] + j0 * kCols;
        const float* src = c + t * 2 * kCols;
        _mm512_mask_storeu_ps(dst, lo, _mm512_maskz_loadu_ps(lo, src));
        if (hi) _mm512_mask_storeu_ps(dst + kCols, hi, _mm512_maskz_loadu_ps(hi, src + kCols));
      }
    }
  }
  _tile_release();
}

}  // namespace sdq::detail

#else  // no AMX build: never supported

namespace sdq::detail {
bool project_amx_supported() noexcept { return false; }
void project_amx(const uint16_t*, int64_t, int64_t, const float*, int64_t, float* const*,
                 uint16_t*) {}
}  // namespace sdq::detail

#endif
