// The sdq::cuda entry points of a CPU-only build (no nvcc): each returns Status::not_built.
// CMake defines SDQ_WITH_CUDA on sdq_core when it builds the kernels in cuda/, which then
// provide these symbols instead.
#ifndef SDQ_WITH_CUDA

#include "sdq/cuda.h"

namespace sdq::cuda {

bool built() noexcept { return false; }

const char* last_error() noexcept { return "sdq was built without CUDA (no nvcc, or SDQ_CUDA=OFF)"; }

Status pointer_info(const void*, PointerInfo*) noexcept { return Status::not_built; }

Status fwht(float*, int64_t, int64_t, const float*, bool, void*) noexcept {
  return Status::not_built;
}

Status activation_transform(const BlockLayout&, bool, const float*, const float*, const float*,
                            const float*, int64_t, float*, float*, void*) noexcept {
  return Status::not_built;
}

Status addonly_gemm(const BlockLayout&, Levels, const word_t*, const word_t*, const uint16_t*,
                    const uint16_t*, int64_t, const float*, const float*, int64_t, float*,
                    void*, GemmKernel) noexcept {
  return Status::not_built;
}

}  // namespace sdq::cuda

#endif  // SDQ_WITH_CUDA
