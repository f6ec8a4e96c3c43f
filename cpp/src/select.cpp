// Selection of quantiles (select.h): quickselect with a branch-free three-way partition
// (AVX-512 compressing stores where the CPU has them), following every target at once.
#include "select.h"

#include <algorithm>
#include <cmath>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace sdq::detail {
namespace {

// Three-way partition of a[0, n) around pivot into tmp: [0, lt) < pivot, [gt, n) > pivot, the
// rest equal to it (not stored: their value is the pivot). Branch-free: the comparisons are
// unpredictable, so branches on them would cost more than the extra stores.
void partition_portable(const double* a, int64_t n, double pivot, double* tmp, int64_t& lt,
                        int64_t& gt) noexcept {
  lt = 0;
  gt = n;
  for (int64_t i = 0; i < n; ++i) {
    const double v = a[i];
    tmp[lt] = v;
    lt += v < pivot;
    tmp[gt - 1] = v;
    gt -= v > pivot;
  }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The same with AVX-512's compressing stores, 8 values per step (the order within each side
// differs from the portable one; a selection only reads values).
__attribute__((target("avx512f"))) void partition_avx512(const double* a, int64_t n,
                                                         double pivot, double* tmp, int64_t& lt,
                                                         int64_t& gt) noexcept {
  const __m512d pv = _mm512_set1_pd(pivot);
  int64_t l = 0, g = n, i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m512d v = _mm512_loadu_pd(a + i);
    const __mmask8 below = _mm512_cmp_pd_mask(v, pv, _CMP_LT_OQ);
    const __mmask8 over = _mm512_cmp_pd_mask(v, pv, _CMP_GT_OQ);
    _mm512_mask_compressstoreu_pd(tmp + l, below, v);
    l += __builtin_popcount(below);
    g -= __builtin_popcount(over);
    _mm512_mask_compressstoreu_pd(tmp + g, over, v);
  }
  for (; i < n; ++i) {
    const double v = a[i];
    tmp[l] = v;
    l += v < pivot;
    tmp[g - 1] = v;
    g -= v > pivot;
  }
  lt = l;
  gt = g;
}
#endif

using PartitionFn = void (*)(const double*, int64_t, double, double*, int64_t&, int64_t&);

PartitionFn pick_partition() noexcept {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (__builtin_cpu_supports("avx512f")) return partition_avx512;
#endif
  return partition_portable;
}

// Fills lo and hi of targets q[0, nq) (sorted by k, all < n) from a[0, n); a and tmp (n long
// each) are overwritten. `above`: the smallest value above all of a (+inf if none), the (k+1)-th
// of the last element. Quickselect (median-of-three pivot) following every target at once, so
// that two quantiles cost little more than one.
void select_pairs(PartitionFn partition, double* a, double* tmp, int64_t n, Quantile* q,
                  int64_t nq, double above, int depth = 0) {
  while (nq > 0) {
    if (n <= 8 || depth > 64) {  // small, or a pathological pivot sequence: sort
      std::sort(a, a + n);
      for (int64_t i = 0; i < nq; ++i) {
        q[i].lo = a[q[i].k];
        q[i].hi = q[i].k + 1 < n ? a[q[i].k + 1] : above;
      }
      return;
    }
    double p0 = a[0], p1 = a[n / 2], p2 = a[n - 1];
    if (p0 > p1) std::swap(p0, p1);
    if (p1 > p2) p1 = std::max(p0, p2);
    const double pivot = p1;
    int64_t lt, gt;
    partition(a, n, pivot, tmp, lt, gt);
    int64_t nlow = 0, nmid = 0;
    while (nlow < nq && q[nlow].k < lt) ++nlow;
    while (nlow + nmid < nq && q[nlow + nmid].k < gt) ++nmid;
    for (int64_t i = nlow; i < nlow + nmid; ++i) {
      q[i].lo = q[i].hi = pivot;
      if (q[i].k + 1 >= gt) {  // the next value up is the smallest above the pivot
        q[i].hi = above;
        for (int64_t j = gt; j < n; ++j) q[i].hi = std::min(q[i].hi, tmp[j]);
      }
    }
    // Targets above the pivot: their own range, tmp[gt, n) with a[gt, n) as scratch.
    const int64_t first_up = nlow + nmid;
    if (first_up < nq) {
      for (int64_t i = first_up; i < nq; ++i) q[i].k -= gt;
      select_pairs(partition, tmp + gt, a + gt, n - gt, q + first_up, nq - first_up, above,
                   depth + 1);
      for (int64_t i = first_up; i < nq; ++i) q[i].k += gt;
    }
    // Targets below: continue on tmp[0, lt); the smallest value above them is the pivot.
    nq = nlow;
    n = lt;
    above = pivot;
    std::swap(a, tmp);
    ++depth;
  }
}

}  // namespace

void select_quantiles(double* x, double* scratch, int64_t n, Quantile* q, int64_t nq) {
  static const PartitionFn partition = pick_partition();
  select_pairs(partition, x, scratch, n, q, nq, INFINITY);
}

// numpy's "linear" quantile at p over n values: the target and its interpolation weight.
Quantile quantile_target(int64_t n, double p) noexcept {
  const double pos = p * static_cast<double>(n - 1);
  const int64_t lo = static_cast<int64_t>(std::floor(pos));
  return {lo, 0.0, 0.0, pos - static_cast<double>(lo)};
}

double quantile_value(const Quantile& q, int64_t n) noexcept {
  const double hi = q.k + 1 < n ? q.hi : q.lo;  // numpy: hi = min(lo + 1, n - 1)
  return q.lo + (hi - q.lo) * q.frac;
}

}  // namespace sdq::detail
