// The two sequential loops of sdq's "gram" codes (python/sdq/methods/gram.py and refine.py):
// choosing codes against a Gram factor (GPTQ on G = D^T C D, method.md 4.2) and one pass of
// coordinate descent over them. Both are independent chains per row, in float32, in a fixed order
// of operations (products, then sums: never fused), so a float32 reference doing the same
// operations gets bit-identical codes.
//
// gram_select_codes: each row of z is an independent chain over its m samples. For group g
// (rows g*n .. g*n+n-1) with upper-triangular factor U = hinv[g] ([m, m], row-major;
// U^T U = G^-1):
//   for j = 0 .. m-1:
//     q[j] = Q(z[j])                          (Q as in modulator.h: binary sign, ternary tau[row])
//     e    = (z[j] - q[j]) * (1 / U[j][j])     (1 / U[j][j] rounded to float32 first)
//     z[k] = z[k] - U[j][k] * e  for k > j     (a product, then a difference: never fused)
// The groups let one call round the same rows for several factors (the code search's Gram
// dampings).
//
// gram_refine_pass: each active row, with residual h (code units; consumed) and symmetric G:
//   for j = 0 .. m-1 with G[j][j] > 0:
//     ternary: t = q[j] + h[j] * a, a = -1 / G[j][j] rounded to float32; d = clamp(round-half-
//              even(t), -1, 1) - q[j]
//     binary:  d = -2 q[j] if q[j] * h[j] > G[j][j], else 0
//     q[j] += d;  h[k] = h[k] + G[j][k] * d  for k > j
#pragma once
#include <cstdint>

#include "sdq/levels.h"
#include "sdq/status.h"

namespace sdq {

// z:     [groups * n, m] float32, contiguous (read only)
// hinv:  [groups, m, m] float32, contiguous; only the upper triangle is read; diagonal non-zero
// tau:   [groups * n] float32 thresholds (ternary; ignored and may be null for binary)
// codes: [groups * n, m] float32 output (-1, 0, +1), contiguous
// threads: worker threads; <= 0 means std::thread::hardware_concurrency()
Status gram_select_codes(const float* z, int64_t groups, int64_t n, int64_t m, const float* hinv,
                         const float* tau, Levels levels, float* codes, int threads = 0) noexcept;

// q:      [n, m] float32 codes, updated in place
// h:      [n, m] float32 residual, contiguous, used as scratch (its content is lost)
// G:      [m, m] float32, contiguous; only the diagonal and upper triangle are read
// active: [n] bytes, 0 = leave that row as it is (may be null: all rows active)
Status gram_refine_pass(float* q, float* h, int64_t n, int64_t m, const float* G,
                        const uint8_t* active, Levels levels, int threads = 0) noexcept;

}  // namespace sdq
