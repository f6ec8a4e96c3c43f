// Fast Walsh-Hadamard transform, batched, in place, orthonormal (scaled by 1/sqrt(n)).
//
// With H the n x n Sylvester-ordered Hadamard matrix (H[i][j] = (-1)^popcount(i & j)) and
// S = diag(signs):
//   forward: x <- H S x / sqrt(n)     (the activation rotation Hb^T x, and the weight rotation W Hb)
//   inverse: x <- S H x / sqrt(n)     (undoes forward)
// n must be a power of two (1 <= n <= 2^24); other lengths return Status::not_power_of_two.
#pragma once
#include <cstdint>

#include "sdq/status.h"

namespace sdq {

// x: [rows, n] float32, contiguous; signs: [n] of +-1.0f, or null for all +1.
Status fwht(float* x, int64_t rows, int64_t n, const float* signs, bool inverse,
            int threads = 0) noexcept;

inline bool is_power_of_two(int64_t n) noexcept { return n > 0 && (n & (n - 1)) == 0; }

}  // namespace sdq
