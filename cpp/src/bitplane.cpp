// Bitplane packing (bitplane.h): one pass over the int8 codes per row, 32 codes to a word.
#include "sdq/bitplane.h"

#include "guard.h"
#include "parallel.h"

namespace sdq {
namespace {

bool valid_code(int8_t c, Levels levels) noexcept {
  return c == 1 || c == -1 || (levels == Levels::ternary && c == 0);
}

// Packs one row; returns false on a code outside the alphabet.
bool pack_row(const int8_t* codes, int64_t cols, Levels levels, word_t* sign, word_t* nonzero) {
  const int64_t words = words_for(cols);
  for (int64_t w = 0; w < words; ++w) {
    word_t s = 0, nz = 0;
    const int64_t c0 = w * kWordBits;
    const int64_t n = cols - c0 < kWordBits ? cols - c0 : kWordBits;
    for (int64_t b = 0; b < n; ++b) {
      const int8_t c = codes[c0 + b];
      if (!valid_code(c, levels)) return false;
      s |= static_cast<word_t>(c > 0) << b;
      nz |= static_cast<word_t>(c != 0) << b;
    }
    sign[w] = s;
    if (nonzero) nonzero[w] = nz;
  }
  return true;
}

void unpack_row(const word_t* sign, const word_t* nonzero, int64_t cols, int8_t* codes) {
  for (int64_t c = 0; c < cols; ++c) {
    const int64_t w = c / kWordBits, b = c % kWordBits;
    const int s = (sign[w] >> b) & 1u;
    const int nz = nonzero ? (nonzero[w] >> b) & 1u : 1;
    codes[c] = static_cast<int8_t>(nz ? (s ? 1 : -1) : 0);
  }
}

Status check(int64_t rows, int64_t cols, Levels levels, const void* a, const void* sign,
             const word_t* nonzero) {
  if (levels != Levels::binary && levels != Levels::ternary) return Status::bad_levels;
  if (rows < 0 || cols < 0) return Status::bad_size;
  if (rows == 0 || cols == 0) return Status::ok;
  if (!a || !sign || (levels == Levels::ternary && !nonzero)) return Status::null_pointer;
  return Status::ok;
}

Status pack_checked(const int8_t* codes, int64_t rows, int64_t cols, Levels levels, word_t* sign,
                    word_t* nonzero, int threads) {
  const Status st = check(rows, cols, levels, codes, sign, nonzero);
  if (st != Status::ok || rows == 0 || cols == 0) return st;
  if (levels == Levels::binary) nonzero = nullptr;
  const int64_t words = words_for(cols);
  bool ok = true;  // written by several threads, only ever from true to false
  detail::parallel_for(rows, threads, 64, [&](int64_t begin, int64_t end) {
    bool mine = true;
    for (int64_t r = begin; r < end && mine; ++r)
      mine = pack_row(codes + r * cols, cols, levels, sign + r * words,
                      nonzero ? nonzero + r * words : nullptr);
    if (!mine) __atomic_store_n(&ok, false, __ATOMIC_RELAXED);
  });
  return ok ? Status::ok : Status::bad_code;
}

Status unpack_checked(const word_t* sign, const word_t* nonzero, int64_t rows, int64_t cols,
                      Levels levels, int8_t* codes, int threads) {
  const Status st = check(rows, cols, levels, codes, sign, nonzero);
  if (st != Status::ok || rows == 0 || cols == 0) return st;
  if (levels == Levels::binary) nonzero = nullptr;
  const int64_t words = words_for(cols);
  detail::parallel_for(rows, threads, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      unpack_row(sign + r * words, nonzero ? nonzero + r * words : nullptr, cols,
                 codes + r * cols);
  });
  return Status::ok;
}

}  // namespace

Status pack_bitplanes(const int8_t* codes, int64_t rows, int64_t cols, Levels levels,
                      word_t* sign, word_t* nonzero, int threads) noexcept {
  return detail::guarded(
      [&] { return pack_checked(codes, rows, cols, levels, sign, nonzero, threads); });
}

Status unpack_bitplanes(const word_t* sign, const word_t* nonzero, int64_t rows, int64_t cols,
                        Levels levels, int8_t* codes, int threads) noexcept {
  return detail::guarded(
      [&] { return unpack_checked(sign, nonzero, rows, cols, levels, codes, threads); });
}

}  // namespace sdq
