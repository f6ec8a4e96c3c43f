// Internal (x86): rows of fp16 scales and means as SSE vectors, for the SIMD scale transposes of
// the table GEMMs (lut_gemm_avx2.cpp, trit5_gemm_avx2.cpp).
#pragma once
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <emmintrin.h>

#include <cstdint>
#include <cstring>

namespace sdq::detail {

// src[at .. at + n) (n <= 8) of a matrix of `total` fp16 values, in the low lanes. Loading all 8
// may run into the next row (lanes the caller does not store); only where it would run past the
// matrix are the n values copied out first (the other lanes zero).
inline __m128i load_fp16x8(const uint16_t* src, int64_t at, int64_t total, int64_t n) noexcept {
  if (at + 8 <= total) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + at));
  alignas(16) uint16_t row[8] = {};
  std::memcpy(row, src + at, static_cast<size_t>(n) * sizeof(uint16_t));
  return _mm_load_si128(reinterpret_cast<const __m128i*>(row));
}

}  // namespace sdq::detail
#endif
