#include "sdq/status.h"

namespace sdq {

const char* status_string(Status s) noexcept {
  switch (s) {
    case Status::ok: return "ok";
    case Status::null_pointer: return "a required pointer is null";
    case Status::bad_size: return "a size is zero, negative or inconsistent";
    case Status::not_power_of_two: return "length must be a power of two";
    case Status::bad_order: return "modulator order must be 1 or 2";
    case Status::bad_levels: return "levels must be binary or ternary";
    case Status::bad_code: return "a code is outside the allowed alphabet";
    case Status::cuda_error: return "a CUDA runtime call failed";
    case Status::not_built: return "this routine is not in this build";
  }
  return "unknown status";
}

}  // namespace sdq
