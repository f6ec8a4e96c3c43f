// Internal: IEEE binary16 (fp16) bits from and to float/double, rounding to nearest even, as
// torch's .half() does (the encoder stores scales and means in fp16; encode.cpp).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace sdq::detail {

inline uint16_t half_from_float(float f) noexcept {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (x >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (x < 0x38800000u) {  // below 2^-14: a subnormal half (or zero); 2^24 f is exact
    const float a = std::fabs(f) * 16777216.0f;
    return static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(a)));
  }
  x += 0xc8000fffu + ((x >> 13) & 1u);  // re-bias the exponent (127 -> 15) and round half even
  return static_cast<uint16_t>(sign | (x >> 13));
}

inline double half_to_double(uint16_t h) noexcept {
  const int e = (h >> 10) & 0x1f, mant = h & 0x3ff;
  double v;
  if (e == 0) v = std::ldexp(static_cast<double>(mant), -24);
  else if (e == 31) v = mant ? NAN : INFINITY;
  else v = std::ldexp(static_cast<double>(mant | 0x400), e - 25);
  return (h & 0x8000) ? -v : v;
}

// torch's double -> half: through float (c10::Half is built from a float).
inline uint16_t half_from_double(double d) noexcept {
  return half_from_float(static_cast<float>(d));
}

inline bool half_finite(uint16_t h) noexcept { return (h & 0x7c00) != 0x7c00; }

}  // namespace sdq::detail
