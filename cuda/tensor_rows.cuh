// The tensor-core add-only GEMV/GEMM (tensor_rows.cu), called by addonly_gemm (addonly.cu) after
// its argument checks (sizes valid, pointers non-null and aligned, out and batch >= 1) on a
// device of compute capability 8.0 or newer.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "sdq/cuda.h"
#include "sdq/layout.h"
#include "sdq/status.h"

namespace sdq::cuda::detail {

// True when the kernel's 32-bit offsets hold every index of this call.
bool tensor_rows_fits(const BlockLayout& L, int64_t out, int64_t batch) noexcept;

// With several splits (plan_tensor_rows) it zeroes y with cudaMemsetAsync and adds atomically.
Status tensor_rows_gemm(const BlockLayout& L, const GemmBuffers& io, int64_t out, int64_t batch,
                        int num_sms, cudaStream_t stream) noexcept;

}  // namespace sdq::cuda::detail
