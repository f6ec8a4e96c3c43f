// Sequential rounding against a Gram factor: the code selection of sdq's "gram" codes
// (python/sdq/methods/gram.py: GPTQ on G = D^T C D, method.md 4.2).
//
// Each row of z is an independent chain over its m samples. For group g (rows g*n .. g*n+n-1)
// with upper-triangular factor U = hinv[g] ([m, m], row-major; U^T U = G^-1):
//   for j = 0 .. m-1:
//     q[j] = Q(z[j])                          (Q as in modulator.h: binary sign, ternary tau[row])
//     e    = (z[j] - q[j]) * (1 / U[j][j])     (1 / U[j][j] rounded to float32 first)
//     z[k] = z[k] - U[j][k] * e  for k > j     (a product, then a difference: never fused)
// in float32 and in exactly this order, so a float32 reference doing the same operations gets
// bit-identical codes. The groups let one call round the same rows for several factors (the code
// search's Gram dampings).
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

}  // namespace sdq
