// Per-token activation transform of the add-only path (gemv.h): rotate each block with the
// signed FWHT, then project it with D^T onto the M code positions. Done once per token and shared
// by every output row, so it is cheap next to the GEMM; it may multiply.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "sdq/gemv.h"

namespace sdq {
namespace {

// out[j] = sum_i down[i, j] * v[i]: row-by-row accumulation so the inner loop is contiguous.
void project(const float* __restrict down, int64_t padded, int64_t m, const float* __restrict v,
             float* __restrict out) noexcept {
  std::fill(out, out + m, 0.0f);
  for (int64_t i = 0; i < padded; ++i) {
    const float vi = v[i];
    if (vi == 0.0f) continue;  // zero padding of a short block
    const float* __restrict d = down + i * m;
    for (int64_t j = 0; j < m; ++j) out[j] += d[j] * vi;
  }
}

// One (token, block): pad, rotate, project; writes the block's slice of xt and its xsum.
Status transform_block(const BlockLayout& L, int64_t b, bool hadamard, const float* signs,
                       const float* down, const float* x_row, float* xt_row, float* buf) noexcept {
  const int64_t width = L.width(b), padded = L.padded(b), m = L.m(b);
  std::memcpy(buf, x_row + L.start(b), static_cast<size_t>(width) * sizeof(float));
  std::fill(buf + width, buf + padded, 0.0f);
  if (hadamard) {
    const Status s = fwht(buf, 1, padded, signs, /*inverse=*/false, /*threads=*/1);
    if (s != Status::ok) return s;
  }
  float* dst = xt_row + L.code_offset(b);
  project(down, padded, m, buf, dst);
  std::fill(dst + m, dst + L.code_cols(b), 0.0f);  // padding codes must meet zeros
  return Status::ok;
}

float block_sum(const float* v, int64_t n) noexcept {
  double s = 0.0;  // a few hundred terms; double keeps xsum at least as exact as the reference
  for (int64_t i = 0; i < n; ++i) s += v[i];
  return static_cast<float>(s);
}

}  // namespace

Status activation_transform(const BlockLayout& L, bool hadamard, const float* signs,
                            const float* down_full, const float* down_last, const float* x,
                            int64_t batch, float* xt, float* xsum, int threads) noexcept {
  if (!L.valid() || batch < 0) return Status::bad_size;
  if (batch == 0) return Status::ok;
  if (!x || !xt || !xsum || !down_last) return Status::null_pointer;
  const int64_t nb = L.num_blocks();
  if (nb > 1 && !down_full) return Status::null_pointer;
  const int64_t cols = L.total_code_cols();
  const int64_t units = batch * nb;
  std::atomic<Status> result{Status::ok};
  detail::parallel_for(units, threads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(static_cast<size_t>(L.padded(0)));
    for (int64_t u = begin; u < end; ++u) {
      const int64_t t = u / nb, b = u % nb;
      const float* down = b == nb - 1 ? down_last : down_full;
      const Status s = transform_block(L, b, hadamard, signs, down, x + t * L.in_features,
                                       xt + t * cols, buf.data());
      if (s != Status::ok) {
        result.store(s);
        return;
      }
      xsum[t * nb + b] = block_sum(buf.data(), L.padded(b));
    }
  });
  return result.load();
}

}  // namespace sdq
