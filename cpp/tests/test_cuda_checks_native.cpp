// Host-side argument checks of the CUDA entry points (cuda.h), which need no GPU: they run
// before any device query. In a build without nvcc every entry point must say not_built.
// Exit code 0: all checks pass.
#include <cstdint>
#include <cstdio>

#include "sdq/cuda.h"
#include "expect.h"

namespace {

using sdq_test::expect;

// Addresses that are never dereferenced: every check below fails before a launch.
template <typename T>
T* fake(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void stubs_say_not_built() {
  using sdq::Status;
  const sdq::BlockLayout L{128, 128, 1.0};
  sdq::cuda::PointerInfo info{};
  float f[4] = {};
  expect(sdq::cuda::pointer_info(f, &info) == Status::not_built, "stub pointer_info: not_built");
  expect(sdq::cuda::fwht(f, 1, 4, nullptr, false, nullptr) == Status::not_built,
         "stub fwht: not_built");
  expect(sdq::cuda::activation_transform(L, false, nullptr, f, f, f, 1, f, f, nullptr) ==
             Status::not_built,
         "stub activation_transform: not_built");
}

void fwht_checks() {
  using sdq::Status;
  expect(sdq::cuda::fwht(fake<float>(0x1002), 1, 16, nullptr, false, nullptr) ==
             Status::bad_pointer,
         "fwht: misaligned x -> bad_pointer");
  expect(sdq::cuda::fwht(fake<float>(0x1000), 1, 16, fake<float>(0x2001), false, nullptr) ==
             Status::bad_pointer,
         "fwht: misaligned signs -> bad_pointer");
  expect(sdq::cuda::fwht(fake<float>(0x1000), int64_t{1} << 60, 1 << 10, nullptr, false,
                         nullptr) == Status::bad_size,
         "fwht: rows * n overflowing int64 -> bad_size");
  expect(sdq::cuda::fwht(nullptr, 1, 16, nullptr, false, nullptr) == Status::null_pointer,
         "fwht: null x -> null_pointer");
}

void activation_transform_checks() {
  using sdq::Status;
  const sdq::BlockLayout L{300, 128, 1.5};
  float* ok = fake<float>(0x1000);
  expect(sdq::cuda::activation_transform(L, true, ok, ok, ok, fake<float>(0x1003), 2, ok, ok,
                                         nullptr) == Status::bad_pointer,
         "activation_transform: misaligned x -> bad_pointer");
  expect(sdq::cuda::activation_transform(L, true, ok, ok, ok, ok, int64_t{1} << 60, ok, ok,
                                         nullptr) == Status::bad_size,
         "activation_transform: batch * in overflowing int64 -> bad_size");
  expect(sdq::cuda::activation_transform(L, false, nullptr, nullptr, ok, ok, 2, ok, ok, nullptr) ==
             Status::null_pointer,
         "activation_transform: null down_full with 3 blocks -> null_pointer");
}

void addonly_gemm_checks() {
  using sdq::Status;
  const sdq::BlockLayout L{256, 128, 2.0};
  const auto gemm = [&](const uint16_t* scale, int64_t out, int64_t batch) {
    return sdq::cuda::addonly_gemm(L, sdq::Levels::binary, fake<sdq::word_t>(0x1000), nullptr,
                                   scale, fake<uint16_t>(0x3000), out, fake<float>(0x4000),
                                   fake<float>(0x5000), batch, fake<float>(0x6000), nullptr);
  };
  expect(gemm(fake<uint16_t>(0x2001), 4, 4) == Status::bad_pointer,
         "addonly_gemm: odd fp16 scale address -> bad_pointer");
  expect(gemm(fake<uint16_t>(0x2000), int64_t{1} << 40, int64_t{1} << 40) == Status::bad_size,
         "addonly_gemm: batch * out overflowing int64 -> bad_size");
  expect(sdq::cuda::addonly_gemm(L, sdq::Levels::ternary, fake<sdq::word_t>(0x1000), nullptr,
                                 fake<uint16_t>(0x2000), fake<uint16_t>(0x3000), 4,
                                 fake<float>(0x4000), fake<float>(0x5000), 4,
                                 fake<float>(0x6000), nullptr) == Status::null_pointer,
         "addonly_gemm: ternary without nonzero -> null_pointer");
}

// Without a GPU the query fails cleanly (cuda_error); with one, host stack memory is not usable.
void pointer_info_of_host_memory() {
  float f[4] = {};
  sdq::cuda::PointerInfo info{};
  const sdq::Status s = sdq::cuda::pointer_info(f, &info);
  expect(s == sdq::Status::cuda_error || (s == sdq::Status::ok && !info.usable()),
         "pointer_info: host memory is never usable by a kernel");
  expect(sdq::cuda::pointer_info(nullptr, &info) == sdq::Status::null_pointer,
         "pointer_info: null -> null_pointer");
}

}  // namespace

int main() {
  if (!sdq::cuda::built()) {
    stubs_say_not_built();
  } else {
    fwht_checks();
    activation_transform_checks();
    addonly_gemm_checks();
    pointer_info_of_host_memory();
  }
  return sdq_test::finish();
}
