// Status codes returned by every entry point of the sdq core. The core never throws across its
// API and never prints: a native engine checks the code, the Python binding turns it into an error
// that names the offending argument. Every noexcept entry point catches what its body or its
// worker threads throw (std::bad_alloc from a scratch buffer, std::system_error, ...) and returns
// out_of_memory or internal_error instead of reaching std::terminate.
#pragma once

namespace sdq {

enum class Status : int {
  ok = 0,
  null_pointer = 1,      // a required pointer argument is null
  bad_size = 2,          // a size is zero, negative or inconsistent with another
  not_power_of_two = 3,  // a Hadamard length that is not a power of two
  bad_order = 4,         // modulator order other than 1 or 2
  bad_levels = 5,        // levels other than binary or ternary
  bad_code = 6,          // a code outside the allowed set (binary: +-1, ternary: -1/0/+1)
  cuda_error = 7,        // a CUDA runtime call failed
  not_built = 8,         // the routine is not in this build (e.g. CUDA without nvcc)
  out_of_memory = 9,     // a scratch buffer could not be allocated (std::bad_alloc)
  internal_error = 10,   // any other exception raised inside the core (a bug, or the system)
  bad_pointer = 11,      // a pointer misaligned for its element type
  bad_value = 12,        // a value out of range (a parameter, or data the format cannot hold)
};

// A short English description, for logs and exception messages.
const char* status_string(Status s) noexcept;

// what() of the exception behind the last out_of_memory or internal_error returned on the calling
// thread ("" if none): the detail a log needs that the Status alone does not carry.
const char* last_exception_text() noexcept;

// True for the codes that mean "the arguments are wrong" (the caller can fix them), as opposed to
// resource failures (out_of_memory), faults (cuda_error, internal_error) and not_built.
bool is_argument_error(Status s) noexcept;

}  // namespace sdq
