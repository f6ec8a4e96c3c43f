// Block geometry of one quantized linear layer (method.md: blocks of B input columns).
//
// The input dimension `in` is cut into ceil(in / B) blocks of B columns; the last one may be
// shorter. Each block is zero-padded to the next power of two (so the FWHT applies; full blocks
// need no padding because B itself must be a power of two) and up-sampled from `padded` to
// m = floor(padded * osr + 0.5) samples (round half up; exact for osr a multiple of 1/B).
// In a packed row, block b's m codes start at code column `code_offset(b)`, a multiple of 32, and
// are followed by zero bits up to the next multiple of 32: a block always starts on a word.
#pragma once
#include <cmath>
#include <cstdint>

#include "sdq/fwht.h"

namespace sdq {

constexpr double kMaxOsr = 16.0;  // above this, plain fp16 weights are smaller

struct BlockLayout {
  int64_t in_features;
  int64_t block_size;
  double osr;

  int64_t num_blocks() const noexcept { return (in_features + block_size - 1) / block_size; }
  int64_t start(int64_t b) const noexcept { return b * block_size; }
  int64_t width(int64_t b) const noexcept {
    const int64_t rest = in_features - start(b);
    return rest < block_size ? rest : block_size;
  }
  int64_t padded(int64_t b) const noexcept {
    int64_t p = 1;
    while (p < width(b)) p <<= 1;
    return p;
  }
  int64_t m(int64_t b) const noexcept {
    return static_cast<int64_t>(std::floor(static_cast<double>(padded(b)) * osr + 0.5));
  }
  int64_t code_cols(int64_t b) const noexcept { return (m(b) + 31) / 32 * 32; }
  int64_t code_offset(int64_t b) const noexcept { return b * code_cols(0); }  // only the last differs
  int64_t total_code_cols() const noexcept {
    const int64_t nb = num_blocks();
    return nb == 0 ? 0 : code_offset(nb - 1) + code_cols(nb - 1);
  }
  int64_t words_per_row() const noexcept { return total_code_cols() / 32; }

  // True when the geometry is usable: positive sizes, B a power of two, 0 < osr <= kMaxOsr, m >= 1.
  bool valid() const noexcept {
    return in_features > 0 && is_power_of_two(block_size) && osr > 0.0 && osr <= kMaxOsr &&
           m(num_blocks() - 1) >= 1;
  }
};

}  // namespace sdq
