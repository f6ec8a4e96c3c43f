// The WGM partition (wgm.h) without Python: hand-checked partitions, the exact DP against brute
// force, greedy never below the DP, threads not changing results, and the error statuses.
// Exit code 0: all checks pass.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <vector>

#include "sdq/wgm.h"
#include "expect.h"

namespace {

using sdq::Status;
using sdq::WgmIssue;
using sdq::WgmMethod;

using sdq_test::expect;

std::vector<int64_t> partition(const std::vector<float>& v, int64_t groups, WgmMethod method,
                               int64_t window = 512, double lam = 0.75, int threads = 1) {
  std::vector<int64_t> b(static_cast<size_t>(groups) + 1, -7);
  const Status st = sdq::wgm_partition(v.data(), 1, static_cast<int64_t>(v.size()), groups,
                                       method, window, lam, b.data(), threads);
  if (st != Status::ok) b.assign(1, -1);
  return b;
}

double cost(const std::vector<float>& v, const std::vector<int64_t>& b, double lam = 0.75) {
  double c = std::numeric_limits<double>::quiet_NaN();
  sdq::wgm_cost(v.data(), 1, static_cast<int64_t>(v.size()), b.data(),
                static_cast<int64_t>(b.size()) - 1, lam, &c, 1);
  return c;
}

// The least cost over every way of cutting n values into `groups` non-empty groups.
double brute_force(const std::vector<float>& v, int64_t groups) {
  const int64_t n = static_cast<int64_t>(v.size());
  double best = std::numeric_limits<double>::infinity();
  for (uint32_t mask = 0; mask < (1u << (n - 1)); ++mask) {  // bit i: a cut after value i
    if (__builtin_popcount(mask) != groups - 1) continue;
    std::vector<int64_t> b{0};
    for (int64_t i = 0; i + 1 < n; ++i)
      if (mask >> i & 1u) b.push_back(i + 1);
    b.push_back(n);
    best = std::min(best, cost(v, b));
  }
  return best;
}

void two_clusters_split_where_they_meet() {
  const std::vector<float> v{1, 1, 1, 5, 5, 5, 5};
  const std::vector<int64_t> want{0, 3, 7};
  expect(partition(v, 2, WgmMethod::greedy) == want, "greedy splits two clusters between them");
  expect(partition(v, 2, WgmMethod::dp) == want, "dp splits two clusters between them");
  expect(partition(v, 2, WgmMethod::windowed, 1) == want, "windowed (window 1) equals greedy");
  expect(std::fabs(cost(v, want) - (0.75 / 3 + 0.75 / 4)) < 1e-12,
         "cost of two constant groups is lambda / |g| summed");
}

void short_rows_get_singletons() {
  const std::vector<float> v{0.5f, 1.0f, 2.0f};
  const std::vector<int64_t> want{0, 1, 2, 3, 3, 3};
  for (WgmMethod m : {WgmMethod::greedy, WgmMethod::windowed, WgmMethod::dp})
    expect(partition(v, 5, m) == want, "n < G: singletons, then boundaries repeat n");
}

void dp_is_exact_and_greedy_never_below() {
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> u(0.0f, 2.0f);
  bool exact = true, above = true;
  for (int trial = 0; trial < 40; ++trial) {
    const int64_t n = 2 + trial % 9, groups = 1 + trial % std::min<int64_t>(n, 4);
    std::vector<float> v(static_cast<size_t>(n));
    for (float& x : v) x = u(gen);
    std::sort(v.begin(), v.end());
    const double dp = cost(v, partition(v, groups, WgmMethod::dp));
    exact = exact && std::fabs(dp - brute_force(v, groups)) <= 1e-12 * std::max(1.0, dp);
    above = above && cost(v, partition(v, groups, WgmMethod::greedy)) >= dp - 1e-12;
  }
  expect(exact, "dp equals brute force on 40 random rows (n <= 10)");
  expect(above, "greedy cost >= dp cost");
}

void threads_do_not_change_results() {
  const int64_t rows = 37, n = 300, groups = 6;
  std::mt19937 gen(3);
  std::exponential_distribution<float> e(1.0f);
  std::vector<float> v(static_cast<size_t>(rows * n));
  for (float& x : v) x = e(gen);
  for (int64_t r = 0; r < rows; ++r) std::sort(v.begin() + r * n, v.begin() + (r + 1) * n);
  std::vector<int64_t> one(static_cast<size_t>(rows * (groups + 1)));
  std::vector<int64_t> many(one.size());
  sdq::wgm_partition(v.data(), rows, n, groups, WgmMethod::windowed, 16, 0.75, one.data(), 1);
  sdq::wgm_partition(v.data(), rows, n, groups, WgmMethod::windowed, 16, 0.75, many.data(), 5);
  expect(one == many, "1 and 5 threads give identical boundaries");
}

void errors_are_statuses() {
  std::vector<float> v{0.0f, 1.0f, 2.0f, 3.0f};
  int64_t b[3];
  auto run = [&](int64_t n, int64_t groups, WgmMethod m, int64_t window, double lam,
                 WgmIssue* issue = nullptr) {
    return sdq::wgm_partition(v.data(), 1, n, groups, m, window, lam, b, 1, issue);
  };
  expect(run(4, 0, WgmMethod::greedy, 1, 0.75) == Status::bad_size, "groups < 1: bad_size");
  expect(run(4, 2, WgmMethod::windowed, 0, 0.75) == Status::bad_size, "window < 1: bad_size");
  expect(run(0, 2, WgmMethod::greedy, 1, 0.75) == Status::bad_size, "n = 0: bad_size");
  expect(run(4, 2, WgmMethod::greedy, 1, -1.0) == Status::bad_code, "lam < 0: bad_code");
  expect(run(4, 2, WgmMethod::greedy, 1, std::nan("")) == Status::bad_code, "lam NaN: bad_code");
  expect(run(4, 2, static_cast<WgmMethod>(9), 1, 0.75) == Status::bad_code,
         "unknown method: bad_code");
  expect(sdq::wgm_partition(nullptr, 1, 4, 2, WgmMethod::greedy, 1, 0.75, b, 1) ==
             Status::null_pointer,
         "null values: null_pointer");
  std::vector<float> big(static_cast<size_t>(sdq::kWgmDpMaxN + 1), 1.0f);
  expect(sdq::wgm_partition(big.data(), 1, sdq::kWgmDpMaxN + 1, 2, WgmMethod::dp, 1, 0.75, b,
                            1) == Status::bad_size,
         "dp refuses n > kWgmDpMaxN");
  WgmIssue issue;
  v[2] = 0.5f;
  expect(run(4, 2, WgmMethod::greedy, 1, 0.75, &issue) == Status::bad_code &&
             issue.kind == WgmIssue::unsorted && issue.row == 0 && issue.col == 2,
         "unsorted row: bad_code at (0, 2)");
  v[2] = -0.0f;
  v[0] = -1.0f;
  expect(run(4, 2, WgmMethod::greedy, 1, 0.75, &issue) == Status::bad_code &&
             issue.kind == WgmIssue::negative && issue.col == 0,
         "negative value: bad_code at column 0");
  v[0] = std::numeric_limits<float>::infinity();
  expect(run(4, 2, WgmMethod::greedy, 1, 0.75, &issue) == Status::bad_code &&
             issue.kind == WgmIssue::not_finite,
         "infinite value: bad_code");
}

void cost_checks_boundaries() {
  const std::vector<float> v{0.0f, 1.0f, 2.0f, 3.0f};
  double c = 0.0;
  WgmIssue issue;
  const int64_t gap[3] = {0, 2, 2};  // an empty group before the end
  expect(sdq::wgm_cost(v.data(), 1, 4, gap, 2, 0.75, &c, 1, &issue) == Status::bad_size &&
             issue.kind == WgmIssue::bad_boundary && issue.col == 2,
         "cost: an empty group before n is bad_size at that boundary");
  const int64_t pad[4] = {0, 4, 4, 4};  // empty groups at the end add nothing
  expect(sdq::wgm_cost(v.data(), 1, 4, pad, 3, 0.0, &c, 1) == Status::ok &&
             std::fabs(c - 5.0) < 1e-12,
         "cost: one group of 0..3 has sse 5; trailing empty groups add nothing");
}

}  // namespace

int main() {
  two_clusters_split_where_they_meet();
  short_rows_get_singletons();
  dp_is_exact_and_greedy_never_below();
  threads_do_not_change_results();
  errors_are_statuses();
  cost_checks_boundaries();
  return sdq_test::finish();
}
