// The portable add-only GEMM: one row at a time, one table look-up per 4 codes. Plain C++, no
// intrinsics; the reference shape of what the SIMD variants do for 8 or 16 rows at once.

#include "gemm_addonly.h"
#include "scratch.h"

namespace sdq::detail {
namespace {

// sum over the block's words of lut[g][nibble g of bits].
float lookup_sum(const word_t* bits, int64_t nwords, const float* lut) noexcept {
  float acc = 0.0f;
  for (int64_t w = 0; w < nwords; ++w) {
    const word_t v = bits[w];
    const float* p = lut + w * kNibblesPerWord * kLutEntries;
    for (int k = 0; k < kNibblesPerWord; ++k) acc += p[k * kLutEntries + ((v >> (4 * k)) & 15u)];
  }
  return acc;
}

float block_dot(const GemmCtx& c, int64_t r, int64_t b, int64_t t,
                const word_t* neg) noexcept {
  const int64_t w0 = b * c.words_per_block, nw = c.block_words(b);
  const float* lut = c.lut + t * c.lut_stride + w0 * kNibblesPerWord * kLutEntries;
  const float pos = lookup_sum(c.sign + r * c.words + w0, nw, lut);
  if (!c.ternary) return (pos + pos) - c.xtsum[t * c.nb + b];
  return pos - lookup_sum(neg + w0, nw, lut);
}

}  // namespace

void gemm_rows_portable(const GemmCtx& c, int64_t begin, int64_t end) {
  // One row's scales and -1 codes, rebuilt per row. word_t is 4 bytes like a float.
  float* s = scratch<float>(ScratchSlot::gemm_rows, 2 * c.nb + c.words);
  float* mu = s + c.nb;
  word_t* neg = reinterpret_cast<word_t*>(mu + c.nb);
  for (int64_t r = begin; r < end; ++r) {
    for (int64_t b = 0; b < c.nb; ++b) {
      s[b] = half_to_float(c.scale[r * c.nb + b]);
      mu[b] = half_to_float(c.mean[r * c.nb + b]);
    }
    if (c.ternary)  // the -1 codes: nonzero and not sign
      for (int64_t w = 0; w < c.words; ++w)
        neg[w] = c.nonzero[r * c.words + w] & ~c.sign[r * c.words + w];
    for (int64_t t = 0; t < c.tokens; ++t) {
      float y = 0.0f;
      for (int64_t b = 0; b < c.nb; ++b)
        y += s[b] * block_dot(c, r, b, t, neg) + mu[b] * c.xsum[t * c.nb + b];
      c.y[t * c.out + r] = y;
    }
  }
}

}  // namespace sdq::detail
