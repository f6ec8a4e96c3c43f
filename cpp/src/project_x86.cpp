// The projection (project.h) in AVX2+FMA and AVX-512F: register tiles of up to 6 tokens, walking
// the rows of down once per tile. Compiled with target attributes (the build needs no -mavx*),
// chosen at run time.
#include "project.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// GCC 12's avx512fintrin.h seeds masked intrinsics with _mm512_undefined_*(): a false positive of
// -W(maybe-)uninitialized once inlined into a target-attribute function (lut_gemm_avx512.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>

#define SDQ_AVX2 __attribute__((target("avx2,fma")))
#define SDQ_AVX512 __attribute__((target("avx2,fma,avx512f")))

namespace sdq::detail {
namespace {

constexpr int kTileTokens = 6;

// AVX-512: tokens [0, T) x outputs [j0, j0 + 64), masked past m.
template <int T>
SDQ_AVX512 void tile512(const float* down, int64_t padded, int64_t m, const float* v,
                        float* out, int64_t out_stride, int64_t j0) {
  __mmask16 k[4];
  #pragma GCC unroll 8
  for (int q = 0; q < 4; ++q) {
    const int64_t rest = m - j0 - 16 * q;
    k[q] = rest >= 16 ? __mmask16(0xFFFF) : rest <= 0 ? __mmask16(0) : __mmask16((1u << rest) - 1);
  }
  __m512 acc[T][4];
  #pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
    #pragma GCC unroll 8
    for (int q = 0; q < 4; ++q) acc[t][q] = _mm512_setzero_ps();
  const float* d = down + j0;
  for (int64_t i = 0; i < padded; ++i, d += m) {
    __m512 w[4];
    #pragma GCC unroll 8
    for (int q = 0; q < 4; ++q) w[q] = _mm512_maskz_loadu_ps(k[q], d + 16 * q);
    #pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const __m512 x = _mm512_set1_ps(v[t * padded + i]);
      #pragma GCC unroll 8
      for (int q = 0; q < 4; ++q) acc[t][q] = _mm512_fmadd_ps(w[q], x, acc[t][q]);
    }
  }
  #pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
    #pragma GCC unroll 8
    for (int q = 0; q < 4; ++q)
      _mm512_mask_storeu_ps(out + t * out_stride + j0 + 16 * q, k[q], acc[t][q]);
}

// AVX2: tokens [0, T) x outputs [j0, j0 + 16), masked past m.
template <int T>
SDQ_AVX2 void tile256(const float* down, int64_t padded, int64_t m, const float* v, float* out,
                      int64_t out_stride, int64_t j0) {
  alignas(32) static const int32_t ramp[8] = {0, 1, 2, 3, 4, 5, 6, 7};
  __m256i k[2];
  #pragma GCC unroll 8
  for (int q = 0; q < 2; ++q)  // lane l live when j0 + 8q + l < m
    k[q] = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(m - j0 - 8 * q, 8))),
                              _mm256_load_si256(reinterpret_cast<const __m256i*>(ramp)));
  __m256 acc[T][2];
  #pragma GCC unroll 8
  for (int t = 0; t < T; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  const float* d = down + j0;
  for (int64_t i = 0; i < padded; ++i, d += m) {
    const __m256 w0 = _mm256_maskload_ps(d, k[0]), w1 = _mm256_maskload_ps(d + 8, k[1]);
    #pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const __m256 x = _mm256_broadcast_ss(v + t * padded + i);
      acc[t][0] = _mm256_fmadd_ps(w0, x, acc[t][0]);
      acc[t][1] = _mm256_fmadd_ps(w1, x, acc[t][1]);
    }
  }
  #pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
    _mm256_maskstore_ps(out + t * out_stride + j0, k[0], acc[t][0]);
    _mm256_maskstore_ps(out + t * out_stride + j0 + 8, k[1], acc[t][1]);
  }
}

using Tile = void (*)(const float*, int64_t, int64_t, const float*, float*, int64_t, int64_t);

// Column tiles of `width` outputs, token tiles of kTileTokens (the last one shorter). Tokens
// inside: a column tile of down (32 KB for 128 rows of 64) stays in L1 for every token tile.
void tiles(const Tile (&fns)[kTileTokens + 1], int64_t width, const float* down, int64_t padded,
           int64_t m, const float* v, int64_t tokens, float* out, int64_t out_stride) {
  for (int64_t j0 = 0; j0 < m; j0 += width)
    for (int64_t t0 = 0; t0 < tokens; t0 += kTileTokens) {
      const int64_t n = std::min<int64_t>(kTileTokens, tokens - t0);
      fns[n](down, padded, m, v + t0 * padded, out + t0 * out_stride, out_stride, j0);
    }
}

}  // namespace

void project_avx512(const float* down, int64_t padded, int64_t m, const float* v, int64_t tokens,
                    float* out, int64_t out_stride) {
  static constexpr Tile fns[] = {nullptr,     tile512<1>, tile512<2>, tile512<3>,
                                 tile512<4>, tile512<5>, tile512<6>};
  tiles(fns, 64, down, padded, m, v, tokens, out, out_stride);
}

void project_avx2(const float* down, int64_t padded, int64_t m, const float* v, int64_t tokens,
                  float* out, int64_t out_stride) {
  static constexpr Tile fns[] = {nullptr,     tile256<1>, tile256<2>, tile256<3>,
                                 tile256<4>, tile256<5>, tile256<6>};
  tiles(fns, 16, down, padded, m, v, tokens, out, out_stride);
}

}  // namespace sdq::detail

#else  // not x86-64: never chosen (project_kernel returns null for these), defined so it links

namespace sdq::detail {
void project_avx512(const float* down, int64_t padded, int64_t m, const float* v, int64_t tokens,
                    float* out, int64_t out_stride) {
  project_portable(down, padded, m, v, tokens, out, out_stride);
}
void project_avx2(const float* down, int64_t padded, int64_t m, const float* v, int64_t tokens,
                  float* out, int64_t out_stride) {
  project_portable(down, padded, m, v, tokens, out, out_stride);
}
}  // namespace sdq::detail

#endif
