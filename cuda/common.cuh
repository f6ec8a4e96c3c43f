// Internal helpers shared by the CUDA kernels: error recording, device queries, and the
// shared-memory Walsh-Hadamard butterflies.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "sdq/bitplane.h"
#include "sdq/status.h"

namespace sdq::cuda::detail {

// CUDA's launch limits: grid x up to 2^31 - 1 blocks, y and z up to 65535.
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;

// Records the message of a failed runtime call for last_error() and returns Status::cuda_error.
Status fail(cudaError_t e) noexcept;

// Status of the most recent launch on this thread (cudaGetLastError), recorded on failure.
inline Status check_launch() noexcept {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? Status::ok : fail(e);
}

// True when p (may be null) is a multiple of `bytes`: a misaligned float or half load faults
// the whole CUDA context ("misaligned address"), so the entry points refuse such pointers.
inline bool aligned(const void* p, uintptr_t bytes) noexcept {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// The buffers of one add-only GEMM call (addonly_gemm's contract, sdq/gemv.h), as every GEMM
// kernel family (table, warp_rows, tensor) reads them; nonzero is null for binary codes.
struct GemmBuffers {
  const word_t* sign;
  const word_t* nonzero;
  const uint16_t* scale;
  const uint16_t* mean;
  const float* xt;
  const float* xsum;
  float* y;
};

// Zeroes y [batch, out] on the stream: the kernels that add partial sums atomically start there.
inline Status zero_output(float* y, int64_t batch, int64_t out, cudaStream_t s) noexcept {
  const cudaError_t e = cudaMemsetAsync(y, 0, static_cast<size_t>(batch * out) * sizeof(float), s);
  return e == cudaSuccess ? Status::ok : fail(e);
}

struct DeviceInfo {
  int sms;           // multiprocessor count
  int smem_optin;    // max dynamic shared memory per block after cudaFuncSetAttribute
  int cc_major;      // compute capability major version (8: Ampere, 9: Hopper)
};

// Properties of the current device, queried once per device and cached.
Status device_info(DeviceInfo* info) noexcept;

// Index with one pad word every 32 floats: butterflies at stride 1 then hit 32 distinct banks.
__device__ __forceinline__ int pidx(int i) { return i + (i >> 5); }

// In-register Sylvester FWHT of R values (no scaling).
template <int R>
__device__ __forceinline__ void fwht_regs(float (&v)[R]) {
#pragma unroll
  for (int len = 1; len < R; len <<= 1) {
#pragma unroll
    for (int k = 0; k < R; ++k) {
      if ((k & len) == 0) {
        const float a = v[k], b = v[k + len];
        v[k] = a + b;
        v[k + len] = a - b;
      }
    }
  }
}

// One radix-R pass over `total` floats in shared memory (index through pidx): for every flat
// index i0 whose bits [log2 h, log2 h + log2 R) are zero, transform s[i0 + k h], k < R.
template <int R>
__device__ __forceinline__ void fwht_pass(float* s, int total, int h) {
  const int count = total / R;
  const int lh = __ffs(h) - 1;  // h is a power of two
  for (int p = threadIdx.x; p < count; p += blockDim.x) {
    const int i0 = ((p >> lh) * R << lh) + (p & (h - 1));
    float v[R];
#pragma unroll
    for (int k = 0; k < R; ++k) v[k] = s[pidx(i0 + k * h)];
    fwht_regs<R>(v);
#pragma unroll
    for (int k = 0; k < R; ++k) s[pidx(i0 + k * h)] = v[k];
  }
}

// Butterflies for the index bits from log2(h0) up to log2(h_end) over `total` floats, where
// h0 <= h_end are powers of two and total is a multiple of h_end. With h0 = 1 and h_end = n this
// is an unscaled FWHT of every length-n row stored back to back. Must be called by the whole CTA
// (it synchronises); the caller synchronises before (data written) -- this ends with a barrier.
__device__ __forceinline__ void fwht_smem(float* s, int total, int h0, int h_end) {
  int h = h0;
  while (h < h_end) {
    const int span = h_end / h;
    if (span >= 8) {
      fwht_pass<8>(s, total, h);
      h *= 8;
    } else if (span >= 4) {
      fwht_pass<4>(s, total, h);
      h *= 4;
    } else {
      fwht_pass<2>(s, total, h);
      h *= 2;
    }
    __syncthreads();
  }
}

}  // namespace sdq::cuda::detail
