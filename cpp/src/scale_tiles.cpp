// scale_tiles.h: the 8x8 transposes of lut_gemm_avx2.cpp where the CPU has AVX2, plain loops
// elsewhere (only the portable and NEON GEMMs run there, and they read [out, nb] directly).
#include "scale_tiles.h"

#include "lut_gemm.h"
#include "sdq/trit5.h"

namespace sdq::detail {

static_assert(kScaleTileRows == kLutTileRows && kScaleTileRows == kTrit5TileRows,
              "the layout's tiles are the GEMMs' row tiles");

namespace {

bool has_avx2() noexcept {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

}  // namespace

int64_t scale_tiles_size(int64_t out, int64_t nb) noexcept {
  return (out + kScaleTileRows - 1) / kScaleTileRows * 2 * nb * kScaleTileRows;
}

void scale_tiles_fill(const uint16_t* scale, const uint16_t* mean, int64_t out, int64_t nb,
                      int64_t tile_begin, int64_t tile_end, uint16_t* dst) noexcept {
  LutCtx c{};  // what lut_transpose_scales_avx2 reads: scale, mean, out, nb
  c.scale = scale;
  c.mean = mean;
  c.out = out;
  c.nb = nb;
  for (int64_t k = tile_begin; k < tile_end; ++k) {
    uint16_t* s = dst + 2 * k * nb * kScaleTileRows;
    uint16_t* mu = s + nb * kScaleTileRows;
    if (has_avx2()) {
      lut_transpose_scales_avx2(c, k * kScaleTileRows, kScaleTileRows, s, mu);
      continue;
    }
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t i = 0; i < kScaleTileRows; ++i) {
        const int64_t r = k * kScaleTileRows + i;
        s[b * kScaleTileRows + i] = r < out ? scale[r * nb + b] : 0;
        mu[b * kScaleTileRows + i] = r < out ? mean[r * nb + b] : 0;
      }
  }
}

}  // namespace sdq::detail
