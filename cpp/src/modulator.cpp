// Sigma-Delta modulator (modulator.h).
//
// Rows are independent chains, so a thread takes tiles of kLanes rows and runs them in lock-step:
// the tile is transposed into [column][lane] order so the per-sample update is a short loop over
// lanes that the compiler turns into SIMD (compares become blends). Columns are processed in
// chunks so the transposed tile stays in L1; the chain state is carried across chunks.
#include "sdq/modulator.h"

#include <algorithm>
#include <cstring>

#include "guard.h"
#include "isa.h"
#include "modulator_lanes.h"
#include "parallel.h"

namespace sdq {
namespace {

using detail::ModState;
constexpr int64_t kLanes = detail::kModLanes;
constexpr int64_t kChunk = 128;

// The lanes as one GCC vector: the compiler lowers it to SSE, AVX2 or AVX-512 registers.
typedef float lanes_f __attribute__((vector_size(kLanes * sizeof(float))));
typedef int8_t lanes_i8 __attribute__((vector_size(kLanes)));

template <int Order, bool Ternary>
__attribute__((always_inline)) inline void run_chunk_impl(const float* __restrict zt,
                                                          int64_t cols, ModState& s,
                                                          int8_t* __restrict ct) {
  lanes_f v1, v2, q, tau;
  std::memcpy(&v1, s.v1, sizeof v1);
  std::memcpy(&v2, s.v2, sizeof v2);
  std::memcpy(&q, s.q, sizeof q);
  std::memcpy(&tau, s.tau, sizeof tau);
  const lanes_f one = lanes_f{} + 1.0f, zero = lanes_f{};
  for (int64_t n = 0; n < cols; ++n) {
    lanes_f z;
    std::memcpy(&z, zt + n * kLanes, sizeof z);
    v1 += z - q;  // same float32 operations, in the same order, as the reference
    lanes_f v = v1;
    if (Order == 2) {
      v2 += v1 - q;
      v = v2;
    }
    if (Ternary) {
      q = v >= tau ? one : (v <= -tau ? -one : zero);
    } else {
      q = v > zero ? one : -one;
    }
    const lanes_i8 c = __builtin_convertvector(q, lanes_i8);
    std::memcpy(ct + n * kLanes, &c, sizeof c);
  }
  std::memcpy(s.v1, &v1, sizeof v1);
  std::memcpy(s.v2, &v2, sizeof v2);
  std::memcpy(s.q, &q, sizeof q);
}

// Modulates rows [r0, r0 + lanes) (lanes <= kLanes); missing lanes run on zeros and are dropped.
void run_tile(const float* z, int64_t z_stride, const float* tau, int64_t r0, int64_t lanes,
              int64_t m, int order, bool ternary, int8_t* codes) {
  alignas(64) float zt[kChunk * kLanes];
  alignas(64) int8_t ct[kChunk * kLanes];
  ModState s;
  for (int64_t l = 0; l < lanes; ++l) s.tau[l] = tau ? tau[r0 + l] : 0.0f;
  for (int64_t c0 = 0; c0 < m; c0 += kChunk) {
    const int64_t cols = std::min(kChunk, m - c0);
    if (lanes < kLanes) std::fill(zt, zt + kChunk * kLanes, 0.0f);
    for (int64_t l = 0; l < lanes; ++l) {
      const float* src = z + (r0 + l) * z_stride + c0;
      for (int64_t n = 0; n < cols; ++n) zt[n * kLanes + l] = src[n];
    }
    detail::modulate_lanes(zt, cols, s, ct, order, ternary);
    for (int64_t l = 0; l < lanes; ++l) {
      int8_t* dst = codes + (r0 + l) * m + c0;
      for (int64_t n = 0; n < cols; ++n) dst[n] = ct[n * kLanes + l];
    }
  }
}

Status modulate_checked(const float* z, int64_t rows, int64_t m, int64_t z_stride,
                        const float* tau, int order, Levels levels, int8_t* codes, int threads) {
  if (order != 1 && order != 2) return Status::bad_order;
  if (levels != Levels::binary && levels != Levels::ternary) return Status::bad_levels;
  if (rows < 0 || m < 0 || z_stride < m) return Status::bad_size;
  if (rows == 0 || m == 0) return Status::ok;
  if (!z || !codes || (levels == Levels::ternary && !tau)) return Status::null_pointer;
  const int64_t tiles = (rows + kLanes - 1) / kLanes;
  detail::parallel_for(tiles, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = t * kLanes;
      run_tile(z, z_stride, tau, r0, std::min(kLanes, rows - r0), m, order,
               levels == Levels::ternary, codes);
    }
  });
  return Status::ok;
}

}  // namespace

namespace detail {

// One non-template entry so GCC can clone it per instruction set and pick at load time.
SDQ_CLONES_X86 void modulate_lanes(
    const float* zt, int64_t cols, ModState& s, int8_t* ct, int order, bool ternary) noexcept {
  if (order == 1) {
    ternary ? run_chunk_impl<1, true>(zt, cols, s, ct) : run_chunk_impl<1, false>(zt, cols, s, ct);
  } else {
    ternary ? run_chunk_impl<2, true>(zt, cols, s, ct) : run_chunk_impl<2, false>(zt, cols, s, ct);
  }
}

}  // namespace detail

Status sigma_delta_modulate(const float* z, int64_t rows, int64_t m, int64_t z_stride,
                            const float* tau, int order, Levels levels, int8_t* codes,
                            int threads) noexcept {
  return detail::guarded([&] {
    return modulate_checked(z, rows, m, z_stride, tau, order, levels, codes, threads);
  });
}

}  // namespace sdq
