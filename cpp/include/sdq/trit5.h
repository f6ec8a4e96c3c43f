// Ternary codes at 1.67 bits per trit ("trit5", the idea of bitnet.cpp's TL2): three trits make
// one of 27 values, stored as a 4-bit magnitude pattern plus one sign bit, and the kernel looks the
// pattern up in int8 tables (vpshufb) for 32 rows at once.
//
// Layout (fixed: the Python format and its NumPy twin read the same bytes):
// - Rows in tiles of 32 (tiles = ceil(out / 32)); rows past `out` in the last tile are all-zero.
// - Within a row, block b's m_b codes (code columns code_offset(b) .. code_offset(b) + m_b - 1,
//   layout.h) are cut into G_b = ceil(m_b / 3) groups of 3 consecutive code columns (t0, t1, t2),
//   the last group zero-padded past m_b; GP_b = G_b rounded up to even. Groups are numbered across
//   the row: block b's first group is group_offset(b) = b * GP_0 (all blocks but the last have the
//   same GP); total_groups = group_offset(nb - 1) + GP_{nb-1}. Padding groups are all-zero.
// - value v = 9 (t0 + 1) + 3 (t1 + 1) + (t2 + 1) in [0, 26]; idx = |v - 13| in [0, 13];
//   neg = (v < 13). (Negating a group maps v to 26 - v: idx is the magnitude pattern, neg its sign.)
//   Decoding: w = 13 + idx; t0 = w / 9 - 1, t1 = (w / 3) % 3 - 1, t2 = w % 3 - 1; negate if neg.
// - trits: uint8 [tiles, total_groups / 2, 32]; byte [t, p, r] = idx(row 32t + r, group 2p)
//   | idx(row 32t + r, group 2p + 1) << 4.
// - trit_signs: uint32 [tiles, total_groups]; bit r of word [t, g] = neg(row 32t + r, group g).
// - bits stored per weight: (8 * trits bytes + 32 * trit_signs words) / (out * in).
//
// The kernel (trit5_gemm) computes what addonly_gemm computes on the same codes, except that the
// activations are rounded to int8 tables: per token and block, the 14 entries of group g are
// e[idx] = (t0 x0 + t1 x1) + t2 x2 (float32, the decoded positive pattern of idx, x the group's
// three xt values, zero past m_b); m = max |e| over the block; q = rint((e * s) * (127 / (m * s)))
// with s = 2^100 when m < 2^-100, else 1 (so 127 / (m s) stays finite); step = m / 127. Then
//   y[t, r] = sum_b float(sum_g (neg ? -q : q)) * step_b * S[r, b] + MU[r, b] * xsum_b,
// the inner sum exact in integers. The error per (row, block) is at most G_b * step_b / 2 * |S|.
#pragma once
#include <cstdint>

#include "sdq/bitplane.h"
#include "sdq/layout.h"
#include "sdq/status.h"

namespace sdq {

constexpr int64_t kTrit5TileRows = 32;  // rows per tile: one byte each in a 256-bit vector
constexpr int64_t kTrit5GroupCodes = 3;  // trits per group (3^3 = 27 values)

inline int64_t trit5_tiles(int64_t out) noexcept {
  return (out + kTrit5TileRows - 1) / kTrit5TileRows;
}
// G_b: groups holding block b's codes.
inline int64_t trit5_groups(const BlockLayout& L, int64_t b) noexcept {
  return (L.m(b) + kTrit5GroupCodes - 1) / kTrit5GroupCodes;
}
// GP_b: G_b rounded up to even (two groups share a byte).
inline int64_t trit5_padded_groups(const BlockLayout& L, int64_t b) noexcept {
  return (trit5_groups(L, b) + 1) / 2 * 2;
}
inline int64_t trit5_group_offset(const BlockLayout& L, int64_t b) noexcept {
  return b * trit5_padded_groups(L, 0);
}
inline int64_t trit5_total_groups(const BlockLayout& L) noexcept {
  const int64_t nb = L.num_blocks();
  return nb == 0 ? 0 : trit5_group_offset(L, nb - 1) + trit5_padded_groups(L, nb - 1);
}
// Elements of trits (bytes) and of trit_signs (uint32 words) for `out` rows.
inline int64_t trit5_trits_bytes(const BlockLayout& L, int64_t out) noexcept {
  return trit5_tiles(out) * trit5_total_groups(L) / 2 * kTrit5TileRows;
}
inline int64_t trit5_sign_words(const BlockLayout& L, int64_t out) noexcept {
  return trit5_tiles(out) * trit5_total_groups(L);
}
inline double trit5_bits_per_weight(const BlockLayout& L, int64_t out) noexcept {
  return (8.0 * static_cast<double>(trit5_trits_bytes(L, out)) +
          32.0 * static_cast<double>(trit5_sign_words(L, out))) /
         (static_cast<double>(out) * static_cast<double>(L.in_features));
}

// Ternary bitplanes (bitplane.h: sign, nonzero [out, L.words_per_row()]) -> trit5 (trits
// [trit5_trits_bytes], trit_signs [trit5_sign_words]). bad_code when a sign bit is set without its
// nonzero bit or a padding column (past m_b) is not zero: such planes would not round-trip.
Status trit5_pack(const BlockLayout& L, const word_t* sign, const word_t* nonzero, int64_t out,
                  uint8_t* trits, uint32_t* trit_signs, int threads = 0) noexcept;

// trit5 -> bitplanes, padding columns 0 in both planes (the exact inverse of trit5_pack).
// bad_code unless the input is canonical: idx <= 13, no sign bit on an all-zero group, zero codes
// past m_b, in padding groups and in the rows past `out`.
Status trit5_unpack(const BlockLayout& L, const uint8_t* trits, const uint32_t* trit_signs,
                    int64_t out, word_t* sign, word_t* nonzero, int threads = 0) noexcept;

// The variants of trit5_gemm; `automatic` is the best this CPU supports. Naming one this CPU
// cannot run returns Status::not_built.
enum class Trit5Kernel : int {
  automatic = 0,
  portable = 1,  // one row at a time, plain C++
  avx2 = 2,      // vpshufb look-ups for 32 rows, sign by byte mask (needs avx2, fma, f16c)
  avx512 = 3,    // two groups x 32 rows per vpshufb, sign by kmask (avx512f/bw/vl)
  neon = 4,      // AArch64: tbl look-ups for 16 rows, sign by byte mask
};

// scale, mean: [out, L.num_blocks()] fp16 bit patterns. xt, xsum: activation_transform's output
// (gemv.h): xt [batch, L.total_code_cols()], block b at code_offset(b); only the first m_b values
// of each block are read. y: [batch, out] float32.
Status trit5_gemm(const BlockLayout& L, const uint8_t* trits, const uint32_t* trit_signs,
                  const uint16_t* scale, const uint16_t* mean, int64_t out, const float* xt,
                  const float* xsum, int64_t batch, float* y, int threads = 0,
                  Trit5Kernel kernel = Trit5Kernel::automatic) noexcept;

// "portable", "avx2", "avx512", "neon" (automatic: the one chosen for this CPU); "unknown" otherwise.
const char* trit5_kernel_name(Trit5Kernel kernel = Trit5Kernel::automatic) noexcept;

// Whether this CPU can run a variant (automatic and portable: always).
bool trit5_kernel_supported(Trit5Kernel kernel) noexcept;

}  // namespace sdq
