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

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SDQ_FWHT_AVX2 1
#include <immintrin.h>

// The butterflies' first three stages (h = 1, 2, 4) inside one vector of 8 lanes, as
// s + x * (+-1), s = x with lanes swapped (exact: each is one rounding of u + v or u - v, as
// above).
__attribute__((target("avx2,fma"))) inline __m256 stages_in_vector(__m256 v) noexcept {
  const __m256 sign1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
  const __m256 sign2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
  const __m256 sign4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
  v = _mm256_fmadd_ps(v, sign1, _mm256_permute_ps(v, 0xB1));  // swap neighbours
  v = _mm256_fmadd_ps(v, sign2, _mm256_permute_ps(v, 0x4E));  // swap pairs
  return _mm256_fmadd_ps(v, sign4, _mm256_permute2f128_ps(v, v, 0x01));  // swap halves
}

// The same butterflies (same sums, bit for bit) 8 lanes at a time, for n >= 8: the stages inside
// each vector, then those across vectors.
__attribute__((target("avx2,fma"))) void butterflies_avx2(float* __restrict x, int64_t n) noexcept {
  for (int64_t i = 0; i < n; i += 8)
    _mm256_storeu_ps(x + i, stages_in_vector(_mm256_loadu_ps(x + i)));
  for (int64_t h = 8; h < n; h <<= 1)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; j += 8) {
        const __m256 u = _mm256_loadu_ps(x + j), v = _mm256_loadu_ps(x + j + h);
        _mm256_storeu_ps(x + j, _mm256_add_ps(u, v));
        _mm256_storeu_ps(x + j + h, _mm256_sub_ps(u, v));
      }
}

// A whole row of n = 8R <= 128 in R registers: the signs, butterflies_avx2's stages in its order
// and the scale of fwht_checked, with one load and one store per element instead of one per stage
// (the same operations on the same values: bit for bit the same result).
template <int R>
__attribute__((target("avx2,fma"))) void row_in_registers(float* __restrict x,
                                                          const float* __restrict signs,
                                                          bool inverse, float scale) noexcept {
  __m256 v[R];
  for (int r = 0; r < R; ++r) {
    v[r] = _mm256_loadu_ps(x + 8 * r);
    if (signs && !inverse) v[r] = _mm256_mul_ps(v[r], _mm256_loadu_ps(signs + 8 * r));
    v[r] = stages_in_vector(v[r]);
  }
  for (int h = 1; h < R; h <<= 1)
    for (int i = 0; i < R; i += 2 * h)
      for (int j = i; j < i + h; ++j) {
        const __m256 u = v[j], w = v[j + h];
        v[j] = _mm256_add_ps(u, w);
        v[j + h] = _mm256_sub_ps(u, w);
      }
  const __m256 s = _mm256_set1_ps(scale);
  for (int r = 0; r < R; ++r) {
    // scale_and_sign's x * (sign * scale): the sign times the scale first, as there
    const __m256 f = signs && inverse ? _mm256_mul_ps(_mm256_loadu_ps(signs + 8 * r), s) : s;
    _mm256_storeu_ps(x + 8 * r, _mm256_mul_ps(v[r], f));
  }
}

bool has_avx2() noexcept {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

// Whether row_in_registers took the row (n = 8 .. 128 on an AVX2 CPU).
bool row_avx2(float* x, int64_t n, const float* signs, bool inverse, float scale) noexcept {
  if (!has_avx2()) return false;
  switch (n) {
    case 8: row_in_registers<1>(x, signs, inverse, scale); return true;
    case 16: row_in_registers<2>(x, signs, inverse, scale); return true;
    case 32: row_in_registers<4>(x, signs, inverse, scale); return true;
    case 64: row_in_registers<8>(x, signs, inverse, scale); return true;
    case 128: row_in_registers<16>(x, signs, inverse, scale); return true;
    default: return false;
  }
}
#endif

void transform_row(float* x, int64_t n) noexcept {
#ifdef SDQ_FWHT_AVX2
  if (n >= 8 && has_avx2()) return butterflies_avx2(x, n);
#endif
  butterflies(x, n);
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
#ifdef SDQ_FWHT_AVX2
      if (row_avx2(row, n, signs, inverse, scale)) continue;
#endif
      if (!inverse) scale_and_sign(row, n, signs, 1.0f);
      transform_row(row, n);
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
