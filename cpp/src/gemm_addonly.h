// Internal: what the add-only GEMM variants share (gemm_addonly*.cpp).
//
// The table variants (all but avx512-mask) use the same look-up tables, built once per call from
// xt and shared by all rows:
// for every group g of 4 consecutive code columns and every token, lut[g][i] is the subset sum
// sum_{j : bit j of i} xt[4g + j] (16 floats). Then, per row and block,
//   binary:  <q, xt>  = 2 * sum_g lut[g][sign nibble g] - sum(xt_b)
//   ternary: <q, xt>  = sum_g lut[g][sign nibble g] - lut[g][(nonzero & ~sign) nibble g]
// (the sign bit of a zero code is 0, so the +1 codes are exactly the sign bits). The inner loops
// only look up and add; a variant differs in how many rows it serves per instruction.
#pragma once
#include <cstdint>
#include <cstring>

#include "sdq/bitplane.h"
#include "sdq/layout.h"

namespace sdq::detail {

constexpr int kGroup = 4;             // code columns per table look-up
constexpr int kLutEntries = 16;       // 2^kGroup
constexpr int kNibblesPerWord = kWordBits / kGroup;

// Everything one call needs, resolved once by addonly_gemm.
struct GemmCtx {
  bool ternary;
  const word_t* sign;
  const word_t* nonzero;  // null for binary
  const uint16_t* scale;  // [out, nb] fp16
  const uint16_t* mean;   // [out, nb] fp16
  int64_t out, words, nb;
  int64_t words_per_block;  // of every block; the last block may use fewer (last_words)
  int64_t last_words;
  const float* xt;        // [tokens, words * kWordBits]
  const float* lut;       // [tokens, words * kNibblesPerWord, kLutEntries] (table variants)
  int64_t lut_stride;     // floats per token in lut
  const float* xtsum;     // [tokens, nb]: sum of xt per block (binary correction)
  const float* xsum;      // [tokens, nb], row stride nb
  int64_t tokens;         // tokens in this call of the kernel (a chunk of the batch)
  float* y;               // [tokens, out]

  int64_t block_words(int64_t b) const noexcept {
    return b == nb - 1 ? last_words : words_per_block;
  }
};

// A kernel computes y rows [begin, end) for all ctx.tokens tokens.
using GemmKernel = void (*)(const GemmCtx&, int64_t begin, int64_t end);

void gemm_rows_portable(const GemmCtx& c, int64_t begin, int64_t end);
void gemm_rows_avx2(const GemmCtx& c, int64_t begin, int64_t end);    // needs avx2, fma, f16c
void gemm_rows_avx512(const GemmCtx& c, int64_t begin, int64_t end);  // needs avx512f
void gemm_rows_avx512_mask(const GemmCtx& c, int64_t begin, int64_t end);  // avx512f, no tables

// IEEE fp16 bit pattern -> float, portable (subnormals, inf and NaN included).
inline float half_to_float(uint16_t h) noexcept {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal: value man * 2^-24, exact in float
    float f = static_cast<float>(man) * (1.0f / 16777216.0f);
    std::memcpy(&bits, &f, sizeof f);
    bits |= sign;
  }
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

}  // namespace sdq::detail
