// Internal: split [0, n) into contiguous chunks, one per thread. No pool: the core's calls are
// long (milliseconds and up), so a thread start (~20 us) is noise, and no state outlives a call.
#pragma once
#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace sdq::detail {

inline int resolve_threads(int threads) noexcept {
  if (threads > 0) return threads;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

// Calls fn(begin, end) on disjoint chunks covering [0, n). Chunks are multiples of `grain` (but the
// last); at most `threads` chunks, and none when n == 0. The calling thread runs the first chunk.
template <typename Fn>
void parallel_for(int64_t n, int threads, int64_t grain, Fn&& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t units = (n + grain - 1) / grain;
  const int64_t t = std::min<int64_t>(resolve_threads(threads), units);
  if (t <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  const int64_t per = (units + t - 1) / t * grain;
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(t - 1));
  for (int64_t i = 1; i < t; ++i) {
    const int64_t b = i * per, e = std::min(n, b + per);
    if (b < e) workers.emplace_back([&fn, b, e] { fn(b, e); });
  }
  fn(int64_t{0}, std::min(n, per));
  for (auto& w : workers) w.join();
}

}  // namespace sdq::detail
