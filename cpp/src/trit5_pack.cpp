// trit5_pack / trit5_unpack (trit5.h): ternary bitplanes <-> the 1.67-bit trit5 layout, one row
// tile per task. Both directions check what the other could not represent, so a round trip is
// exact and a corrupt input is an error, never a silently different layer.
#include <atomic>
#include <cstring>

#include "guard.h"
#include "parallel.h"
#include "sdq/trit5.h"

namespace sdq {
namespace {

constexpr int64_t kTile = kTrit5TileRows;

// Trit of code column c in a row of bitplanes: +1, -1 or 0. Branch-free: random codes would
// mispredict every branch.
inline int trit_at(const word_t* sign, const word_t* nonzero, int64_t c) noexcept {
  const int shift = static_cast<int>(c % kWordBits);
  const int nz = static_cast<int>((nonzero[c / kWordBits] >> shift) & 1u);
  const int pos = static_cast<int>((sign[c / kWordBits] >> shift) & 1u);
  return nz * (2 * pos - 1);
}

// Whether a row's planes hold only valid ternary codes: no sign bit without its nonzero bit and
// nothing in a block's padding columns [m_b, code_cols(b)).
bool row_is_canonical(const BlockLayout& L, const word_t* sign, const word_t* nonzero) noexcept {
  const int64_t words = L.words_per_row();
  for (int64_t w = 0; w < words; ++w)
    if (sign[w] & ~nonzero[w]) return false;
  for (int64_t b = 0; b < L.num_blocks(); ++b)
    for (int64_t c = L.code_offset(b) + L.m(b); c < L.code_offset(b) + L.code_cols(b); ++c)
      if (nonzero[c / kWordBits] & (word_t{1} << (c % kWordBits))) return false;
  return true;
}

void pack_tile(const BlockLayout& L, const word_t* sign, const word_t* nonzero, int64_t out,
               int64_t tile, uint8_t* trits, uint32_t* trit_signs) noexcept {
  const int64_t words = L.words_per_row(), groups = trit5_total_groups(L);
  uint8_t* tb = trits + tile * (groups / 2) * kTile;
  uint32_t* sb = trit_signs + tile * groups;
  std::memset(tb, 0, static_cast<size_t>(groups / 2 * kTile));
  std::memset(sb, 0, static_cast<size_t>(groups) * sizeof(uint32_t));
  for (int64_t r = 0; r < kTile && tile * kTile + r < out; ++r) {
    const int64_t row = tile * kTile + r;
    const word_t* s = sign + row * words;
    const word_t* nz = nonzero + row * words;
    for (int64_t b = 0; b < L.num_blocks(); ++b) {
      const int64_t m = L.m(b), c0 = L.code_offset(b), g0 = trit5_group_offset(L, b);
      const int64_t used = trit5_groups(L, b);
      for (int64_t j = 0; j < used; ++j) {
        int v = 0;
        for (int64_t k = 0; k < kTrit5GroupCodes; ++k) {
          const int64_t pos = kTrit5GroupCodes * j + k;
          v = 3 * v + (pos < m ? trit_at(s, nz, c0 + pos) : 0) + 1;
        }
        const int64_t g = g0 + j;
        const int idx = v >= 13 ? v - 13 : 13 - v;
        tb[(g / 2) * kTile + r] |= static_cast<uint8_t>(idx << (4 * (g % 2)));
        if (v < 13) sb[g] |= uint32_t{1} << r;
      }
    }
  }
}

// Decodes one tile into rows of bitplanes; false when the tile is not canonical.
bool unpack_tile(const BlockLayout& L, const uint8_t* trits, const uint32_t* trit_signs,
                 int64_t out, int64_t tile, word_t* sign, word_t* nonzero) noexcept {
  const int64_t words = L.words_per_row(), groups = trit5_total_groups(L);
  const uint8_t* tb = trits + tile * (groups / 2) * kTile;
  const uint32_t* sb = trit_signs + tile * groups;
  for (int64_t r = 0; r < kTile; ++r) {
    const int64_t row = tile * kTile + r;
    const bool real = row < out;
    word_t* s = real ? sign + row * words : nullptr;
    word_t* nz = real ? nonzero + row * words : nullptr;
    if (real) {
      std::memset(s, 0, static_cast<size_t>(words) * sizeof(word_t));
      std::memset(nz, 0, static_cast<size_t>(words) * sizeof(word_t));
    }
    for (int64_t b = 0; b < L.num_blocks(); ++b) {
      const int64_t m = L.m(b), c0 = L.code_offset(b), g0 = trit5_group_offset(L, b);
      const int64_t used = real ? trit5_groups(L, b) : 0;  // groups that may hold codes
      const int64_t padded = trit5_padded_groups(L, b);
      for (int64_t j = 0; j < padded; ++j) {
        const int64_t g = g0 + j;
        const int idx = (tb[(g / 2) * kTile + r] >> (4 * (g % 2))) & 15;
        const bool neg = (sb[g] >> r) & 1u;
        if (idx > 13 || (idx == 0 && neg)) return false;
        if (j >= used) {
          if (idx != 0) return false;
          continue;
        }
        const int w = 13 + idx;
        const int t[3] = {w / 9 - 1, (w / 3) % 3 - 1, w % 3 - 1};
        for (int64_t k = 0; k < kTrit5GroupCodes; ++k) {
          const int64_t pos = kTrit5GroupCodes * j + k;
          if (pos >= m) {
            if (t[k] != 0) return false;
            continue;
          }
          // Branch-free bit writes: random codes would mispredict every branch.
          const int64_t c = c0 + pos;
          const int shift = static_cast<int>(c % kWordBits);
          const word_t nonzero_bit = t[k] != 0, plus_bit = (neg ? -t[k] : t[k]) > 0;
          nz[c / kWordBits] |= nonzero_bit << shift;
          s[c / kWordBits] |= plus_bit << shift;
        }
      }
    }
  }
  return true;
}

// Tiles per task: a tile of a 4096-wide layer is ~0.1 ms of bit shuffling, so a few suffice.
int64_t tile_grain(const BlockLayout& L) noexcept {
  const int64_t codes = kTile * L.total_code_cols();
  return codes >= (int64_t{1} << 18) ? 1 : (int64_t{1} << 18) / codes;
}

Status check(const BlockLayout& L, const void* a, const void* b, const void* c, const void* d,
             int64_t out) noexcept {
  if (!L.valid() || out < 0) return Status::bad_size;
  if (out > 0 && (!a || !b || !c || !d)) return Status::null_pointer;
  return Status::ok;
}

}  // namespace

Status trit5_pack(const BlockLayout& L, const word_t* sign, const word_t* nonzero, int64_t out,
                  uint8_t* trits, uint32_t* trit_signs, int threads) noexcept {
  const Status st = check(L, sign, nonzero, trits, trit_signs, out);
  if (st != Status::ok || out == 0) return st;
  return detail::guarded([&] {
    std::atomic<bool> bad{false};
    const int64_t words = L.words_per_row();
    detail::parallel_for(trit5_tiles(out), threads, tile_grain(L), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        for (int64_t r = t * kTile; r < out && r < (t + 1) * kTile; ++r)
          if (!row_is_canonical(L, sign + r * words, nonzero + r * words))
            bad.store(true, std::memory_order_relaxed);
        pack_tile(L, sign, nonzero, out, t, trits, trit_signs);
      }
    });
    return bad.load() ? Status::bad_code : Status::ok;
  });
}

Status trit5_unpack(const BlockLayout& L, const uint8_t* trits, const uint32_t* trit_signs,
                    int64_t out, word_t* sign, word_t* nonzero, int threads) noexcept {
  const Status st = check(L, trits, trit_signs, sign, nonzero, out);
  if (st != Status::ok || out == 0) return st;
  return detail::guarded([&] {
    std::atomic<bool> bad{false};
    detail::parallel_for(trit5_tiles(out), threads, tile_grain(L), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t)
        if (!unpack_tile(L, trits, trit_signs, out, t, sign, nonzero))
          bad.store(true, std::memory_order_relaxed);
    });
    return bad.load() ? Status::bad_code : Status::ok;
  });
}

}  // namespace sdq
