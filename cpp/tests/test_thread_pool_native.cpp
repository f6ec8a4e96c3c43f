// The thread pool behind parallel_for (thread_pool.h, parallel.h): every index runs exactly once,
// chunks are balanced and sized by the grain, concurrent and nested callers neither deadlock nor
// mix their jobs, workers are created once, and a forked child can still run parallel work; the
// same through the OpenMP backend where it is built.
// Exit code 0: all checks pass.
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <thread>
#include <vector>

#include "parallel.h"
#include "scratch.h"
#include "thread_pool.h"
#include "expect.h"
#include "sdq/threads.h"

namespace {

using sdq_test::expect;

// Runs parallel_for(n, threads, grain) and checks that each index was covered exactly once.
bool covers_once(int64_t n, int threads, int64_t grain) {
  std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
  for (auto& h : hits) h = 0;
  sdq::detail::parallel_for(n, threads, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(i)].fetch_add(1);
  });
  for (auto& h : hits)
    if (h.load() != 1) return false;
  return true;
}

// Whether two chunks really run at the same time: each waits (up to 5 s) for the other to start,
// which a caller running both chunks itself never sees.
bool runs_concurrently() {
  std::atomic<int> started{0};
  std::atomic<bool> met{true};
  sdq::detail::parallel_for(2, 2, 1, [&](int64_t, int64_t) {
    started.fetch_add(1);
    const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
    while (started.load() < 2)
      if (std::chrono::steady_clock::now() > until) {
        met = false;
        return;
      }
  });
  return met.load();
}

void coverage() {
  bool ok = true;
  for (int64_t n : {1, 2, 3, 7, 64, 1000, 4099})
    for (int threads : {1, 2, 3, 8})
      for (int64_t grain : {1, 5, 64}) ok = ok && covers_once(n, threads, grain);
  expect(ok, "parallel_for: every index exactly once (n, threads, grain varied)");
}

// Chunk sizes: min(threads, n / grain) chunks, differing by at most one.
void chunking() {
  auto sizes = [](int64_t n, int threads, int64_t grain) {
    std::vector<int64_t> s;
    std::atomic<int> lock{0};
    sdq::detail::parallel_for(n, threads, grain, [&](int64_t b, int64_t e) {
      while (lock.exchange(1)) {
      }
      s.push_back(e - b);
      lock = 0;
    });
    return s;
  };
  expect(sizes(100, 4, 60).size() == 1, "parallel_for: less than two grains runs as one chunk");
  const auto four = sizes(10, 4, 1);
  bool balanced = four.size() == 4;
  for (int64_t s : four) balanced = balanced && (s == 2 || s == 3);
  expect(balanced, "parallel_for: 10 over 4 threads gives chunks of 2 or 3");
  bool inline_run = false;
  const auto caller = std::this_thread::get_id();
  sdq::detail::parallel_for(1000, 1, 1, [&](int64_t, int64_t) {
    inline_run = std::this_thread::get_id() == caller;
  });
  expect(inline_run, "parallel_for: threads = 1 runs on the caller");
}

void workers_created_once() {
  sdq::detail::parallel_for(64, 2, 1, [](int64_t, int64_t) {});
  const int after_first = sdq::detail::pool_workers();
  for (int i = 0; i < 200; ++i) sdq::detail::parallel_for(64, 2, 1, [](int64_t, int64_t) {});
  const unsigned hw = std::thread::hardware_concurrency();
  expect(sdq::detail::pool_workers() == after_first, "pool: repeated calls start no threads");
  if (hw > 1) expect(runs_concurrently(), "pool: a worker runs a chunk beside the caller");
  sdq::detail::parallel_for(64, 64, 1, [](int64_t, int64_t) {});
  expect(sdq::detail::pool_workers() <= static_cast<int>(hw > 1 ? hw - 1 : 0),
         "pool: capped at hardware concurrency - 1 workers");
}

void concurrent_and_nested() {
  std::atomic<bool> ok{true};
  std::vector<std::thread> callers;
  for (int c = 0; c < 6; ++c)
    callers.emplace_back([&ok, c] {
      for (int rep = 0; rep < 100; ++rep)
        if (!covers_once(257 + c, 1 + (c + rep) % 4, 1)) ok = false;
    });
  for (auto& t : callers) t.join();
  expect(ok.load(), "pool: 6 threads calling parallel_for at once each get their own result");
  std::atomic<int64_t> inner{0};
  sdq::detail::parallel_for(8, 4, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      sdq::detail::parallel_for(100, 4, 1, [&](int64_t ib, int64_t ie) { inner += ie - ib; });
  });
  expect(inner.load() == 800, "pool: a nested parallel_for runs (inline), no deadlock");
}

void worker_exception() {
  std::atomic<int> ran{0};
  bool caught = false;
  try {
    sdq::detail::parallel_for(6, 3, 1, [&](int64_t b, int64_t) {
      ran.fetch_add(1);
      if (b != 0) throw std::runtime_error("worker");
    });
  } catch (const std::runtime_error&) {
    caught = true;
  }
  expect(caught && ran.load() == 3, "pool: a worker's exception reaches the caller after all");
  expect(covers_once(500, 3, 1), "pool: usable after an exception");
}

// SDQ_TEST_NO_FORK=1 skips the fork checks: qemu-user (the AArch64 cross check) aborts a forked
// child that starts a thread while its parent has threads alive, whatever the program does.
bool fork_checks() {
  const char* no = std::getenv("SDQ_TEST_NO_FORK");
  if (no && *no && *no != '0') {
    std::printf("skip fork checks (SDQ_TEST_NO_FORK)\n");
    return false;
  }
  return true;
}

// The parent has used the pool; a forked child must get working parallel_for with workers of its
// own (the parent's do not exist there). alarm() turns a hang into a failure.
void fork_child() {
  if (!fork_checks()) return;
  sdq::detail::parallel_for(64, 2, 1, [](int64_t, int64_t) {});
  const pid_t pid = fork();
  if (pid == 0) {
    alarm(20);
    const bool parallel = std::thread::hardware_concurrency() < 2 || runs_concurrently();
    _exit(covers_once(10000, 2, 1) && covers_once(10000, 4, 1) && parallel ? 0 : 1);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  expect(WIFEXITED(status) && WEXITSTATUS(status) == 0, "pool: a forked child runs parallel work");
}

void scratch_reuse() {
  using sdq::detail::ScratchSlot;
  float* a = sdq::detail::scratch<float>(ScratchSlot::transform, 1000);
  a[999] = 7.0f;
  float* b = sdq::detail::scratch<float>(ScratchSlot::transform, 500);
  float* c = sdq::detail::scratch<float>(ScratchSlot::gemm_rows, 500);
  expect(a == b && b[999] == 7.0f, "scratch: a smaller request reuses the buffer");
  expect(c != a, "scratch: slots are distinct");
  expect(reinterpret_cast<uintptr_t>(c) % 64 == 0, "scratch: 64-byte aligned");
  bool threw = false;
  try {
    sdq::detail::scratch<float>(ScratchSlot::gemm_sums, int64_t{1} << 62);
  } catch (const std::length_error&) {
    threw = true;
  } catch (const std::bad_alloc&) {
    threw = true;
  }
  expect(threw, "scratch: an impossible size throws (the guard maps it to out_of_memory)");
}

// The OpenMP backend (sdq/threads.h), where built: the same guarantees as the pool; a forked
// child goes back to the pool (the parent's OpenMP team does not exist there).
void openmp_backend() {
  using sdq::ThreadBackend;
  if (!sdq::openmp_available()) {
    expect(sdq::set_thread_backend(ThreadBackend::openmp) == sdq::Status::not_built,
           "openmp: not_built without OpenMP");
    return;
  }
  expect(sdq::set_thread_backend(ThreadBackend::openmp) == sdq::Status::ok &&
             sdq::thread_backend() == ThreadBackend::openmp,
         "openmp: selected");
  coverage();
  concurrent_and_nested();
  worker_exception();
  if (std::thread::hardware_concurrency() > 1)
    expect(runs_concurrently(), "openmp: a team thread runs a chunk beside the caller");
  const pid_t pid = fork_checks() ? fork() : -1;
  if (pid == 0) {
    alarm(20);
    const bool back = sdq::thread_backend() == ThreadBackend::pool;
    _exit(back && covers_once(10000, 2, 1) && covers_once(10000, 4, 1) ? 0 : 1);
  }
  if (pid > 0) {
    int status = 0;
    waitpid(pid, &status, 0);
    expect(WIFEXITED(status) && WEXITSTATUS(status) == 0,
           "openmp: a forked child is back on the pool and runs parallel work");
  }
  expect(sdq::set_thread_backend(ThreadBackend::pool) == sdq::Status::ok &&
             sdq::thread_backend() == ThreadBackend::pool,
         "openmp: back to the pool");
}

}  // namespace

int main() {
  coverage();
  chunking();
  workers_created_once();
  concurrent_and_nested();
  worker_exception();
  fork_child();
  scratch_reuse();
  openmp_backend();
  return sdq_test::finish();
}
