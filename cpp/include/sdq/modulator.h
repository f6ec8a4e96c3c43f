// Sigma-Delta modulator (method.md step 4).
//
// Each row of z is an independent chain of m already-normalised samples; the state starts at zero:
//   order 1: v  += z[n] - q[n-1];                    q[n] = Q(v)
//   order 2: v1 += z[n] - q[n-1]; v2 += v1 - q[n-1]; q[n] = Q(v2)
// binary  Q(v) = +1 if v > 0 else -1
// ternary Q(v) = +1 if v >= tau[row], -1 if v <= -tau[row], else 0
// The state is kept in float32 and updated in exactly this order, so the result is bit-identical to
// a float32 reference that performs the same operations.
#pragma once
#include <cstdint>

#include "sdq/levels.h"
#include "sdq/status.h"

namespace sdq {

// z:     [rows, m] float32, row stride z_stride (in elements, >= m)
// tau:   [rows] float32, ternary threshold per row (ignored and may be null for binary)
// codes: [rows, m] int8 output, contiguous
// threads: worker threads; <= 0 means std::thread::hardware_concurrency()
Status sigma_delta_modulate(const float* z, int64_t rows, int64_t m, int64_t z_stride,
                            const float* tau, int order, Levels levels, int8_t* codes,
                            int threads = 0) noexcept;

}  // namespace sdq
