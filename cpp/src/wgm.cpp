// Dynamic-grouping partition (wgm.h): greedy merging (indexed heap, or a scan for few groups),
// windowed greedy, exact DP.
//
// Rows are independent, so threads take contiguous runs of rows; each thread keeps its scratch
// (prefix sums, linked groups, heap, DP tables) across its rows. One pass over a row checks its
// values and accumulates the prefix sums. Every group cost is O(1) from float64 prefix sums,
// evaluated by one function (Prefix::cost) in a fixed operation order, so the NumPy reference
// (python/sdq/ref/wgm.py) computes bit-identical costs and identical boundaries.
// This file is compiled with -ffp-contract=off (CMakeLists.txt): a fused multiply-add would round
// differently from the reference.
#include "sdq/wgm.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <vector>

#include "guard.h"
#include "parallel.h"

namespace sdq {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Up to this many initial groups a linear scan finds the cheapest merge faster than a heap (the
// 64-value blocks of the block mode); beyond it, the heap's O(log w) wins. Same result either way.
constexpr int64_t kScanMax = 128;

// Running float64 sums of v and v * v over the whole row, kept at the starts of the initial
// groups (0, step, 2 step, ...) and at n. Each kept sum is the full prefix sum at that position
// (v * v of a float32 is exact in float64, and the additions run in order), which is what the
// reference's cumsum computes. Group k of the initial groups is [pos(k), pos(k + 1)).
class Prefix {
 public:
  // Also checks the row: returns the first value that is not finite, negative, or below the one
  // before it (in that order of precedence), with its column in *col.
  WgmIssue::Kind build(const float* v, int64_t n, int64_t step, int64_t* col) {
    n_ = n;
    step_ = std::min(step, n);
    count_ = n / step_ + (n % step_ != 0);
    s1_.resize(static_cast<size_t>(count_) + 1);
    s2_.resize(static_cast<size_t>(count_) + 1);
    double a = 0.0, b = 0.0;
    float last = 0.0f;
    for (int64_t k = 0; k < count_; ++k) {
      s1_[k] = a;
      s2_[k] = b;
      for (int64_t i = k * step_, e = std::min(i + step_, n); i < e; ++i) {
        const float x = v[i];
        if (!(x >= last && x <= std::numeric_limits<float>::max())) return problem(x, i, col);
        last = x;
        const double d = x;
        a += d;
        b += d * d;
      }
    }
    s1_[count_] = a;
    s2_[count_] = b;
    return WgmIssue::none;
  }

  int64_t count() const { return count_; }
  int64_t pos(int64_t k) const { return std::min(k * step_, n_); }

  // sse + lam / m of initial groups [i, j) (i < j), m values. The clamp keeps rounding from making
  // a constant group's sse negative. The reference performs these same operations in this order.
  double cost(int64_t i, int64_t j, double lam) const {
    const double m = static_cast<double>(pos(j) - pos(i));
    const double t1 = s1_[j] - s1_[i];
    const double t2 = s2_[j] - s2_[i];
    double sse = t2 - t1 * t1 / m;
    if (sse < 0.0) sse = 0.0;
    return sse + lam / m;
  }

 private:
  static WgmIssue::Kind problem(float x, int64_t i, int64_t* col) {
    *col = i;
    if (!std::isfinite(x)) return WgmIssue::not_finite;
    return x < 0.0f ? WgmIssue::negative : WgmIssue::unsorted;
  }

  int64_t n_ = 0, step_ = 1, count_ = 0;
  std::vector<double> s1_, s2_;
};

// The ordinals 0..w-1 in a 4-ary min-heap ordered by (key, ordinal): the lowest index wins ties.
// Keys change in place (update); nothing is removed: a pair that no longer exists gets key +inf
// and sinks. Keys live in the heap entries and a node's four children are adjacent in memory,
// because on a whole matrix (greedy from singletons) the heap is far larger than the caches.
class MinHeap {
 public:
  void build(const std::vector<double>& key) {
    const int64_t w = static_cast<int64_t>(key.size());
    heap_.resize(key.size());
    slot_.resize(key.size());
    for (int64_t i = 0; i < w; ++i) place(i, {key[i], i});
    for (int64_t s = (w - 2) / 4; s >= 0; --s) down(s);
  }
  int64_t top() const { return heap_[0].id; }
  void update(int64_t id, double key) {
    const int64_t s = slot_[id];
    const bool rises = Entry{key, id}.before(heap_[s]);
    heap_[s].key = key;
    rises ? up(s) : down(s);
  }

 private:
  struct Entry {
    double key;
    int64_t id;
    bool before(const Entry& o) const { return key < o.key || (key == o.key && id < o.id); }
  };
  void place(int64_t s, const Entry& e) {
    heap_[s] = e;
    slot_[e.id] = s;
  }
  void up(int64_t s) {
    const Entry e = heap_[s];
    for (; s > 0 && e.before(heap_[(s - 1) / 4]); s = (s - 1) / 4) place(s, heap_[(s - 1) / 4]);
    place(s, e);
  }
  void down(int64_t s) {
    const Entry e = heap_[s];
    const int64_t n = static_cast<int64_t>(heap_.size());
    for (int64_t first; (first = 4 * s + 1) < n; ) {
      // the least of the (up to) four children first .. first + 3; the bound is fixed before the
      // scan moves c, or it would reach into the next node's children
      const int64_t last = std::min(first + 4, n);
      int64_t c = first;
      for (int64_t k = first + 1; k < last; ++k)
        if (heap_[k].before(heap_[c])) c = k;
      if (!heap_[c].before(e)) break;
      place(s, heap_[c]);
      s = c;
    }
    place(s, e);
  }

  std::vector<Entry> heap_;
  std::vector<int64_t> slot_;  // ordinal -> its slot in heap_
};

// Greedy merging of a row's initial groups down to `groups` groups. Live groups form a linked list
// of initial-group ordinals (next_, prev_; next_ == w means the row's end). The key of group i is
// the cost change of merging it with the next one, +inf for the last group and for groups merged
// away; gcost_[i] is group i's own cost, so a key needs one new group cost. Each step merges the
// pair with the least (key, index): for few groups a scan over key_, else the heap's top (the
// heap then holds the keys; key_ only seeds it).
class Merger {
 public:
  void run(const Prefix& p, int64_t groups, double lam, int64_t* out) {
    init(p, lam);
    heap_mode_ = w_ > kScanMax;
    if (heap_mode_) heap_.build(key_);
    for (int64_t count = w_; count > groups; --count)
      merge(p, lam, heap_mode_ ? heap_.top() : scan());
    write(p, groups, out);
  }

 private:
  void init(const Prefix& p, double lam) {
    w_ = p.count();
    next_.resize(static_cast<size_t>(w_));
    prev_.resize(static_cast<size_t>(w_));
    gcost_.resize(static_cast<size_t>(w_));
    key_.resize(static_cast<size_t>(w_));
    for (int64_t i = 0; i < w_; ++i) {
      next_[i] = i + 1;
      prev_[i] = i - 1;
      gcost_[i] = p.cost(i, i + 1, lam);
    }
    for (int64_t i = 0; i < w_; ++i) key_[i] = i + 1 < w_ ? delta(p, i, lam) : kInf;
  }

  // The change of the objective when group i and the next one become one group.
  double delta(const Prefix& p, int64_t i, double lam) const {
    const int64_t j = next_[i];
    return p.cost(i, next_[j], lam) - gcost_[i] - gcost_[j];
  }

  int64_t scan() const {  // the first least key: strict < keeps the lowest index on ties
    int64_t best = 0;
    for (int64_t i = 1; i < w_; ++i)
      if (key_[i] < key_[best]) best = i;
    return best;
  }

  void set_key(int64_t i, double key) {
    if (heap_mode_) {
      heap_.update(i, key);
    } else {
      key_[i] = key;
    }
  }

  // Group i absorbs the next group j; the keys of i, j and i's predecessor change.
  void merge(const Prefix& p, double lam, int64_t i) {
    const int64_t j = next_[i], e = next_[j];
    gcost_[i] = p.cost(i, e, lam);
    next_[i] = e;
    if (e < w_) prev_[e] = i;
    set_key(j, kInf);
    set_key(i, e < w_ ? delta(p, i, lam) : kInf);
    if (prev_[i] >= 0) set_key(prev_[i], delta(p, prev_[i], lam));
  }

  void write(const Prefix& p, int64_t groups, int64_t* out) const {
    const int64_t n = p.pos(w_);
    out[0] = 0;
    int64_t k = 1;
    for (int64_t i = 0; i < w_; i = next_[i]) out[k++] = p.pos(next_[i]);
    for (; k <= groups; ++k) out[k] = n;
  }

  int64_t w_ = 0;
  bool heap_mode_ = false;
  std::vector<int64_t> next_, prev_;
  std::vector<double> gcost_, key_;
  MinHeap heap_;
};

// Exact minimum over partitions of [0, n) into `groups` groups (groups < n). In round g, cur_[j]
// is the least cost of the first j values in g groups (prev_: in g - 1 groups) and split_ keeps
// where its last group starts; only the j that leave a value for each remaining group are
// computed. Among equal totals the lowest split point wins (strict <).
class Dp {
 public:
  void run(const Prefix& p, int64_t n, int64_t groups, double lam, int64_t* out) {
    const size_t w = static_cast<size_t>(n) + 1;
    prev_.assign(w, kInf);
    split_.assign(static_cast<size_t>(groups + 1) * w, -1);
    for (int64_t j = 1; j <= n - (groups - 1); ++j) prev_[j] = p.cost(0, j, lam);
    for (int64_t g = 2; g <= groups; ++g) {
      cur_.assign(w, kInf);
      for (int64_t j = g; j <= n - (groups - g); ++j) {
        double best = kInf;
        int64_t arg = -1;
        for (int64_t i = g - 1; i < j; ++i) {
          const double v = prev_[i] + p.cost(i, j, lam);
          if (v < best) {
            best = v;
            arg = i;
          }
        }
        cur_[j] = best;
        split_[static_cast<size_t>(g) * w + j] = static_cast<int32_t>(arg);
      }
      prev_.swap(cur_);
    }
    out[groups] = n;
    for (int64_t g = groups, j = n; g >= 2; --g) out[g - 1] = j = split_[g * w + j];
    out[0] = 0;
  }

 private:
  std::vector<double> prev_, cur_;
  std::vector<int32_t> split_;  // n <= kWgmDpMaxN: a split point fits
};

// The first boundary of a row that breaks 0 = b_0 < ... < b_k = n = ... = b_G.
WgmIssue check_boundaries(const int64_t* b, int64_t groups, int64_t n, int64_t row) {
  if (b[0] != 0) return {WgmIssue::bad_boundary, row, 0};
  for (int64_t g = 1; g <= groups; ++g) {
    const bool ok = b[g - 1] < n ? (b[g] > b[g - 1] && b[g] <= n) : b[g] == n;
    if (!ok) return {WgmIssue::bad_boundary, row, g};
  }
  if (b[groups] != n) return {WgmIssue::bad_boundary, row, groups};
  return {};
}

// The issue of the lowest row reported by any thread.
class FirstIssue {
 public:
  void offer(const WgmIssue& issue) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (first_.kind == WgmIssue::none || issue.row < first_.row) first_ = issue;
  }
  const WgmIssue& get() const { return first_; }  // after the threads are joined

 private:
  std::mutex mutex_;
  WgmIssue first_;
};

void write_singletons(int64_t n, int64_t groups, int64_t* out) {
  for (int64_t k = 0; k <= groups; ++k) out[k] = std::min(k, n);
}

// The length of the initial groups: windows when there are at least `groups` of them (else the
// windows cannot reach `groups` groups), singletons otherwise and for greedy and dp.
int64_t initial_step(int64_t n, int64_t groups, WgmMethod method, int64_t window) {
  const int64_t windows = n / window + (n % window != 0);
  return method == WgmMethod::windowed && windows >= groups ? window : 1;
}

// One row: checks it (a problem goes to `issues`), then partitions it into `out`.
class RowPartitioner {
 public:
  void run(const float* v, int64_t row, int64_t n, int64_t groups, WgmMethod method,
           int64_t window, double lam, int64_t* out, FirstIssue& issues) {
    int64_t col = -1;
    const WgmIssue::Kind bad = prefix_.build(v, n, initial_step(n, groups, method, window), &col);
    if (bad != WgmIssue::none) return issues.offer({bad, row, col});
    if (n <= groups) return write_singletons(n, groups, out);
    if (method == WgmMethod::dp) return dp_.run(prefix_, n, groups, lam, out);
    merger_.run(prefix_, groups, lam, out);
  }

 private:
  Prefix prefix_;
  Merger merger_;
  Dp dp_;
};

bool known_method(WgmMethod m) {
  return m == WgmMethod::greedy || m == WgmMethod::windowed || m == WgmMethod::dp;
}

bool good_lambda(double lam) { return std::isfinite(lam) && lam >= 0.0; }

// Size checks shared by both entry points; also keeps rows * (groups + 1) within int64.
bool good_sizes(int64_t rows, int64_t n, int64_t groups) {
  if (rows < 0 || n < 1 || groups < 1) return false;
  return groups < std::numeric_limits<int64_t>::max() / std::max<int64_t>(rows, 1) - 1;
}

Status report(const FirstIssue& first, WgmIssue* issue) {
  const WgmIssue& f = first.get();
  if (f.kind == WgmIssue::none) return Status::ok;
  if (issue) *issue = f;
  return f.kind == WgmIssue::bad_boundary ? Status::bad_size : Status::bad_code;
}

Status partition_checked(const float* values, int64_t rows, int64_t n, int64_t groups,
                         WgmMethod method, int64_t window, double lam, int64_t* boundaries,
                         int threads, WgmIssue* issue) {
  if (!good_sizes(rows, n, groups) || window < 1) return Status::bad_size;
  if (method == WgmMethod::dp && n > kWgmDpMaxN) return Status::bad_size;
  if (!known_method(method) || !good_lambda(lam)) return Status::bad_code;
  if (rows == 0) return Status::ok;
  if (!values || !boundaries) return Status::null_pointer;
  FirstIssue first;
  detail::parallel_for(rows, threads, 1, [&](int64_t begin, int64_t end) {
    RowPartitioner rp;  // its buffers serve every row of this thread
    for (int64_t r = begin; r < end; ++r)
      rp.run(values + r * n, r, n, groups, method, window, lam, boundaries + r * (groups + 1),
             first);
  });
  return report(first, issue);
}

Status cost_checked(const float* values, int64_t rows, int64_t n, const int64_t* boundaries,
                    int64_t groups, double lam, double* cost, int threads, WgmIssue* issue) {
  if (!good_sizes(rows, n, groups)) return Status::bad_size;
  if (!good_lambda(lam)) return Status::bad_code;
  if (rows == 0) return Status::ok;
  if (!values || !boundaries || !cost) return Status::null_pointer;
  FirstIssue first;
  detail::parallel_for(rows, threads, 1, [&](int64_t begin, int64_t end) {
    Prefix p;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t* b = boundaries + r * (groups + 1);
      int64_t col = -1;
      const WgmIssue::Kind bad = p.build(values + r * n, n, 1, &col);
      const WgmIssue wrong =
          bad != WgmIssue::none ? WgmIssue{bad, r, col} : check_boundaries(b, groups, n, r);
      if (wrong.kind != WgmIssue::none) {
        first.offer(wrong);
        continue;
      }
      double total = 0.0;
      for (int64_t g = 0; g < groups && b[g] < n; ++g) total += p.cost(b[g], b[g + 1], lam);
      cost[r] = total;
    }
  });
  return report(first, issue);
}

}  // namespace

Status wgm_partition(const float* values, int64_t rows, int64_t n, int64_t groups,
                     WgmMethod method, int64_t window, double lam, int64_t* boundaries,
                     int threads, WgmIssue* issue) noexcept {
  return detail::guarded([&] {
    return partition_checked(values, rows, n, groups, method, window, lam, boundaries, threads,
                             issue);
  });
}

Status wgm_cost(const float* values, int64_t rows, int64_t n, const int64_t* boundaries,
                int64_t groups, double lam, double* cost, int threads, WgmIssue* issue) noexcept {
  return detail::guarded([&] {
    return cost_checked(values, rows, n, boundaries, groups, lam, cost, threads, issue);
  });
}

}  // namespace sdq
