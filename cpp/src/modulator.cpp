// Sigma-Delta modulator (modulator.h).
//
// Rows are independent chains, so a thread takes tiles of kLanes rows and runs them in lock-step:
// the tile is transposed into [column][lane] order so the per-sample update is a short loop over
// lanes that the compiler turns into SIMD (compares become blends). Columns are processed in
// chunks so the transposed tile stays in L1; the chain state is carried across chunks.
#include "sdq/modulator.h"

#include <algorithm>
#include <cstring>

#include "parallel.h"

namespace sdq {
namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kChunk = 128;

struct TileState {
  float v1[kLanes] = {};
  float v2[kLanes] = {};
  float q[kLanes] = {};
  float tau[kLanes] = {};
};

template <int Order, bool Ternary>
void run_chunk(const float* __restrict zt, int64_t cols, TileState& s, int8_t* __restrict ct) {
  float v1[kLanes], v2[kLanes], q[kLanes], tau[kLanes];
  std::memcpy(v1, s.v1, sizeof v1);
  std::memcpy(v2, s.v2, sizeof v2);
  std::memcpy(q, s.q, sizeof q);
  std::memcpy(tau, s.tau, sizeof tau);
  for (int64_t n = 0; n < cols; ++n) {
    const float* zn = zt + n * kLanes;
    int8_t* cn = ct + n * kLanes;
    for (int64_t l = 0; l < kLanes; ++l) {
      v1[l] += zn[l] - q[l];
      float v = v1[l];
      if (Order == 2) {
        v2[l] += v1[l] - q[l];
        v = v2[l];
      }
      float out;
      if (Ternary) {
        out = v >= tau[l] ? 1.0f : (v <= -tau[l] ? -1.0f : 0.0f);
      } else {
        out = v > 0.0f ? 1.0f : -1.0f;
      }
      q[l] = out;
      cn[l] = static_cast<int8_t>(out);
    }
  }
  std::memcpy(s.v1, v1, sizeof v1);
  std::memcpy(s.v2, v2, sizeof v2);
  std::memcpy(s.q, q, sizeof q);
}

using ChunkFn = void (*)(const float*, int64_t, TileState&, int8_t*);

ChunkFn pick(int order, Levels levels) {
  const bool ternary = levels == Levels::ternary;
  if (order == 1) return ternary ? run_chunk<1, true> : run_chunk<1, false>;
  return ternary ? run_chunk<2, true> : run_chunk<2, false>;
}

// Modulates rows [r0, r0 + lanes) (lanes <= kLanes); missing lanes run on zeros and are dropped.
void run_tile(const float* z, int64_t z_stride, const float* tau, int64_t r0, int64_t lanes,
              int64_t m, ChunkFn fn, int8_t* codes) {
  alignas(64) float zt[kChunk * kLanes];
  alignas(64) int8_t ct[kChunk * kLanes];
  TileState s;
  for (int64_t l = 0; l < lanes; ++l) s.tau[l] = tau ? tau[r0 + l] : 0.0f;
  for (int64_t c0 = 0; c0 < m; c0 += kChunk) {
    const int64_t cols = std::min(kChunk, m - c0);
    if (lanes < kLanes) std::fill(zt, zt + kChunk * kLanes, 0.0f);
    for (int64_t l = 0; l < lanes; ++l) {
      const float* src = z + (r0 + l) * z_stride + c0;
      for (int64_t n = 0; n < cols; ++n) zt[n * kLanes + l] = src[n];
    }
    fn(zt, cols, s, ct);
    for (int64_t l = 0; l < lanes; ++l) {
      int8_t* dst = codes + (r0 + l) * m + c0;
      for (int64_t n = 0; n < cols; ++n) dst[n] = ct[n * kLanes + l];
    }
  }
}

}  // namespace

Status sigma_delta_modulate(const float* z, int64_t rows, int64_t m, int64_t z_stride,
                            const float* tau, int order, Levels levels, int8_t* codes,
                            int threads) noexcept {
  if (order != 1 && order != 2) return Status::bad_order;
  if (levels != Levels::binary && levels != Levels::ternary) return Status::bad_levels;
  if (rows < 0 || m < 0 || z_stride < m) return Status::bad_size;
  if (rows == 0 || m == 0) return Status::ok;
  if (!z || !codes || (levels == Levels::ternary && !tau)) return Status::null_pointer;
  const ChunkFn fn = pick(order, levels);
  const int64_t tiles = (rows + kLanes - 1) / kLanes;
  detail::parallel_for(tiles, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * kLanes;
      run_tile(z, z_stride, tau, r0, std::min(kLanes, rows - r0), m, fn, codes);
    }
  });
  return Status::ok;
}

}  // namespace sdq
