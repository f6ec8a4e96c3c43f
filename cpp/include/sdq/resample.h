// Band-limited (FFT) resampling as an explicit matrix (method.md step 2).
//
// resample_matrix(n_in, n_out) returns R [n_out, n_in] such that R x equals
// scipy.signal.resample(x, n_out) for every real x of length n_in: real FFT, spectrum truncated or
// zero-padded, the Nyquist bin of an even length split in half when up-sampling (doubled when
// down-sampling), inverse real FFT, amplitude scaled by n_out / n_in.
// U = resample_matrix(B, M) is the up-sampler and D = resample_matrix(M, B) the down-sampler:
// D U = I for M >= B, and both map a constant to the same constant.
// The matrix is computed in double precision from the closed-form DFT and rounded once to float.
#pragma once
#include <cstdint>

#include "sdq/status.h"

namespace sdq {

Status resample_matrix(int64_t n_in, int64_t n_out, float* out) noexcept;

}  // namespace sdq
