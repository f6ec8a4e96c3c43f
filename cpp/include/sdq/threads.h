// Where sdq's parallel work runs (every entry point that takes `threads`).
//
//   pool    (default) sdq's own workers (started once, spin ~100 us after a job, then sleep).
//   openmp  the caller's OpenMP team, in builds with OpenMP. For a process whose other work is
//           OpenMP too (PyTorch's CPU ops, an engine's own kernels), where the pool would be a
//           second set of threads spinning on the same cores. Inside a compiled decode step on
//           2 cores, sdq's pool worker shared a core with torch's spinning OpenMP worker; on
//           torch's team the 1.1B model's step took 25% less time. The Python package
//           selects it when torch's ATen backend is OpenMP (sdq.set_thread_backend,
//           SDQ_THREAD_BACKEND).
//
// OpenMP's limits come with it: a thread that cannot be created ends the process (libgomp), and
// a forked child must not use the parent's team, so a child of fork() goes back to the pool.
// A call made inside an OpenMP parallel region uses the pool, as before.
#pragma once
#include "sdq/status.h"

namespace sdq {

enum class ThreadBackend : int { pool = 0, openmp = 1 };

// Process-wide; Status::not_built for openmp in a build without OpenMP.
Status set_thread_backend(ThreadBackend backend) noexcept;
ThreadBackend thread_backend() noexcept;
bool openmp_available() noexcept;

}  // namespace sdq
