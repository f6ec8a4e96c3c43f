// Beam search over the sequential rounding of sdq's "gram" codes (python/sdq/methods/gram.py).
//
// gram_select_codes (gram_codes.h) rounds each sample in turn and keeps one chain per row: GPTQ's
// greedy nearest-plane rounding against the factor U of the damped G^-1. Its objective is the sum
// of the squared scaled errors e_j = (z_j - q_j) / U[j][j] along the chain, which equals the
// damped weighted error (q - z) G (q - z)^T. The beam keeps the `beam` chains of each row with the
// smallest such sums instead of one: at sample j every kept chain is extended by every level
// (binary -1, +1; ternary -1, 0, +1), and the `beam` cheapest extensions survive.
//
// For group g (rows g*n .. g*n+n-1) with upper-triangular U = hinv[g] ([m, m], row-major):
//   chains = {(cost 0, z)}
//   for j = 0 .. m-1:
//     inv = 1 / U[j][j]                                 (rounded to float32)
//     for each chain c (in rank order) and level v (in the order above):
//       e = (c.z[j] - v) * inv;  cost = c.cost + e * e  (a product, then a sum: never fused)
//     keep the `beam` candidates of smallest cost; ties keep the earlier candidate (stable)
//     each kept candidate: z[k] = z[k] - U[j][k] * e for k > j, q[j] = v
// Ranks: the survivors in order of cost, so rank 0 is the row's best chain. Every operation is
// float32 in a fixed order, so a float32 reference doing the same gets bit-identical codes.
// Ternary levels are chosen by cost alone: the beam has no dead-zone threshold.
#pragma once
#include <cstdint>

#include "sdq/levels.h"
#include "sdq/status.h"

namespace sdq {

constexpr int kMaxBeam = 64;

// z:     [groups * n, m] float32, contiguous (read only)
// hinv:  [groups, m, m] float32, contiguous; only the upper triangle is read; diagonal non-zero
// beam:  1 .. kMaxBeam chains kept per row
// codes: [beam, groups * n, m] float32 output (-1, 0, +1): codes[r] holds every row's rank-r
//        chain; a row with fewer than `beam` distinct chains (3^m < beam) repeats its best one
// cost:  [beam, groups * n] float32 output, each chain's summed e^2 (may be null)
// threads: worker threads; <= 0 means std::thread::hardware_concurrency()
Status gram_beam_codes(const float* z, int64_t groups, int64_t n, int64_t m, const float* hinv,
                       Levels levels, int beam, float* codes, float* cost,
                       int threads = 0) noexcept;

}  // namespace sdq
