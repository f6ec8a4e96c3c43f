// Internal: numpy's default ("linear") quantiles of small arrays by selection, not sorting
// (encode.cpp). With v = sorted(x), pos = p * (n - 1), lo = floor(pos), hi = min(lo + 1, n - 1):
// quantile = v[lo] + (v[hi] - v[lo]) * (pos - lo); so each quantile needs the lo-th and the
// (lo + 1)-th smallest values.
#pragma once
#include <cstdint>

namespace sdq::detail {

struct Quantile {
  int64_t k;             // target: the k-th smallest (0-based)
  double lo, hi, frac;   // the k-th and (k+1)-th smallest; value = lo + (hi - lo) * frac
};

// The target of quantile p over n values (k = lo, frac = pos - lo; lo and hi not yet known).
Quantile quantile_target(int64_t n, double p) noexcept;

// Fills lo and hi of targets q[0, nq) (sorted by k, all < n) from x[0, n). x and scratch
// (n doubles) are overwritten.
void select_quantiles(double* x, double* scratch, int64_t n, Quantile* q, int64_t nq);

// The quantile's value from its filled target.
double quantile_value(const Quantile& q, int64_t n) noexcept;

}  // namespace sdq::detail
