// Portable int8 look-up GEMM (sdq/lut_gemm.h): the scalar table builder, which defines the tables
// the SIMD builder reproduces bit for bit, and a one-row-at-a-time kernel for CPUs without AVX2.
#include <algorithm>
#include <cmath>

#include "fp16.h"
#include "lut_gemm.h"

namespace sdq::detail {

// Scalar tables of block b: the definition the SIMD builder reproduces bit for bit.
void lut_block_tables_portable(const LutTableShape& s, const float* xt, int64_t b, int8_t* q,
                               float* tscale) {
  const int64_t g0 = b * s.groups_per_block;
  const int64_t n = b == s.nb - 1 ? s.last_groups : s.groups_per_block;
  float amax = 0.0f;  // |e| of the entry whose signs match x: the largest of its group
  for (int64_t g = g0; g < g0 + n; ++g) {
    const float* x = xt + g * kLutGroup;
    amax = std::max(amax, ((std::fabs(x[0]) + std::fabs(x[1])) + std::fabs(x[2])) + std::fabs(x[3]));
  }
  const bool tiny = !(amax >= kLutTinyAmax);
  const float inv = tiny ? 0.0f : static_cast<float>(kLutQMax) / amax;
  tscale[b] = tiny ? 0.0f : amax / static_cast<float>(kLutQMax);
  for (int64_t g = g0; g < g0 + n; ++g) {
    const float* x = xt + g * kLutGroup;
    int8_t* out = q + lut_table_slot(g, s.word_order) * kLutEntries;
    for (int i = 0; i < kLutEntries; ++i) {
      const float e = (((i & 1 ? x[0] : -x[0]) + (i & 2 ? x[1] : -x[1])) + (i & 4 ? x[2] : -x[2])) +
                      (i & 8 ? x[3] : -x[3]);
      const float r = std::nearbyint(e * inv);
      out[i] = static_cast<int8_t>(std::min<float>(kLutQMax, std::max<float>(-kLutQMax, r)));
    }
  }
}

static float half_float(uint16_t h) noexcept { return static_cast<float>(half_to_double(h)); }

// One row at a time: the reference the SIMD variants are tested against.
void lut_rows_portable(const LutCtx& c, int64_t tile_begin, int64_t tile_end) {
  for (int64_t k = tile_begin; k < tile_end; ++k) {
    const uint8_t* tile = c.packed + k * c.tile_bytes;
    for (int64_t i = 0; i < kLutTileRows && k * kLutTileRows + i < c.out; ++i) {
      const int64_t r = k * kLutTileRows + i;
      for (int64_t t = 0; t < c.tokens; ++t) {
        const int8_t* q = c.q + t * c.groups * kLutEntries;
        float y = 0.0f;
        for (int64_t b = 0, p0 = 0; b < c.nb; p0 += c.block_pairs(b), ++b) {
          int32_t acc = 0;
          for (int64_t p = p0; p < p0 + c.block_pairs(b); ++p) {
            const uint8_t v = tile[p * kLutTileRows + i];
            acc += q[2 * p * kLutEntries + (v & 15)] + q[(2 * p + 1) * kLutEntries + (v >> 4)];
          }
          const float f = static_cast<float>(acc) * c.tscale[t * c.nb + b];
          y += f * half_float(c.scale[r * c.nb + b]) +
               half_float(c.mean[r * c.nb + b]) * c.xsum[t * c.nb + b];
        }
        c.y[t * c.out + r] = y;
      }
    }
  }
}

}  // namespace sdq::detail
