// AVX-512 masked-add GEMM (the bit-serial alternative to the tables): a 32-bit code word is moved
// into mask registers as it is, and the 16 activations under each half are added to an
// accumulator only where the code bit is set (vaddps with a write mask). No gathers, no tables:
// one row at a time, contiguous loads of codes and activations.
//   binary:  <q, x> = 2 * sum(x where bit) - sum(x)
//   ternary: <q, x> = sum(x where sign) - sum(x where nonzero & ~sign)
// Compiled with a target attribute so the build needs no -mavx512f; chosen at run time.
#include "gemm_addonly.h"
#include "scratch.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// See gemm_addonly_avx512.cpp: GCC 12's masked intrinsics trip its own -Wmaybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>

#define SDQ_AVX512 __attribute__((target("avx512f")))

namespace sdq::detail {
namespace {

constexpr int kMaxTokens = 4;  // tokens sharing one pass over a row's codes
constexpr int kAcc = 4;        // accumulators per token: (even, odd word) x (low, high half)

SDQ_AVX512 void convert_row(const uint16_t* h, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(h + i))));
  for (; i < n; ++i) out[i] = half_to_float(h[i]);
}

// Adds (kSub: subtracts) the activations under the set bits of `bits` into acc[0..1].
template <bool kSub>
SDQ_AVX512 inline void masked_word(uint32_t bits, const float* x, __m512* acc) {
  const __mmask16 lo = static_cast<__mmask16>(bits), hi = static_cast<__mmask16>(bits >> 16);
  if (kSub) {
    acc[0] = _mm512_mask_sub_ps(acc[0], lo, acc[0], _mm512_loadu_ps(x));
    acc[1] = _mm512_mask_sub_ps(acc[1], hi, acc[1], _mm512_loadu_ps(x + 16));
  } else {
    acc[0] = _mm512_mask_add_ps(acc[0], lo, acc[0], _mm512_loadu_ps(x));
    acc[1] = _mm512_mask_add_ps(acc[1], hi, acc[1], _mm512_loadu_ps(x + 16));
  }
}

// Row r, tokens [t0, t0 + TT): y[t, r] over all blocks. The per-block scale multiplies a vector
// of partial sums, so a row needs one horizontal sum per token, not one per block.
template <int TT, bool kTernary>
SDQ_AVX512 void row_tokens(const GemmCtx& c, int64_t r, int64_t t0, const float* s,
                           const float* mu, int64_t cols) {
  const word_t* srow = c.sign + r * c.words;
  const word_t* nrow = kTernary ? c.nonzero + r * c.words : nullptr;
  __m512 yv[TT];
  float ys[TT];
  for (int t = 0; t < TT; ++t) yv[t] = _mm512_setzero_ps(), ys[t] = 0.0f;
  for (int64_t b = 0; b < c.nb; ++b) {
    __m512 acc[TT][kAcc];
    for (int t = 0; t < TT; ++t)
      for (int a = 0; a < kAcc; ++a) acc[t][a] = _mm512_setzero_ps();
    const int64_t w0 = b * c.words_per_block, w1 = w0 + c.block_words(b);
    for (int64_t w = w0; w < w1; ++w) {
      const uint32_t pos = srow[w];
      const uint32_t neg = kTernary ? nrow[w] & ~pos : 0;
      for (int t = 0; t < TT; ++t) {
        const float* x = c.xt + (t0 + t) * cols + w * kWordBits;
        __m512* a = acc[t] + ((w - w0) & 1) * 2;
        masked_word<false>(pos, x, a);
        if (kTernary) masked_word<true>(neg, x, a);
      }
    }
    const float sb = s[b];
    for (int t = 0; t < TT; ++t) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]),
                                       _mm512_add_ps(acc[t][2], acc[t][3]));
      const float* xs = c.xsum + (t0 + t) * c.nb;
      if (kTernary) {
        yv[t] = _mm512_fmadd_ps(_mm512_set1_ps(sb), sum, yv[t]);
        ys[t] += mu[b] * xs[b];
      } else {
        yv[t] = _mm512_fmadd_ps(_mm512_set1_ps(sb + sb), sum, yv[t]);
        ys[t] += mu[b] * xs[b] - sb * c.xtsum[(t0 + t) * c.nb + b];
      }
    }
  }
  for (int t = 0; t < TT; ++t) c.y[(t0 + t) * c.out + r] = _mm512_reduce_add_ps(yv[t]) + ys[t];
}

template <bool kTernary>
SDQ_AVX512 void rows(const GemmCtx& c, int64_t begin, int64_t end) {
  float* s = scratch<float>(ScratchSlot::gemm_rows, 2 * c.nb);  // one row's scales, converted
  float* mu = s + c.nb;
  const int64_t cols = c.words * kWordBits;
  for (int64_t r = begin; r < end; ++r) {
    convert_row(c.scale + r * c.nb, c.nb, s);
    convert_row(c.mean + r * c.nb, c.nb, mu);
    for (int64_t t0 = 0; t0 < c.tokens; t0 += kMaxTokens) {
      switch (std::min<int64_t>(kMaxTokens, c.tokens - t0)) {
        case 1: row_tokens<1, kTernary>(c, r, t0, s, mu, cols); break;
        case 2: row_tokens<2, kTernary>(c, r, t0, s, mu, cols); break;
        case 3: row_tokens<3, kTernary>(c, r, t0, s, mu, cols); break;
        default: row_tokens<4, kTernary>(c, r, t0, s, mu, cols); break;
      }
    }
  }
}

}  // namespace

SDQ_AVX512 void gemm_rows_avx512_mask(const GemmCtx& c, int64_t begin, int64_t end) {
  if (c.ternary)
    rows<true>(c, begin, end);
  else
    rows<false>(c, begin, end);
}

}  // namespace sdq::detail

#else  // not x86-64: never selected (cpu_has is false), defined so the build links

namespace sdq::detail {
void gemm_rows_avx512_mask(const GemmCtx& c, int64_t begin, int64_t end) {
  gemm_rows_portable(c, begin, end);
}
}  // namespace sdq::detail

#endif
