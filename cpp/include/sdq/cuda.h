// CUDA entry points. They take device pointers and a stream (as cudaStream_t passed through a
// void*, so this header needs no CUDA include) and return a Status; they never allocate, never
// synchronise the stream and never touch the host. In a build without nvcc every function returns
// Status::not_built.
#pragma once
#include <cstdint>

#include "sdq/bitplane.h"
#include "sdq/layout.h"
#include "sdq/levels.h"
#include "sdq/status.h"

namespace sdq::cuda {

bool built() noexcept;

// Same contract as sdq::fwht (fwht.h), on device memory.
Status fwht(float* x, int64_t rows, int64_t n, const float* signs, bool inverse,
            void* stream) noexcept;

// Same contracts as sdq::activation_transform and sdq::addonly_gemm (gemv.h), on device memory.
Status activation_transform(const BlockLayout& L, bool hadamard, const float* signs,
                            const float* down_full, const float* down_last, const float* x,
                            int64_t batch, float* xt, float* xsum, void* stream) noexcept;
Status addonly_gemm(const BlockLayout& L, Levels levels, const word_t* sign,
                    const word_t* nonzero, const uint16_t* scale, const uint16_t* mean,
                    int64_t out, const float* xt, const float* xsum, int64_t batch, float* y,
                    void* stream) noexcept;

}  // namespace sdq::cuda
