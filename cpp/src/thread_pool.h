// Internal: one process-wide pool of worker threads behind parallel_for (parallel.h).
//
// Why a pool: the add-only kernels of a small layer take tens of microseconds per call, so
// starting threads on every call (tens of microseconds each on a loaded machine) cost more than
// the work. Workers are created once, on first need, and only as many as the largest thread
// count asked (capped at the hardware's), then spin briefly and sleep on a condition variable between jobs.
//
// Contract of run_tasks: task(ctx, i) runs exactly once for every i in [0, count), on the caller
// or on a worker, and run_tasks returns only after all of them finished (their writes are
// visible to the caller). task must not throw: parallel_for wraps it in a catch-all.
//  * Several callers at once (Python threads with the GIL released): one job runs on the pool at
//    a time; a caller that finds it busy runs its own tasks inline rather than wait.
//  * A task calling run_tasks (nesting) finds the pool busy too, so it cannot deadlock.
//  * fork: the child gets a fresh pool on first use (the parent's workers do not exist there).
//  * A worker that cannot be started (no memory, thread limit) just means fewer helpers.
#pragma once
#include <cstdint>

namespace sdq::detail {

using TaskFn = void (*)(void* ctx, int64_t index);

// Runs task(ctx, i) for i in [0, count) on the caller and up to threads - 1 workers.
void run_tasks(int64_t count, int threads, TaskFn task, void* ctx) noexcept;

// Workers the pool holds now (0 before the first parallel call; tests and diagnostics).
int pool_workers() noexcept;

}  // namespace sdq::detail
