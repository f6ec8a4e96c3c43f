// Per-token activation transform of the add-only path (gemv.h): rotate each block with the
// signed FWHT, then project it with D^T onto the M code positions. Done once per token and shared
// by every output row, so it is cheap next to the GEMM; it may multiply.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

#include "guard.h"
#include "parallel.h"
#include "scratch.h"
#include "sdq/gemv.h"

namespace sdq {
namespace {

// The projection is most of the work; let the compiler emit wide-vector clones of it, picked by
// the loader for this CPU, since the build itself targets baseline x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define SDQ_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SDQ_VECTOR_CLONES
#endif

constexpr int64_t kTokens = 16;  // tokens projected together: each row of D is read once for all
// The least work worth a chunk of its own, in multiply-adds of the projection (~4 us: batch 1 of
// a 576-wide layer, 147k MACs, took 9.9 us here): a worker spinning between jobs joins within
// ~1-3 us (thread_pool.cpp), so batch 1 of a 576-wide layer splits in two.
constexpr double kMinChunkMacs = 1 << 16;

// out_t[j] = sum_i down[i, j] * v_t[i] for `tokens` vectors v_t (stride padded) and outputs out_t
// (stride out_stride): row-by-row accumulation so the inner loop is contiguous, and each row of D
// is used by every token while it is in L1.
SDQ_VECTOR_CLONES void project(const float* __restrict down, int64_t padded, int64_t m,
                               const float* __restrict v, int64_t tokens,
                               float* __restrict out, int64_t out_stride) noexcept {
  for (int64_t t = 0; t < tokens; ++t) std::fill(out + t * out_stride, out + t * out_stride + m, 0.0f);
  for (int64_t i = 0; i < padded; ++i) {
    const float* __restrict d = down + i * m;
    for (int64_t t = 0; t < tokens; ++t) {
      const float vi = v[t * padded + i];
      float* __restrict o = out + t * out_stride;
      for (int64_t j = 0; j < m; ++j) o[j] += d[j] * vi;
    }
  }
}

float block_sum(const float* v, int64_t n) noexcept {
  double s = 0.0;  // a few hundred terms; double keeps xsum at least as exact as the reference
  for (int64_t i = 0; i < n; ++i) s += v[i];
  return static_cast<float>(s);
}

// Block b of tokens [t0, t1): pad, rotate, project; writes the block's slices of xt and xsum.
Status transform_block(const BlockLayout& L, int64_t b, int64_t t0, int64_t t1, bool hadamard,
                       const float* signs, const float* down, const float* x, float* xt,
                       float* xsum, float* buf) noexcept {
  const int64_t width = L.width(b), padded = L.padded(b), m = L.m(b), n = t1 - t0;
  const int64_t cols = L.total_code_cols(), nb = L.num_blocks();
  for (int64_t t = 0; t < n; ++t) {
    float* v = buf + t * padded;
    std::memcpy(v, x + (t0 + t) * L.in_features + L.start(b), sizeof(float) * width);
    std::fill(v + width, v + padded, 0.0f);
  }
  if (hadamard) {
    const Status s = fwht(buf, n, padded, signs, /*inverse=*/false, /*threads=*/1);
    if (s != Status::ok) return s;
  }
  // Project into a dense scratch: rows of xt lie a multiple of 4 KiB apart, so accumulating in
  // place would put every token's output in the same L1 sets.
  float* acc = buf + n * padded;
  project(down, padded, m, buf, n, acc, m);
  for (int64_t t = 0; t < n; ++t) {
    float* dst = xt + (t0 + t) * cols + L.code_offset(b);
    std::memcpy(dst, acc + t * m, sizeof(float) * m);
    std::fill(dst + m, dst + L.code_cols(b), 0.0f);  // padding codes must meet zeros
    xsum[(t0 + t) * nb + b] = block_sum(buf + t * padded, padded);
  }
  return Status::ok;
}

Status transform_checked(const BlockLayout& L, bool hadamard, const float* signs,
                         const float* down_full, const float* down_last, const float* x,
                         int64_t batch, float* xt, float* xsum, int threads) {
  if (!L.valid() || batch < 0) return Status::bad_size;
  if (batch == 0) return Status::ok;
  if (!x || !xt || !xsum || !down_last) return Status::null_pointer;
  const int64_t nb = L.num_blocks();
  if (nb > 1 && !down_full) return Status::null_pointer;
  const int64_t chunks = (batch + kTokens - 1) / kTokens, tokens = std::min(batch, kTokens);
  // A unit is one block of one token chunk; double: a huge layout must not overflow the estimate.
  const double unit_macs = static_cast<double>(tokens) * static_cast<double>(L.padded(0)) *
                           static_cast<double>(L.m(0));
  const int64_t grain =
      unit_macs >= kMinChunkMacs ? 1 : static_cast<int64_t>(std::ceil(kMinChunkMacs / unit_macs));
  std::atomic<Status> result{Status::ok};
  detail::parallel_for(nb * chunks, threads, grain, [&](int64_t begin, int64_t end) {
    // Reused per thread; transform_block writes every element before reading it.
    float* buf = detail::scratch<float>(detail::ScratchSlot::transform,
                                        tokens * (L.padded(0) + L.m(0)));
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / chunks, t0 = (u % chunks) * kTokens;
      const float* down = b == nb - 1 ? down_last : down_full;
      const Status s = transform_block(L, b, t0, std::min(batch, t0 + kTokens), hadamard, signs,
                                       down, x, xt, xsum, buf);
      if (s != Status::ok) {
        result.store(s);
        return;
      }
    }
  });
  return result.load();
}

}  // namespace

Status activation_transform(const BlockLayout& L, bool hadamard, const float* signs,
                            const float* down_full, const float* down_last, const float* x,
                            int64_t batch, float* xt, float* xsum, int threads) noexcept {
  return detail::guarded([&] {
    return transform_checked(L, hadamard, signs, down_full, down_last, x, batch, xt, xsum,
                             threads);
  });
}

}  // namespace sdq
