// Internal: split [0, n) into contiguous chunks run on the process's thread pool (thread_pool.h).
// Work too small to pay for waking a worker (fewer than two grains) runs inline, with no
// synchronisation at all; callers size `grain` by cost so that a chunk is worth tens of
// microseconds.
//
// Exceptions: an exception escaping a worker would call std::terminate. So every chunk runs
// inside a catch-all that keeps the first exception (std::exception_ptr); parallel_for waits for
// every chunk and only then rethrows it on the calling thread, where the entry point's guard
// (guard.h) turns it into a Status.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <exception>
#include <thread>

#include "thread_pool.h"

namespace sdq::detail {

// Units per chunk so that a chunk holds at least `least` work when a unit costs `unit_cost`
// (the grain argument of parallel_for).
inline int64_t grain_for(double least, double unit_cost) noexcept {
  return unit_cost >= least ? 1 : static_cast<int64_t>(std::ceil(least / unit_cost));
}

inline int resolve_threads(int threads) noexcept {
  if (threads > 0) return threads;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

// The first exception captured by any of several threads. capture() is called inside a catch
// block; rethrow() only after run_tasks returned (the pool's handshake orders the write).
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

// Calls fn(begin, end) on disjoint chunks covering [0, n): min(threads, n / grain) chunks (at
// least one, none when n == 0) whose sizes differ by at most one. One chunk runs inline on the
// caller, exceptions propagating as they are. Otherwise rethrows the first exception thrown by
// fn, after every chunk ran to completion.
template <typename Fn>
void parallel_for(int64_t n, int threads, int64_t grain, Fn&& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = std::min<int64_t>(resolve_threads(threads), std::max<int64_t>(1, n / grain));
  if (chunks <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  struct Job {
    Fn* fn;
    int64_t n, chunks;
    FirstException error;
  } job;
  job.fn = &fn;
  job.n = n;
  job.chunks = chunks;
  run_tasks(chunks, static_cast<int>(chunks), [](void* ctx, int64_t i) {
    Job& j = *static_cast<Job*>(ctx);
    const int64_t q = j.n / j.chunks, r = j.n % j.chunks;
    const int64_t begin = i * q + std::min(i, r), end = begin + q + (i < r ? 1 : 0);
    try {
      (*j.fn)(begin, end);
    } catch (...) {
      j.error.capture();
    }
  }, &job);
  job.error.rethrow();
}

}  // namespace sdq::detail
