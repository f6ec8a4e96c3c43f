// Per-token activation transform of the add-only path (gemv.h): rotate each block with the
// signed FWHT, then project it with D^T onto the M code positions. Done once per token and shared
// by every output row, so it is cheap next to the GEMM; it may multiply.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <vector>

#include "guard.h"
#include "parallel.h"
#include "project.h"
#include "scratch.h"
#include "sdq/amx_gemm.h"
#include "sdq/gemv.h"

namespace sdq {
namespace {

constexpr int64_t kTokens = 16;  // vectors projected together: each row of D is read once for all
// The bf16 AMX projection's chunk: its B tiles of 4 column tiles stay in L1 for 4 A tiles.
constexpr int64_t kTokensAmx = 64;
// The least work worth a chunk of its own, in multiply-adds of the projection (~1.5 us: batch 1
// of a 576-wide layer, 147k MACs, takes 3.2 us on one thread here): a worker joins within ~1-3 us
// (thread_pool.cpp; an OpenMP team likewise). Twice this kept 576-wide layers on one thread, and
// the default model's compiled decode step measured no faster for it.
constexpr double kMinChunkMacs = 1 << 16;

// In double (a few hundred terms: xsum at least as exact as the reference), in 8 running sums:
// one chain of dependent additions took as long as the rest of a prefill's transform.
float block_sum(const float* v, int64_t n) noexcept {
  double s[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) s[k] += v[i + k];
  for (; i < n; ++i) s[i % 8] += v[i];
  return static_cast<float>(((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])));
}

// The (block, token) vectors that share one down-sampler: group "full" holds every block but
// the last, of every token (vector v is block v % (nb - 1) of token v / (nb - 1): they all read
// down_full); group "last" holds the last block of every token. Projecting a group's vectors
// together reads its matrix once per kTokens vectors, not once per block: at batch 1 a 576-wide
// layer read down_full 4 times per call, a 4096-wide one 31 times, from L2.
struct Group {
  bool last;
  int64_t nfull;  // blocks in the full group per token (nb - 1)
  int64_t block(int64_t v, int64_t nb) const noexcept { return last ? nb - 1 : v % nfull; }
  int64_t token(int64_t v) const noexcept { return last ? v : v / nfull; }
};

// Vectors [v0, v1) of one group: pad, rotate, project; writes their slices of xt and xsum (and
// of x_copy, when not null), then hands each to the sink (when not null). Every vector of a
// group has the same padded width and code count (the full blocks are alike).
Status transform_vectors(const BlockLayout& L, const Group& g, int64_t v0, int64_t v1,
                         bool hadamard, const float* signs, detail::Projection proj,
                         const float* x, float* xt, float* xsum, float* x_copy,
                         const detail::VectorSink* sink, float* buf) noexcept {
  const int64_t nb = L.num_blocks(), cols = L.total_code_cols(), n = v1 - v0;
  const int64_t b0 = g.block(v0, nb), padded = L.padded(b0), m = L.m(b0);
  // where vector k's codes start in xt
  auto dst = [&](int64_t k) {
    const int64_t b = g.block(v0 + k, nb), t = g.token(v0 + k);
    return xt + t * cols + L.code_offset(b);
  };
  for (int64_t k = 0; k < n; ++k) {
    const int64_t b = g.block(v0 + k, nb), t = g.token(v0 + k), width = L.width(b);
    const float* src = x + t * L.in_features + L.start(b);
    float* v = buf + k * padded;
    std::memcpy(v, src, sizeof(float) * width);
    if (x_copy) std::memcpy(x_copy + (src - x), src, sizeof(float) * width);
    std::fill(v + width, v + padded, 0.0f);
  }
  if (hadamard) {
    const Status s = fwht(buf, n, padded, signs, /*inverse=*/false, /*threads=*/1);
    if (s != Status::ok) return s;
  }
  float* acc = buf + n * padded;
  if (proj.down_bf16) {  // straight into xt (its bf16 copy of the vectors after acc)
    float* rows[kTokensAmx];
    for (int64_t k = 0; k < n; ++k) rows[k] = dst(k);
    detail::project_amx(proj.down_bf16, padded, m, buf, n, rows,
                        reinterpret_cast<uint16_t*>(acc + n * m));
  } else {
    // Into a dense scratch, then xt: rows of xt lie a multiple of 4 KiB apart, so accumulating
    // in place would put every token's output in the same L1 sets.
    static const detail::ProjectFn project = detail::project_kernel();
    project(proj.down, padded, m, buf, n, acc, m);
    for (int64_t k = 0; k < n; ++k) std::memcpy(dst(k), acc + k * m, sizeof(float) * m);
  }
  for (int64_t k = 0; k < n; ++k) {
    const int64_t b = g.block(v0 + k, nb), t = g.token(v0 + k);
    std::fill(dst(k) + m, dst(k) + L.code_cols(b), 0.0f);  // padding codes must meet zeros
    xsum[t * nb + b] = block_sum(buf + k * padded, padded);
    if (sink) sink->fn(sink->ctx, xt + t * cols, t, b);
  }
  return Status::ok;
}

Status transform_checked(const BlockLayout& L, bool hadamard, const float* signs,
                         detail::Projection full_proj, detail::Projection last_proj,
                         const float* x, int64_t batch, float* xt, float* xsum, int threads,
                         float* x_copy, const detail::VectorSink* sink) {
  if (!L.valid() || batch < 0) return Status::bad_size;
  if (batch == 0) return Status::ok;
  if (!x || !xt || !xsum || !last_proj.down) return Status::null_pointer;
  const int64_t nb = L.num_blocks();
  if (nb > 1 && !full_proj.down) return Status::null_pointer;
  if ((full_proj.down_bf16 || last_proj.down_bf16) && !detail::project_amx_supported())
    return Status::not_built;
  // Vectors 0 .. full_vectors - 1 are the full group's, then the last group's (one per token):
  // each thread gets an equal run of them (at batch 1 of a 4096-wide layer, 31 + 1: a split by
  // whole chunks of kTokens gave one thread 31), projected kTokens at a time within a group.
  const Group full{false, nb - 1}, last{true, nb - 1};
  const int64_t full_vectors = batch * (nb - 1);
  const int64_t vectors = full_vectors + batch;
  // double: a huge layout must not overflow the estimate
  const double vector_macs = static_cast<double>(L.padded(0)) * static_cast<double>(L.m(0));
  const int64_t grain = detail::grain_for(kMinChunkMacs, vector_macs);
  // Per thread: a chunk of vectors, their projections and (bf16) project_amx's copy of the
  // vectors. Block 0 is the widest (the last one may be narrower).
  const bool amx = full_proj.down_bf16 || last_proj.down_bf16;
  const int64_t chunk = amx ? kTokensAmx : kTokens;
  const int64_t amx_floats =
      amx ? (detail::project_amx_scratch_size(L.padded(0), chunk) + 1) / 2 : 0;
  const int64_t buf_floats = chunk * (L.padded(0) + L.m(0)) + amx_floats;
  std::atomic<Status> result{Status::ok};
  detail::parallel_for(vectors, threads, grain, [&](int64_t begin, int64_t end) {
    // Reused per thread; transform_vectors writes every element before reading it.
    float* buf = detail::scratch<float>(detail::ScratchSlot::transform, buf_floats);
    for (int64_t v = begin; v < end;) {
      const bool in_full = v < full_vectors;
      const int64_t group_end = in_full ? std::min(end, full_vectors) : end;
      const int64_t v1 = std::min(group_end, v + chunk);
      const int64_t base = in_full ? 0 : full_vectors;  // the group's first vector
      const Status s = transform_vectors(L, in_full ? full : last, v - base, v1 - base, hadamard,
                                         signs, in_full ? full_proj : last_proj, x, xt, xsum,
                                         x_copy, sink, buf);
      if (s != Status::ok) {
        result.store(s);
        return;
      }
      v = v1;
    }
  });
  return result.load();
}

}  // namespace

Status activation_transform(const BlockLayout& L, bool hadamard, const float* signs,
                            const float* down_full, const float* down_last, const float* x,
                            int64_t batch, float* xt, float* xsum, int threads) noexcept {
  return detail::activation_transform_projected(L, hadamard, signs, {down_full, nullptr},
                                                {down_last, nullptr}, x, batch, xt, xsum, threads);
}

bool activation_transform_bf16_supported() noexcept { return detail::project_amx_supported(); }

Status activation_transform_bf16(const BlockLayout& L, bool hadamard, const float* signs,
                                 const float* down_full, const float* down_last, const float* x,
                                 int64_t batch, float* xt, float* xsum, int threads) noexcept {
  if (!L.valid() || batch < 0) return Status::bad_size;
  if (!detail::project_amx_supported()) return batch == 0 ? Status::ok : Status::not_built;
  return detail::guarded([&] {
    const int64_t last = L.num_blocks() - 1;
    const std::vector<uint16_t> full =
        last > 0 ? detail::project_amx_packed(down_full, L.padded(0), L.m(0))
                 : std::vector<uint16_t>{};
    const std::vector<uint16_t> tail =
        detail::project_amx_packed(down_last, L.padded(last), L.m(last));
    const auto data = [](const std::vector<uint16_t>& p) { return p.empty() ? nullptr : p.data(); };
    return transform_checked(L, hadamard, signs, {down_full, data(full)}, {down_last, data(tail)},
                             x, batch, xt, xsum, threads, nullptr, nullptr);
  });
}

namespace detail {

Status activation_transform_projected(const BlockLayout& L, bool hadamard, const float* signs,
                                      Projection full, Projection last, const float* x,
                                      int64_t batch, float* xt, float* xsum, int threads,
                                      float* x_copy, const VectorSink* sink) noexcept {
  return guarded([&] {
    return transform_checked(L, hadamard, signs, full, last, x, batch, xt, xsum, threads, x_copy,
                             sink);
  });
}

}  // namespace detail

}  // namespace sdq
