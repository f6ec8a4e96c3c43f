// The packed code format (documented once here and in docs/format.md).
//
// Codes are stored as bitplanes of 32-bit words, row-major, little-endian bit order:
//   code column c of a row lives in word c / 32, bit c % 32 (bit 0 = least significant).
//   A row holds `words` words; row r starts at word r * words (no extra row padding).
//   binary  (1 bit/code):  sign plane only;       bit 1 -> +1, bit 0 -> -1
//   ternary (2 bits/code): nonzero + sign planes; nz 0 -> 0, nz 1 & sign 1 -> +1, nz 1 & sign 0 -> -1
//                          (the sign bit of a zero code is always 0)
// Padding columns (c >= cols in pack, and the block padding of layout.h) are written as bit 0 in
// every plane. A binary padding bit therefore reads back as -1: the kernels multiply it by an
// activation that is zero at padding positions, so it contributes nothing.
#pragma once
#include <cstdint>

#include "sdq/levels.h"
#include "sdq/status.h"

namespace sdq {

using word_t = uint32_t;
constexpr int kWordBits = 32;
static_assert(sizeof(word_t) * 8 == kWordBits, "a bitplane word is 32 bits");

constexpr int64_t words_for(int64_t cols) noexcept { return (cols + kWordBits - 1) / kWordBits; }
static_assert(words_for(1) == 1 && words_for(32) == 1 && words_for(33) == 2, "word count rounds up");

// codes: [rows, cols] int8, contiguous. sign: [rows, words_for(cols)]; nonzero likewise (ternary
// only, null for binary). Returns bad_code if a code is outside the alphabet of `levels`.
Status pack_bitplanes(const int8_t* codes, int64_t rows, int64_t cols, Levels levels,
                      word_t* sign, word_t* nonzero, int threads = 0) noexcept;

// Inverse of pack_bitplanes: writes [rows, cols] int8 codes (padding bits are not read).
Status unpack_bitplanes(const word_t* sign, const word_t* nonzero, int64_t rows, int64_t cols,
                        Levels levels, int8_t* codes, int threads = 0) noexcept;

}  // namespace sdq
