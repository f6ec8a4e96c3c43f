// Batched in-place Walsh-Hadamard transform (fwht.h). Rows are independent; each is transformed
// with the iterative butterfly whose inner loop runs over contiguous memory and vectorises.
#include "sdq/fwht.h"

#include <cmath>

#include "guard.h"
#include "parallel.h"

namespace sdq {
namespace {

constexpr int64_t kMaxLength = int64_t{1} << 24;

void butterflies(float* __restrict x, int64_t n) noexcept {
  for (int64_t h = 1; h < n; h <<= 1) {
    for (int64_t i = 0; i < n; i += 2 * h) {
      float* __restrict a = x + i;
      float* __restrict b = x + i + h;
      for (int64_t j = 0; j < h; ++j) {
        const float u = a[j], v = b[j];
        a[j] = u + v;
        b[j] = u - v;
      }
    }
  }
}

void scale_and_sign(float* __restrict x, int64_t n, const float* __restrict signs,
                    float scale) noexcept {
  if (signs) {
    for (int64_t j = 0; j < n; ++j) x[j] *= signs[j] * scale;
  } else if (scale != 1.0f) {
    for (int64_t j = 0; j < n; ++j) x[j] *= scale;
  }
}

Status fwht_checked(float* x, int64_t rows, int64_t n, const float* signs, bool inverse,
                    int threads) {
  if (rows < 0 || n <= 0 || n > kMaxLength) return Status::bad_size;
  if (!is_power_of_two(n)) return Status::not_power_of_two;
  if (rows == 0) return Status::ok;
  if (!x) return Status::null_pointer;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  // Small rows: give each chunk many of them so waking a pool worker is paid back.
  const int64_t grain = n >= 4096 ? 1 : 4096 / n;
  detail::parallel_for(rows, threads, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = x + r * n;
      if (!inverse) scale_and_sign(row, n, signs, 1.0f);
      butterflies(row, n);
      scale_and_sign(row, n, inverse ? signs : nullptr, scale);
    }
  });
  return Status::ok;
}

}  // namespace

Status fwht(float* x, int64_t rows, int64_t n, const float* signs, bool inverse,
            int threads) noexcept {
  return detail::guarded([&] { return fwht_checked(x, rows, n, signs, inverse, threads); });
}

}  // namespace sdq
