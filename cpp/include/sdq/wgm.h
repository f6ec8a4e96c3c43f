// Dynamic-grouping partition of sorted magnitudes (method.md section 2, arXiv 2509.03054, "WGM").
//
// Each row holds n values sorted ascending (the |w| of one weight matrix, or of one 64-weight
// block). A partition cuts the row into G contiguous groups; every value is then represented by its
// group's mean. The objective of a partition is
//   cost = sum over groups g of [ sse(g) + lambda / |g| ],   sse(g) = |g| * Var(g)
// with sse(g) = S2 - S1 * S1 / |g| from float64 prefix sums S1 (of v) and S2 (of v * v), clamped
// at zero against rounding. Methods:
//   greedy:   start from n singletons; while more than G groups remain, merge the adjacent pair
//             whose merge raises the cost least (delta = cost(a ∪ b) - cost(a) - cost(b)).
//             An indexed min-heap over the adjacent pairs: O(n log n) (a linear scan instead
//             when there are at most 128 initial groups, e.g. 64-value blocks).
//   windowed: the same merging, started from windows of `window` consecutive values (the last one
//             may be shorter). When the row has fewer than G windows (ceil(n / window) < G) the
//             windows are too coarse to reach G groups, and the row starts from singletons instead:
//             windowed then equals greedy.
//   dp:       the exact minimum over all partitions into G groups, O(G n^2) with O(1) group costs;
//             an oracle for small rows only (n <= kWgmDpMaxN).
// Ties are broken towards the lowest index: the merge of the leftmost pair among equal deltas; in
// dp, the lowest split point among equal totals. Costs are computed by exactly these float64
// operations in this order, so sdq.ref.wgm (NumPy) reproduces the boundaries exactly.
//
// Output: per row G + 1 boundaries b_0 = 0 < b_1 < ... < b_G = n; group g is [b_g, b_{g+1}).
// A row with n <= G gets n singleton groups and the remaining boundaries repeat n (empty groups,
// only at the end).
#pragma once
#include <cstdint>

#include "sdq/status.h"

namespace sdq {

enum class WgmMethod : int { greedy = 0, windowed = 1, dp = 2 };

constexpr int64_t kWgmDefaultGroups = 32;
constexpr int64_t kWgmDefaultWindow = 512;
constexpr double kWgmDefaultLambda = 0.75;
constexpr int64_t kWgmDpMaxN = 4096;  // dp is O(G n^2): beyond this it is no longer an oracle

// What is wrong with the first offending row (the lowest row index), for a precise message.
struct WgmIssue {
  enum Kind : int {
    none = 0,
    not_finite = 1,    // values[row, col] is NaN or infinite
    negative = 2,      // values[row, col] < 0
    unsorted = 3,      // values[row, col] < values[row, col - 1]
    bad_boundary = 4,  // boundaries[row, col] breaks 0 = b_0 < ... < b_k = n = ... = b_G
  };
  Kind kind = none;
  int64_t row = -1;
  int64_t col = -1;
};

// values:     [rows, n] float32, contiguous; each row finite, non-negative, sorted ascending.
// groups:     G >= 1.  window: >= 1 (used by windowed only, checked always).
// lam:        finite, >= 0.
// boundaries: [rows, groups + 1] int64 output, contiguous.
// threads:    rows are split across threads; <= 0 means std::thread::hardware_concurrency().
// issue:      optional; on a bad value, says which (row, col) and why.
// Returns bad_size (rows < 0, n < 1, groups < 1, window < 1, dp with n > kWgmDpMaxN),
// bad_code (unknown method, lam negative or not finite, a value that is not finite, negative or
// out of order), null_pointer, out_of_memory, internal_error. On error the output is unspecified.
Status wgm_partition(const float* values, int64_t rows, int64_t n, int64_t groups,
                     WgmMethod method, int64_t window, double lam, int64_t* boundaries,
                     int threads = 0, WgmIssue* issue = nullptr) noexcept;

// The objective of given partitions: cost[row] for boundaries [rows, groups + 1] laid out as
// wgm_partition writes them (empty groups only at the end; they add nothing).
// Returns bad_code for bad values or lam (issue says where) and bad_size for bad boundaries
// (issue->kind = bad_boundary, row and col of the first offending boundary).
Status wgm_cost(const float* values, int64_t rows, int64_t n, const int64_t* boundaries,
                int64_t groups, double lam, double* cost, int threads = 0,
                WgmIssue* issue = nullptr) noexcept;

}  // namespace sdq
