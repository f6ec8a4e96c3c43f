// Internal: split [0, n) into contiguous chunks, one per thread. No pool: the core's calls are
// long (milliseconds and up), so a thread start (~20 us) is noise, and no state outlives a call.
//
// Exceptions: an exception escaping a std::thread calls std::terminate, and so does destroying a
// thread that was not joined. So every chunk runs inside a catch-all that keeps the first
// exception (std::exception_ptr); parallel_for joins every worker and only then rethrows it on the
// calling thread, where the entry point's guard (guard.h) turns it into a Status.
#pragma once
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <thread>
#include <vector>

namespace sdq::detail {

inline int resolve_threads(int threads) noexcept {
  if (threads > 0) return threads;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

// The first exception captured by any of several threads. capture() is called inside a catch
// block; rethrow() only after every capturing thread has been joined (join orders the write).
class FirstException {
 public:
  void capture() noexcept {
    if (!taken_.exchange(true, std::memory_order_relaxed)) first_ = std::current_exception();
  }
  void rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::atomic<bool> taken_{false};
  std::exception_ptr first_;
};

// Calls fn(begin, end) on disjoint chunks covering [0, n). Chunks are multiples of `grain` (but the
// last); at most `threads` chunks, and none when n == 0. The calling thread runs the first chunk;
// a chunk whose thread cannot be started runs on the calling thread too. Rethrows the first
// exception thrown by fn (the other chunks still run to completion).
template <typename Fn>
void parallel_for(int64_t n, int threads, int64_t grain, Fn&& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t units = (n + grain - 1) / grain;
  const int64_t t = std::min<int64_t>(resolve_threads(threads), units);
  if (t <= 1) {  // no other thread: an exception may propagate as it is
    fn(int64_t{0}, n);
    return;
  }
  const int64_t per = (units + t - 1) / t * grain;
  FirstException error;
  auto chunk = [&fn, &error](int64_t b, int64_t e) noexcept {
    try {
      fn(b, e);
    } catch (...) {
      error.capture();
    }
  };
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(t - 1));  // may throw, but before any thread exists
  for (int64_t i = 1; i < t; ++i) {
    const int64_t b = i * per, e = std::min(n, b + per);
    if (b >= e) continue;
    try {
      workers.emplace_back(chunk, b, e);  // reserved: only the thread start can fail
    } catch (...) {
      chunk(b, e);  // no thread (std::system_error): do the work here rather than fail
    }
  }
  chunk(int64_t{0}, std::min(n, per));
  for (auto& w : workers) w.join();
  error.rethrow();
}

}  // namespace sdq::detail
