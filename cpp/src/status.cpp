#include "sdq/status.h"

#include <cstring>

#include "guard.h"

namespace sdq {
namespace {
thread_local char g_exception_text[256] = "";
}  // namespace

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
    case Status::out_of_memory: return "out of memory for a scratch buffer";
    case Status::internal_error: return "internal error (an exception inside the core)";
    case Status::bad_pointer: return "a pointer is misaligned for its element type";
    case Status::bad_value: return "a value is out of range";
  }
  return "unknown status";
}

const char* last_exception_text() noexcept { return g_exception_text; }

bool is_argument_error(Status s) noexcept {
  switch (s) {
    case Status::null_pointer:
    case Status::bad_size:
    case Status::not_power_of_two:
    case Status::bad_order:
    case Status::bad_levels:
    case Status::bad_code:
    case Status::bad_pointer:
    case Status::bad_value: return true;
    default: return false;
  }
}

namespace detail {

void record_exception(const char* what) noexcept {
  std::strncpy(g_exception_text, what ? what : "", sizeof(g_exception_text) - 1);
  g_exception_text[sizeof(g_exception_text) - 1] = '\0';
}

}  // namespace detail
}  // namespace sdq
