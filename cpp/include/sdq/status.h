// Status codes returned by every entry point of the sdq core. The core never throws across its
// API and never prints: a native engine checks the code, the Python binding turns it into an error
// that names the offending argument.
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
};

// A short English description, for logs and exception messages.
const char* status_string(Status s) noexcept;

}  // namespace sdq
