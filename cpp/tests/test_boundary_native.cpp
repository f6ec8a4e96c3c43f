// The exception boundary of the core (guard.h, parallel.h): an exception thrown on any thread of
// an entry point becomes a Status, never std::terminate. Tested on the internal helpers directly
// and through real entry points whose scratch allocation cannot succeed (sizes beyond any address
// space, so the test never actually allocates much). Exit code 0: all checks pass.
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include "guard.h"
#include "parallel.h"
#include "sdq/gemv.h"
#include "sdq/status.h"
#include "expect.h"

namespace {

using sdq_test::expect;

// fn throws in the chunk starting at `thrower` (0: the calling thread's chunk, else a worker's).
// Returns the message that reached the caller ("" if none); counts the chunks that ran.
std::string throw_in_chunk(int64_t thrower, std::atomic<int>& ran) {
  try {
    sdq::detail::parallel_for(4, 4, 1, [&](int64_t b, int64_t) {
      ran.fetch_add(1);
      if (b == thrower) throw std::runtime_error("chunk " + std::to_string(b));
    });
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

void parallel_for_rethrows() {
  std::atomic<int> ran{0};
  expect(throw_in_chunk(2, ran) == "chunk 2",
         "parallel_for: a worker's exception reaches the caller");
  expect(ran.load() == 4, "parallel_for: the other chunks still run");
  ran = 0;
  expect(throw_in_chunk(0, ran) == "chunk 0",
         "parallel_for: the caller's own exception waits for the workers, then propagates");
  expect(ran.load() == 4, "parallel_for: workers joined before the caller's exception");
  bool bad_alloc_seen = false;
  try {
    sdq::detail::parallel_for(8, 8, 1, [](int64_t, int64_t) { throw std::bad_alloc(); });
  } catch (const std::bad_alloc&) {
    bad_alloc_seen = true;
  }
  expect(bad_alloc_seen, "parallel_for: every chunk throwing gives one exception, type kept");
}

void guarded_maps_exceptions() {
  using sdq::Status;
  using sdq::detail::guarded;
  expect(guarded([]() -> Status { throw std::bad_alloc(); }) == Status::out_of_memory,
         "guarded: bad_alloc -> out_of_memory");
  expect(guarded([]() -> Status { throw std::length_error("vector"); }) == Status::out_of_memory,
         "guarded: length_error -> out_of_memory");
  expect(guarded([]() -> Status { throw std::runtime_error("boom"); }) == Status::internal_error,
         "guarded: runtime_error -> internal_error");
  expect(std::strcmp(sdq::last_exception_text(), "boom") == 0, "guarded: what() is kept");
  expect(guarded([]() -> Status { throw 42; }) == Status::internal_error,
         "guarded: a non-std exception -> internal_error");
  expect(guarded([] { return Status::bad_code; }) == Status::bad_code, "guarded: passes a Status");
}

// Blocks of 2^44 columns: each worker's scratch buffer (1 token x (padded + m) floats, 2^47
// bytes) exceeds every address space, so operator new throws inside the worker threads. The
// pointers are never read: the allocation comes first.
void activation_transform_worker_bad_alloc() {
  const int64_t block = int64_t{1} << 44;
  const sdq::BlockLayout L{2 * block, block, 1.0};  // two blocks: one chunk per thread
  float dummy[4] = {};
  for (int threads : {2, 1}) {
    const sdq::Status s = sdq::activation_transform(L, false, nullptr, dummy, dummy, dummy, 1,
                                                    dummy, dummy, threads);
    expect(s == sdq::Status::out_of_memory,
           threads == 2 ? "activation_transform: bad_alloc in a worker -> out_of_memory"
                        : "activation_transform: bad_alloc on one thread -> out_of_memory");
  }
}

// in = 2^50: the look-up tables (16 bytes per code column) need 2^54 bytes.
void addonly_gemm_bad_alloc() {
  const sdq::BlockLayout L{int64_t{1} << 50, 128, 1.0};
  float f[4] = {};
  sdq::word_t w[4] = {};
  uint16_t h[4] = {};
  for (int k = 1; k <= 4; ++k) {
    const auto kernel = static_cast<sdq::AddonlyKernel>(k);
    if (!sdq::addonly_kernel_supported(kernel)) continue;
    const sdq::Status s = sdq::addonly_gemm_variant(kernel, L, sdq::Levels::binary, w, nullptr, h,
                                                    h, 1, f, f, 1, f, 2);
    const std::string what = std::string("addonly_gemm (") + sdq::addonly_kernel_name(kernel) +
                             "): tables beyond memory -> out_of_memory";
    expect(s == sdq::Status::out_of_memory, what.c_str());
  }
}

void status_texts() {
  using sdq::Status;
  expect(std::strcmp(sdq::status_string(Status::out_of_memory), "unknown status") != 0 &&
             std::strcmp(sdq::status_string(Status::internal_error), "unknown status") != 0 &&
             std::strcmp(sdq::status_string(Status::bad_pointer), "unknown status") != 0,
         "status_string names the new codes");
  expect(sdq::is_argument_error(Status::bad_size) && sdq::is_argument_error(Status::bad_pointer) &&
             !sdq::is_argument_error(Status::out_of_memory) &&
             !sdq::is_argument_error(Status::internal_error) &&
             !sdq::is_argument_error(Status::cuda_error) && !sdq::is_argument_error(Status::ok),
         "is_argument_error separates argument errors from failures");
}

}  // namespace

int main() {
  parallel_for_rethrows();
  guarded_maps_exceptions();
  activation_transform_worker_bad_alloc();
  addonly_gemm_bad_alloc();
  status_texts();
  return sdq_test::finish();
}
