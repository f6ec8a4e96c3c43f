// Batched in-place orthonormal FWHT on the GPU (contract: fwht.h; entry point: cuda.h).
//
// Rows that fit in shared memory: one pass, a CTA loads rows_per_cta whole rows (coalesced),
// runs radix-8/4/2 butterflies in shared memory, scales and stores. Longer rows, [n1, n2] with
// n2 the largest length that fits: pass 1 transforms the n1 contiguous sub-rows, pass 2 the n2
// columns (cols_per_cta adjacent columns per CTA, so loads stay coalesced), since in Sylvester
// order H_n = H_n1 (x) H_n2.
#include <cmath>

#include "common.cuh"
#include "guard.h"
#include "sdq/cuda.h"
#include "sdq/fwht.h"

namespace sdq::cuda {
namespace {

using detail::pidx;

constexpr int64_t kMaxLength = int64_t{1} << 24;

int log2_int(int64_t n) {
  int l = 0;
  while ((int64_t{1} << l) < n) ++l;
  return l;
}

// Sub-rows of length n (= 2^log2n) back to back. Sign of element i of sub-row r:
// signs[(r % signs_period) * n + i] (the sub-rows of one long row share one sign vector).
__global__ void __launch_bounds__(kFwhtThreads)
    fwht_rows_kernel(float* __restrict__ x, int64_t rows, int log2n, int rows_per_cta,
                     const float* __restrict__ signs, int64_t signs_period, bool pre_signs,
                     bool post_signs, float scale) {
  extern __shared__ float s[];
  const int n = 1 << log2n;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * rows_per_cta;
  const int64_t left = rows - row0;
  const int nr = left < rows_per_cta ? static_cast<int>(left) : rows_per_cta;
  const int total = nr * n;
  float* base = x + row0 * n;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    float v = base[i];
    if (pre_signs) v *= signs[((row0 + (i >> log2n)) % signs_period) * n + (i & (n - 1))];
    s[pidx(i)] = v;
  }
  __syncthreads();
  detail::fwht_smem(s, total, 1, n);
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    float v = s[pidx(i)] * scale;
    if (post_signs) v *= signs[((row0 + (i >> log2n)) % signs_period) * n + (i & (n - 1))];
    base[i] = v;
  }
}

// Rows of n1 * n2; transforms along n1 for cols (= 2^log2c) adjacent columns per CTA.
// Sign of element (i1, c): signs[i1 * n2 + c].
__global__ void __launch_bounds__(kFwhtThreads)
    fwht_cols_kernel(float* __restrict__ x, int n1, int64_t n2, int log2c, int64_t tiles_per_row,
                     const float* __restrict__ signs, bool post_signs, float scale) {
  extern __shared__ float s[];
  const int cols = 1 << log2c;
  const int64_t row = blockIdx.x / tiles_per_row;
  const int64_t c0 = (blockIdx.x % tiles_per_row) * cols;
  float* base = x + row * (n1 * n2) + c0;
  const int total = n1 * cols;
  for (int f = threadIdx.x; f < total; f += blockDim.x)
    s[pidx(f)] = base[(f >> log2c) * n2 + (f & (cols - 1))];
  __syncthreads();
  detail::fwht_smem(s, total, cols, total);
  for (int f = threadIdx.x; f < total; f += blockDim.x) {
    const int64_t off = (f >> log2c) * n2 + (f & (cols - 1));
    float v = s[pidx(f)] * scale;
    if (post_signs) v *= signs[off + c0];
    base[off] = v;
  }
}

Status set_smem(const void* kernel, int64_t bytes, const detail::DeviceInfo& dev) {
  if (bytes > dev.smem_optin) return Status::bad_size;
  if (bytes > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    if (e != cudaSuccess) return detail::fail(e);
  }
  return Status::ok;
}

Status fwht_checked(float* x, int64_t rows, int64_t n, const float* signs, bool inverse,
                    void* stream) {
  if (rows < 0 || n <= 0 || n > kMaxLength) return Status::bad_size;
  if (!is_power_of_two(n)) return Status::not_power_of_two;
  if (rows == 0) return Status::ok;
  if (!x) return Status::null_pointer;
  if (rows > INT64_MAX / n) return Status::bad_size;  // rows * n indexes x
  if (!detail::aligned(x, sizeof(float)) || !detail::aligned(signs, sizeof(float)))
    return Status::bad_pointer;
  detail::DeviceInfo dev{};
  Status st = detail::device_info(&dev);
  if (st != Status::ok) return st;
  const FwhtPlan plan = plan_fwht(rows, n, fwht_max_smem_n(dev.smem_optin));
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  auto* s = static_cast<cudaStream_t>(stream);
  const bool has_signs = signs != nullptr;

  const int64_t sub_rows = rows * plan.n1;
  const int64_t grid1 = (sub_rows + plan.rows_per_cta - 1) / plan.rows_per_cta;
  if (grid1 > detail::kMaxGridX) return Status::bad_size;
  st = set_smem(reinterpret_cast<const void*>(&fwht_rows_kernel), plan.smem_bytes_rows, dev);
  if (st != Status::ok) return st;
  fwht_rows_kernel<<<static_cast<unsigned>(grid1), kFwhtThreads,
                     static_cast<size_t>(plan.smem_bytes_rows), s>>>(
      x, sub_rows, log2_int(plan.n2), static_cast<int>(plan.rows_per_cta), signs, plan.n1,
      has_signs && !inverse, has_signs && inverse && !plan.two_pass,
      plan.two_pass ? 1.0f : scale);
  st = detail::check_launch();
  if (st != Status::ok || !plan.two_pass) return st;

  const int64_t tiles = plan.n2 / plan.cols_per_cta;
  const int64_t grid2 = rows * tiles;
  if (grid2 > detail::kMaxGridX) return Status::bad_size;
  st = set_smem(reinterpret_cast<const void*>(&fwht_cols_kernel), plan.smem_bytes_cols, dev);
  if (st != Status::ok) return st;
  fwht_cols_kernel<<<static_cast<unsigned>(grid2), kFwhtThreads,
                     static_cast<size_t>(plan.smem_bytes_cols), s>>>(
      x, static_cast<int>(plan.n1), plan.n2, log2_int(plan.cols_per_cta), tiles, signs,
      has_signs && inverse, scale);
  return detail::check_launch();
}

}  // namespace

Status fwht(float* x, int64_t rows, int64_t n, const float* signs, bool inverse,
            void* stream) noexcept {
  return sdq::detail::guarded([&] { return fwht_checked(x, rows, n, signs, inverse, stream); });
}

}  // namespace sdq::cuda
