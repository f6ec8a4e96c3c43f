// The worker pool behind run_tasks (thread_pool.h).
//
// One job at a time: the caller holding busy_ publishes (task, ctx, count) under m_, bumps the
// generation and offers `seats_` places; woken workers take a seat, then every participant
// claims task indices from one atomic counter until none is left. The caller closes the seats
// and waits until no worker is inside the job, so nothing touches the caller's ctx after return.
//
// Spin, then sleep: a decode step calls a layer every few tens of microseconds, and a futex
// wake-up costs 5-50 us before the worker runs (more while torch's own threads hold the other
// cores), as much as a small layer's work. So a worker that just finished a job watches the
// generation for ~100 us ($SDQ_POOL_SPIN_US) before it sleeps, and the caller watches `inside_`
// as long before it sleeps on idle_. Correctness never rests on the spin: both fall back to the
// condition variables, whose predicates are checked under m_.
#include "thread_pool.h"

#include "sdq/threads.h"

#include <pthread.h>
#ifdef SDQ_OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace sdq::detail {
namespace {

constexpr long kDefaultSpinMicros = 100;
constexpr long kMaxSpinMicros = 100000;

// How long a worker (and the caller) polls before sleeping: $SDQ_POOL_SPIN_US (0: sleep at once,
// for machines where the cores are shared with other busy threads), else kDefaultSpinMicros.
std::chrono::microseconds spin_budget() noexcept {
  static const std::chrono::microseconds budget{[] {
    const char* s = std::getenv("SDQ_POOL_SPIN_US");
    if (!s || !*s) return kDefaultSpinMicros;
    char* end = nullptr;
    const long v = std::strtol(s, &end, 10);
    return *end != '\0' || v < 0 ? kDefaultSpinMicros : std::min(v, kMaxSpinMicros);
  }()};
  return budget;
}

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Polls done() for up to spin_budget(); true when it came true.
template <typename Done>
bool spin_until(Done&& done) noexcept {
  const auto budget = spin_budget();
  if (budget.count() == 0) return done();
  const auto until = std::chrono::steady_clock::now() + budget;
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (done()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() >= until) return false;
  }
}

class Pool {
 public:
  // Runs the job with up to `helpers` workers; false (nothing run) when another caller has the
  // pool, so the caller runs the tasks itself instead of waiting.
  bool try_run(int64_t count, int helpers, TaskFn task, void* ctx) noexcept {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    helpers = static_cast<int>(std::min<int64_t>(grow(helpers), count - 1));
    {
      std::lock_guard<std::mutex> lk(m_);
      task_ = task;
      ctx_ = ctx;
      count_ = count;
      next_.store(0, std::memory_order_relaxed);
      seats_ = helpers;
      generation_.fetch_add(1, std::memory_order_release);
    }
    if (helpers > 0) wake_.notify_all();
    claim(task, ctx, count);
    std::unique_lock<std::mutex> lk(m_);
    seats_ = 0;  // a worker waking late must not join a job whose ctx is gone
    if (inside_.load(std::memory_order_acquire) != 0) {
      lk.unlock();
      spin_until([this] { return inside_.load(std::memory_order_acquire) == 0; });
      lk.lock();
      idle_.wait(lk, [this] { return inside_.load(std::memory_order_acquire) == 0; });
    }
    return true;
  }

  int size() const noexcept { return size_.load(std::memory_order_relaxed); }

 private:
  void claim(TaskFn task, void* ctx, int64_t count) noexcept {
    for (int64_t i; (i = next_.fetch_add(1, std::memory_order_relaxed)) < count;) task(ctx, i);
  }

  // Starts workers until there are `want` (at most hardware threads - 1: the caller works too).
  // Called only by the busy_ holder. A worker that cannot start leaves the pool smaller.
  int grow(int want) noexcept {
    const unsigned hw = std::thread::hardware_concurrency();
    want = std::min(want, hw > 1 ? static_cast<int>(hw) - 1 : 0);
    try {
      threads_.reserve(static_cast<size_t>(std::max(want, 0)));
      while (static_cast<int>(threads_.size()) < want) {
        const uint64_t seen = generation_.load(std::memory_order_relaxed);  // busy_ holder's
        threads_.emplace_back([this, seen] { work(seen); });
        size_.store(static_cast<int>(threads_.size()), std::memory_order_relaxed);
      }
    } catch (...) {  // std::system_error (no thread) or bad_alloc: fewer helpers
    }
    return static_cast<int>(threads_.size());
  }

  // A worker's life: wait for a job with a free seat, help with it, report leaving. It never
  // ends: the pool lives until the process exits.
  void work(uint64_t seen) noexcept {
    for (;;) {
      spin_until([&] { return generation_.load(std::memory_order_acquire) != seen; });
      std::unique_lock<std::mutex> lk(m_);
      wake_.wait(lk, [&] { return generation_.load(std::memory_order_relaxed) != seen &&
                                  seats_ > 0; });
      seen = generation_.load(std::memory_order_relaxed);
      --seats_;
      inside_.fetch_add(1, std::memory_order_relaxed);
      const TaskFn task = task_;
      void* const ctx = ctx_;
      const int64_t count = count_;
      lk.unlock();
      claim(task, ctx, count);
      lk.lock();
      // release: the job's writes are visible to a caller that sees inside_ reach 0 by spinning
      if (inside_.fetch_sub(1, std::memory_order_release) == 1) idle_.notify_all();
    }
  }

  std::mutex busy_;  // held by the caller whose job is on the pool
  std::mutex m_;     // the job's fields and the seat handshake
  std::condition_variable wake_, idle_;
  std::vector<std::thread> threads_;
  std::atomic<int> size_{0};
  std::atomic<uint64_t> generation_{0};  // written under m_; also polled while spinning
  int seats_ = 0;                         // workers that may still join the current job
  std::atomic<int> inside_{0};  // workers between taking a seat and leaving (changed under m_)
  TaskFn task_ = nullptr;
  void* ctx_ = nullptr;
  int64_t count_ = 0;
  std::atomic<int64_t> next_{0};
};

// The process's pool, created on first use and never destroyed: destroying it at exit would
// have to join workers that may be blocked. After fork the child starts with none, since the
// parent's workers do not exist there (and its pool may be mid-job, its mutexes held): the old
// object is abandoned, not touched. pthread_atfork keeps g_lock consistent across the fork.
std::mutex g_lock;
Pool* g_pool = nullptr;

void before_fork() { g_lock.lock(); }
void after_fork_parent() { g_lock.unlock(); }
void after_fork_child() {
  g_pool = nullptr;
  g_lock.unlock();
}

Pool* pool() noexcept {
  try {
    std::lock_guard<std::mutex> lk(g_lock);
    static const bool registered =
        pthread_atfork(before_fork, after_fork_parent, after_fork_child) == 0;
    (void)registered;
    if (!g_pool) g_pool = new Pool;
    return g_pool;
  } catch (...) {  // no memory for the pool: the caller works alone
    return nullptr;
  }
}

std::atomic<ThreadBackend> g_backend{ThreadBackend::pool};

#ifdef SDQ_OPENMP
// Tasks never throw (parallel_for wraps them), so nothing escapes the region.
void run_openmp(int64_t count, int threads, TaskFn task, void* ctx) noexcept {
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int64_t i = 0; i < count; ++i) task(ctx, i);
}
#endif

}  // namespace

void run_tasks(int64_t count, int threads, TaskFn task, void* ctx) noexcept {
  if (count > 1 && threads > 1) {
#ifdef SDQ_OPENMP
    if (g_backend.load(std::memory_order_relaxed) == ThreadBackend::openmp && !omp_in_parallel()) {
      run_openmp(count, threads, task, ctx);
      return;
    }
#endif
    Pool* p = pool();
    if (p && p->try_run(count, threads - 1, task, ctx)) return;
  }
  for (int64_t i = 0; i < count; ++i) task(ctx, i);
}

int pool_workers() noexcept {
  std::lock_guard<std::mutex> lk(g_lock);
  return g_pool ? g_pool->size() : 0;
}

}  // namespace sdq::detail

namespace sdq {

bool openmp_available() noexcept {
#ifdef SDQ_OPENMP
  return true;
#else
  return false;
#endif
}

Status set_thread_backend(ThreadBackend backend) noexcept {
  if (backend != ThreadBackend::pool && backend != ThreadBackend::openmp) return Status::bad_value;
  if (backend == ThreadBackend::openmp && !openmp_available()) return Status::not_built;
  // A forked child must not use the parent's OpenMP team (libgomp's threads are not in the child).
  static const int registered = pthread_atfork(nullptr, nullptr, [] {
    detail::g_backend.store(ThreadBackend::pool, std::memory_order_relaxed);
  });
  (void)registered;
  detail::g_backend.store(backend, std::memory_order_relaxed);
  return Status::ok;
}

ThreadBackend thread_backend() noexcept {
  return detail::g_backend.load(std::memory_order_relaxed);
}

}  // namespace sdq
