// Code selection and refinement against a Gram matrix (gram_codes.h).
//
// Like the modulator, a thread takes tiles of kLanes rows of one group and runs them in lock-step,
// transposed to [sample][lane] so that every update is a loop over lanes the compiler turns into
// SIMD. The whole transposed tile (m x kLanes floats, 16 KiB at m = 256) stays in L1 while the
// factor's row j streams past it. Built with -ffp-contract=off (CMakeLists.txt): a fused
// multiply-add would round differently from the reference.
#include "sdq/gram_codes.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "guard.h"
#include "isa.h"
#include "parallel.h"

namespace sdq {
namespace {

constexpr int64_t kLanes = 16;
typedef float lanes_f __attribute__((vector_size(kLanes * sizeof(float))));

// Unaligned loads and stores of a lane vector (the scratch is a plain float buffer).
__attribute__((always_inline)) inline lanes_f load(const float* p) {
  lanes_f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
__attribute__((always_inline)) inline void store(float* p, lanes_f v) {
  std::memcpy(p, &v, sizeof v);
}

// Tiles per parallel chunk: a tile costs ~m^2 / 2 lane updates, and a chunk should be worth tens
// of microseconds.
int64_t tiles_per_chunk(int64_t m) {
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, m * m / 64));
}

// One tile: rows r0 .. r0+lanes-1 of one group, factor U, transposed scratch zt [m][kLanes].
template <bool Ternary>
__attribute__((always_inline)) inline void run_tile(const float* z, const float* U,
                                                    const float* tau, int64_t r0, int64_t lanes,
                                                    int64_t m, float* codes, float* zt) {
  float tau_lanes[kLanes] = {};
  std::fill(zt, zt + m * kLanes, 0.0f);
  for (int64_t l = 0; l < lanes; ++l) {
    if (Ternary) tau_lanes[l] = tau[r0 + l];
    const float* src = z + (r0 + l) * m;
    for (int64_t j = 0; j < m; ++j) zt[j * kLanes + l] = src[j];
  }
  const lanes_f tv = load(tau_lanes), one = lanes_f{} + 1.0f, zero = lanes_f{};
  for (int64_t j = 0; j < m; ++j) {
    const float* row = U + j * m;
    const lanes_f v = load(zt + j * kLanes);
    const lanes_f q = Ternary ? (v >= tv ? one : (v <= -tv ? -one : zero))
                              : (v > zero ? one : -one);
    const float inv = 1.0f / row[j];
    const lanes_f e = (v - q) * inv;
    store(zt + j * kLanes, q);  // sample j is decided: its slot now holds the code
    for (int64_t k = j + 1; k < m; ++k) {
      const lanes_f t = row[k] * e;
      store(zt + k * kLanes, load(zt + k * kLanes) - t);
    }
  }
  for (int64_t l = 0; l < lanes; ++l) {
    float* dst = codes + (r0 + l) * m;
    for (int64_t j = 0; j < m; ++j) dst[j] = zt[j * kLanes + l];
  }
}

// One tile of a refinement pass: rows r0 .. r0+lanes-1 (all active), scratch qt and ht [m][kLanes].
template <bool Ternary>
__attribute__((always_inline)) inline void refine_tile(float* q, float* h, const float* G,
                                                       const int64_t* rows, int64_t lanes,
                                                       int64_t m, float* qt, float* ht) {
  std::fill(qt, qt + m * kLanes, 0.0f);
  std::fill(ht, ht + m * kLanes, 0.0f);  // padding lanes: h = 0 never moves a code
  for (int64_t l = 0; l < lanes; ++l) {
    const float *qs = q + rows[l] * m, *hs = h + rows[l] * m;
    for (int64_t j = 0; j < m; ++j) {
      qt[j * kLanes + l] = qs[j];
      ht[j * kLanes + l] = hs[j];
    }
  }
  const lanes_f one = lanes_f{} + 1.0f, zero = lanes_f{};
  for (int64_t j = 0; j < m; ++j) {
    const float* row = G + j * m;
    const float g = row[j];
    if (!(g > 0.0f)) continue;  // the weighting cannot see this sample: leave it
    const lanes_f qj = load(qt + j * kLanes), hj = load(ht + j * kLanes);
    lanes_f d;
    if (Ternary) {
      const float a = static_cast<float>(-1.0 / static_cast<double>(g));
      const lanes_f t = qj + hj * a;
      lanes_f r;
      for (int64_t l = 0; l < kLanes; ++l) r[l] = std::nearbyint(t[l]);  // half to even
      r = r > one ? one : (r < -one ? -one : r);
      d = r - qj;
    } else {
      d = qj * hj > g ? qj * -2.0f : zero;
    }
    store(qt + j * kLanes, qj + d);
    for (int64_t k = j + 1; k < m; ++k) {
      const lanes_f t = row[k] * d;
      store(ht + k * kLanes, load(ht + k * kLanes) + t);
    }
  }
  for (int64_t l = 0; l < lanes; ++l) {
    float* dst = q + rows[l] * m;
    for (int64_t j = 0; j < m; ++j) dst[j] = qt[j * kLanes + l];
  }
}

// One non-template entry per loop so GCC can clone it per instruction set and pick at load time.
SDQ_CLONES_X86 void refine(
    float* q, float* h, const float* G, const int64_t* rows, int64_t lanes, int64_t m, float* qt,
    float* ht, bool ternary) {
  ternary ? refine_tile<true>(q, h, G, rows, lanes, m, qt, ht)
          : refine_tile<false>(q, h, G, rows, lanes, m, qt, ht);
}

SDQ_CLONES_X86 void tile(
    const float* z, const float* U, const float* tau, int64_t r0, int64_t lanes, int64_t m,
    float* codes, float* zt, bool ternary) {
  ternary ? run_tile<true>(z, U, tau, r0, lanes, m, codes, zt)
          : run_tile<false>(z, U, tau, r0, lanes, m, codes, zt);
}

Status select_checked(const float* z, int64_t groups, int64_t n, int64_t m, const float* hinv,
                      const float* tau, Levels levels, float* codes, int threads) {
  if (levels != Levels::binary && levels != Levels::ternary) return Status::bad_levels;
  if (groups < 0 || n < 0 || m < 0) return Status::bad_size;
  if (groups == 0 || n == 0 || m == 0) return Status::ok;
  if (!z || !hinv || !codes || (levels == Levels::ternary && !tau)) return Status::null_pointer;
  const int64_t tiles_per_group = (n + kLanes - 1) / kLanes;
  const int64_t grain = tiles_per_chunk(m);
  detail::parallel_for(groups * tiles_per_group, threads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> zt(static_cast<size_t>(m * kLanes));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t g = t / tiles_per_group, r0 = g * n + (t % tiles_per_group) * kLanes;
      const int64_t lanes = std::min(kLanes, (g + 1) * n - r0);
      const float* U = hinv + g * m * m;
      tile(z, U, tau, r0, lanes, m, codes, zt.data(), levels == Levels::ternary);
    }
  });
  return Status::ok;
}

Status refine_checked(float* q, float* h, int64_t n, int64_t m, const float* G,
                      const uint8_t* active, Levels levels, int threads) {
  if (levels != Levels::binary && levels != Levels::ternary) return Status::bad_levels;
  if (n < 0 || m < 0) return Status::bad_size;
  if (n == 0 || m == 0) return Status::ok;
  if (!q || !h || !G) return Status::null_pointer;
  std::vector<int64_t> rows;  // the active rows, in order: tiles of kLanes of them
  rows.reserve(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r)
    if (!active || active[r]) rows.push_back(r);
  const int64_t count = static_cast<int64_t>(rows.size());
  const int64_t tiles = (count + kLanes - 1) / kLanes;
  const int64_t grain = tiles_per_chunk(m);
  detail::parallel_for(tiles, threads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qt(static_cast<size_t>(m * kLanes)), ht(qt.size());
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first = t * kLanes;
      refine(q, h, G, rows.data() + first, std::min(kLanes, count - first), m, qt.data(),
             ht.data(), levels == Levels::ternary);
    }
  });
  return Status::ok;
}

}  // namespace

Status gram_refine_pass(float* q, float* h, int64_t n, int64_t m, const float* G,
                        const uint8_t* active, Levels levels, int threads) noexcept {
  return detail::guarded([&] {
    return refine_checked(q, h, n, m, G, active, levels, threads);
  });
}

Status gram_select_codes(const float* z, int64_t groups, int64_t n, int64_t m, const float* hinv,
                         const float* tau, Levels levels, float* codes, int threads) noexcept {
  return detail::guarded([&] {
    return select_checked(z, groups, n, m, hinv, tau, levels, codes, threads);
  });
}

}  // namespace sdq
