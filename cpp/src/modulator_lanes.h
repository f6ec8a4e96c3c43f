// Internal: the modulator's lock-step kernel (modulator.cpp), shared with the encoder (encode.cpp).
//
// kModLanes independent chains run side by side on a tile stored [column][lane]: zt[n * kModLanes
// + l] is sample n of chain l, and codes come out in the same layout. The chain state lives in
// ModState so a long chain can be fed in chunks that stay in L1.
#pragma once
#include <cstdint>

namespace sdq::detail {

constexpr int64_t kModLanes = 16;

struct ModState {
  float v1[kModLanes] = {};
  float v2[kModLanes] = {};
  float q[kModLanes] = {};
  float tau[kModLanes] = {};  // ternary thresholds per lane (unused for binary)
};

// Runs `cols` samples of every lane (modulator.h's recurrence, float32, same operation order).
void modulate_lanes(const float* zt, int64_t cols, ModState& s, int8_t* ct, int order,
                    bool ternary) noexcept;

}  // namespace sdq::detail
