// The warp-per-rows add-only GEMV (warp_rows.cu), called by addonly_gemm (addonly.cu) after its
// argument checks: sizes valid, pointers non-null and aligned, out and batch >= 1 (io.nonzero is
// null for binary codes).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "common.cuh"
#include "sdq/cuda.h"
#include "sdq/layout.h"
#include "sdq/status.h"

namespace sdq::cuda::detail {

Status warp_rows_gemm(const BlockLayout& L, const GemmBuffers& io, int64_t out, int64_t batch,
                      cudaStream_t stream) noexcept;

}  // namespace sdq::cuda::detail
