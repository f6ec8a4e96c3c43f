// Internal: a layer's fp16 scales and means re-laid per 32-row tile for the x86 int8-table GEMMs
// (lut_gemm_avx2/avx512, trit5_gemm_avx2/avx512) and the AMX GEMMs (amx_gemm.cpp). Tile k holds
// the scales of its 32 rows, block by block ([nb][32]), then their means ([nb][32]); rows past
// `out` hold 0. In that order a block's 32 row scales are one vector load; from the stored
// [out, nb] order every call had to transpose them, 10-30% of a batch-1 plan call on the default
// model's layers. A prepared plan (linear_plan.cpp) lays them out once; the one-off GEMM entry
// points lay them out per call.
#pragma once
#include <cstdint>

#include "sdq/layout.h"
#include "sdq/status.h"

namespace sdq::detail {

constexpr int64_t kScaleTileRows = 32;

// Elements (fp16 bit patterns) of the layout for `out` rows and `nb` blocks.
int64_t scale_tiles_size(int64_t out, int64_t nb) noexcept;

// Tiles [tile_begin, tile_end) of dst from scale and mean ([out, nb] fp16 bit patterns).
void scale_tiles_fill(const uint16_t* scale, const uint16_t* mean, int64_t out, int64_t nb,
                      int64_t tile_begin, int64_t tile_end, uint16_t* dst) noexcept;

// Tile k's scales of block b (32 values); its means follow nb * 32 values later.
inline const uint16_t* tile_scales(const uint16_t* tiles, int64_t nb, int64_t k,
                                   int64_t b) noexcept {
  return tiles + (2 * k * nb + b) * kScaleTileRows;
}
inline const uint16_t* tile_means(const uint16_t* tiles, int64_t nb, int64_t k,
                                  int64_t b) noexcept {
  return tiles + ((2 * k + 1) * nb + b) * kScaleTileRows;
}

// lut_gemm_binary (sdq/lut_gemm.h) and trit5_gemm (sdq/trit5.h) with the best variant for this
// CPU, and amx_gemm_binary / amx_gemm_ternary (sdq/amx_gemm.h), given the layout already built (a
// plan's; null: laid out per call, as the public entries).
Status lut_gemm_binary_tiled(const BlockLayout& L, const uint8_t* packed, const uint16_t* scale,
                             const uint16_t* mean, const uint16_t* scale_tiles, int64_t out,
                             const float* xt, const float* xsum, int64_t batch, float* y,
                             int threads) noexcept;
Status trit5_gemm_tiled(const BlockLayout& L, const uint8_t* trits, const uint32_t* trit_signs,
                        const uint16_t* scale, const uint16_t* mean, const uint16_t* scale_tiles,
                        int64_t out, const float* xt, const float* xsum, int64_t batch, float* y,
                        int threads) noexcept;
Status amx_gemm_binary_tiled(const BlockLayout& L, const uint8_t* packed, const uint16_t* scale,
                             const uint16_t* mean, const uint16_t* scale_tiles, int64_t out,
                             const float* xt, const float* xsum, int64_t batch, float* y,
                             int threads) noexcept;
Status amx_gemm_ternary_tiled(const BlockLayout& L, const uint8_t* trits,
                              const uint32_t* trit_signs, const uint16_t* scale,
                              const uint16_t* mean, const uint16_t* scale_tiles, int64_t out,
                              const float* xt, const float* xsum, int64_t batch, float* y,
                              int threads) noexcept;

}  // namespace sdq::detail
