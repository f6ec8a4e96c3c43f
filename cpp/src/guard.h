// Internal: the exception boundary of the public entry points. Each function declared noexcept in
// cpp/include/sdq (and cuda.h) runs its body through guarded(), once per call, never inside a hot
// loop. Exceptions thrown in worker threads reach it too: parallel_for (parallel.h) rethrows the
// first one on the calling thread after joining every worker.
#pragma once
#include <exception>
#include <new>
#include <stdexcept>

#include "sdq/status.h"

namespace sdq::detail {

// Stores what() for sdq::last_exception_text() (status.cpp); thread-local, never throws.
void record_exception(const char* what) noexcept;

// Runs fn (returning Status) and turns any exception into a Status:
//   std::bad_alloc, std::length_error (a container asked for an impossible size) -> out_of_memory
//   anything else -> internal_error
template <typename Fn>
Status guarded(Fn&& fn) noexcept {
  try {
    return fn();
  } catch (const std::bad_alloc& e) {
    record_exception(e.what());
    return Status::out_of_memory;
  } catch (const std::length_error& e) {
    record_exception(e.what());
    return Status::out_of_memory;
  } catch (const std::exception& e) {
    record_exception(e.what());
    return Status::internal_error;
  } catch (...) {
    record_exception("an exception of unknown type");
    return Status::internal_error;
  }
}

}  // namespace sdq::detail
