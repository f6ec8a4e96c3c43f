// The portable trit5 GEMM: plain C++, one row at a time; the reference shape of what the SIMD
// variants do for 32 rows at once, with the same integer sums and the same tables.
#include <algorithm>
#include <cmath>

#include "scratch.h"
#include "trit5_gemm.h"

namespace sdq::detail {

void trit5_block_tables_portable(const BlockLayout& L, const float* xt, int64_t stride,
                                 int64_t b, int8_t* tables, float* step) {
  int pattern[kTrit5Entries][3];
  for (int i = 0; i < kTrit5Entries; ++i) trit5_pattern(i, pattern[i]);
  const Trit5Quant qz = trit5_quant(trit5_block_max(L, b, xt));
  step[b] = qz.step;
  const float* x = xt + L.code_offset(b);
  const int64_t m = L.m(b), used = trit5_groups(L, b), padded = trit5_padded_groups(L, b);
  int8_t* tb = tables + trit5_group_offset(L, b) * stride;
  for (int64_t j = 0; j < padded; ++j) {
    int8_t* q = tb + j * stride;
    float v[3] = {0.0f, 0.0f, 0.0f};
    if (j < used) trit5_group_x(x, m, j, v);
    for (int i = 0; i < kTrit5Entries; ++i) {
      const int* t = pattern[i];
      const float e = (static_cast<float>(t[0]) * v[0] + static_cast<float>(t[1]) * v[1]) +
                      static_cast<float>(t[2]) * v[2];
      const float r = std::nearbyint((e * qz.pre) * qz.inv);
      // |r| <= 127 for finite input; the clamp keeps a NaN or inf activation from being UB.
      q[i] = static_cast<int8_t>(r >= 127.0f ? 127 : r <= -127.0f ? -127 : r == r ? r : 0);
    }
    for (int64_t k = kTrit5Entries; k < stride; ++k) q[k] = q[k - kTrit5Entries];
  }
}

void trit5_rows_portable(const Trit5Ctx& c, int64_t tile_begin, int64_t tile_end) {
  const int64_t pairs = c.groups / 2;
  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const uint8_t* tb = c.trits + tile * pairs * kTrit5TileRows;
    const uint32_t* sb = c.signs + tile * c.groups;
    const int64_t r0 = tile * kTrit5TileRows;
    for (int64_t r = r0; r < std::min(c.out, r0 + kTrit5TileRows); ++r) {
      const int64_t lane = r - r0;
      for (int64_t t = 0; t < c.tokens; ++t) {
        const int8_t* tab = c.tables + t * c.token_table_bytes();
        float y = 0.0f;
        for (int64_t b = 0, g0 = 0; b < c.nb; g0 += c.block_groups(b), ++b) {
          int32_t acc = 0;
          for (int64_t g = g0; g < g0 + c.block_groups(b); ++g) {
            const int idx = (tb[(g / 2) * kTrit5TileRows + lane] >> (4 * (g % 2))) & 15;
            const int32_t q = tab[g * c.table_stride + idx];
            acc += ((sb[g] >> lane) & 1u) ? -q : q;
          }
          const float s = half_to_float(c.scale[r * c.nb + b]);
          const float mu = half_to_float(c.mean[r * c.nb + b]);
          y += static_cast<float>(acc) * (c.step[t * c.nb + b] * s) + mu * c.xsum[t * c.nb + b];
        }
        c.y[t * c.out + r] = y;
      }
    }
  }
}

}  // namespace sdq::detail
