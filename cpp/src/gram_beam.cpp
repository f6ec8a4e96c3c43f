// Beam search over the Gram codes' sequential rounding (gram_beam.h).
//
// One row at a time: its chains' residual targets live in two [beam][m] buffers (read one, write
// the other), so every update is a contiguous loop the compiler turns into SIMD. The choices are
// remembered as (parent, level) per sample and chain, and each survivor's codes are read back
// from them at the end. Built with -ffp-contract=off (CMakeLists.txt): a fused multiply-add would
// round differently from the reference.
#include "sdq/gram_beam.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "guard.h"
#include "isa.h"
#include "parallel.h"

namespace sdq {
namespace {

struct Candidate {
  float cost;     // the chain's summed e^2 with this sample's choice
  float e;        // this sample's scaled error, pushed onto the later samples
  int32_t from;   // the chain it extends
  int32_t level;  // index into the levels
  int32_t index;  // from * levels + level: the reference's enumeration order
};

// The ranking: by cost, then by enumeration order (a stable sort's tie-break); NaN costs last.
// A strict total order, so the kept set does not depend on the order candidates arrive in.
inline bool ranks_before(const Candidate& a, const Candidate& b) {
  const bool a_nan = a.cost != a.cost, b_nan = b.cost != b.cost;
  if (a_nan != b_nan) return b_nan;
  if (!a_nan && a.cost != b.cost) return a.cost < b.cost;
  return a.index < b.index;
}

// Scratch of one worker: two residual buffers, costs, and the choices of every sample.
struct Scratch {
  std::vector<float> z0, z1, cost;
  std::vector<int32_t> parent;
  std::vector<int8_t> level;
  std::vector<Candidate> kept;
  Scratch(int64_t beam, int64_t m)
      : z0(beam * m), z1(beam * m), cost(beam), parent(beam * m), level(beam * m), kept(beam) {}
};

// Inserts c into kept[0 .. count) (ranked, at most beam long) if it ranks among the first beam.
inline void keep(const Candidate& c, Candidate* kept, int& count, int beam) {
  if (count == beam && !ranks_before(c, kept[beam - 1])) return;
  int pos = std::min(count, beam - 1);
  for (; pos > 0 && ranks_before(c, kept[pos - 1]); --pos) kept[pos] = kept[pos - 1];
  kept[pos] = c;
  count = std::min(count + 1, beam);
}

// The level nearest to x (its index into the levels): each chain's likeliest survivor.
inline int nearest(float x, bool ternary) {
  if (!ternary) return x > 0.0f ? 1 : 0;
  return x >= 0.5f ? 2 : (x <= -0.5f ? 0 : 1);
}

constexpr int64_t kVec = 16;
typedef float vec_f __attribute__((vector_size(kVec * sizeof(float))));

// dst[k] = src[k] - u[k] * e for k in [from, m): a product, then a difference. Whole vectors
// start at from rounded down to kVec: the samples before `from` are decided, so what lands in
// their slots is never read.
inline void push_error(float* dst, const float* src, const float* u, float e, int64_t from,
                       int64_t m) {
  int64_t k = from & ~(kVec - 1);
  for (; k + kVec <= m; k += kVec) {
    vec_f a, b;
    std::memcpy(&a, src + k, sizeof a);
    std::memcpy(&b, u + k, sizeof b);
    a = a - b * e;
    std::memcpy(dst + k, &a, sizeof a);
  }
  for (; k < m; ++k) dst[k] = src[k] - u[k] * e;
}

// The beam over one row z [m] against U; writes the row's ranked codes and costs.
SDQ_CLONES_X86 void run_row(
    const float* z, const float* U, int64_t m, const float* values, int nvalues, int beam,
    Scratch& s, float* const* codes_by_rank, float* cost_by_rank) {
  float* cur = s.z0.data();
  float* next = s.z1.data();
  std::memcpy(cur, z, sizeof(float) * m);
  s.cost[0] = 0.0f;
  int chains = 1;
  for (int64_t j = 0; j < m; ++j) {
    const float* row = U + j * m;
    const float inv = 1.0f / row[j];
    int count = 0;
    Candidate* kept = s.kept.data();
    const auto candidate = [&](int c, int v) {
      const float e = (cur[c * m + j] - values[v]) * inv;
      const float sq = e * e;
      return Candidate{s.cost[c] + sq, e, c, v, c * nvalues + v};
    };
    // Each chain's nearest level first (cheap insertions, a tight beam early), then the rest,
    // pruned: chains come in order of cost and a choice adds e^2 >= 0, so once the beam is full
    // a chain dearer than its worst entry, and every later chain, has nothing to add.
    int first[kMaxBeam];
    for (int c = 0; c < chains; ++c) {
      first[c] = nearest(cur[c * m + j], nvalues == 3);
      keep(candidate(c, first[c]), kept, count, beam);
    }
    for (int c = 0; c < chains; ++c) {
      if (count == beam && s.cost[c] > kept[beam - 1].cost) break;
      for (int v = 0; v < nvalues; ++v)
        if (v != first[c]) keep(candidate(c, v), kept, count, beam);
    }
    for (int b = 0; b < count; ++b) {
      const Candidate& k = s.kept[b];
      push_error(next + b * m, cur + k.from * m, row, k.e, j + 1, m);
      s.parent[j * beam + b] = k.from;
      s.level[j * beam + b] = static_cast<int8_t>(k.level);
      s.cost[b] = k.cost;
    }
    chains = count;
    std::swap(cur, next);
  }
  for (int r = 0; r < beam; ++r) {
    const int rank = r < chains ? r : 0;  // too few distinct chains: repeat the best
    float* dst = codes_by_rank[r];
    int at = rank;
    for (int64_t j = m - 1; j >= 0; --j) {
      dst[j] = values[s.level[j * beam + at]];
      at = s.parent[j * beam + at];
    }
    cost_by_rank[r] = s.cost[rank];
  }
}

// Rows per parallel chunk: a row costs ~beam * m^2 / 2 updates; a chunk should be worth tens
// of microseconds.
int64_t rows_per_chunk(int64_t m, int beam) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, beam * m * m / 2));
}

Status beam_checked(const float* z, int64_t groups, int64_t n, int64_t m, const float* hinv,
                    Levels levels, int beam, float* codes, float* cost, int threads) {
  if (levels != Levels::binary && levels != Levels::ternary) return Status::bad_levels;
  if (groups < 0 || n < 0 || m < 0 || beam < 1 || beam > kMaxBeam) return Status::bad_size;
  if (groups == 0 || n == 0 || m == 0) return Status::ok;
  if (!z || !hinv || !codes) return Status::null_pointer;
  static const float kBinary[] = {-1.0f, 1.0f}, kTernary[] = {-1.0f, 0.0f, 1.0f};
  const bool ternary = levels == Levels::ternary;
  const float* values = ternary ? kTernary : kBinary;
  const int nvalues = ternary ? 3 : 2;
  const int64_t rows = groups * n;
  detail::parallel_for(rows, threads, rows_per_chunk(m, beam), [&](int64_t begin, int64_t end) {
    Scratch s(beam, m);
    std::vector<float*> by_rank(beam);
    std::vector<float> row_cost(beam);
    for (int64_t r = begin; r < end; ++r) {
      for (int b = 0; b < beam; ++b) by_rank[b] = codes + (b * rows + r) * m;
      run_row(z + r * m, hinv + (r / n) * m * m, m, values, nvalues, beam, s, by_rank.data(),
              row_cost.data());
      if (cost)
        for (int b = 0; b < beam; ++b) cost[b * rows + r] = row_cost[b];
    }
  });
  return Status::ok;
}

}  // namespace

Status gram_beam_codes(const float* z, int64_t groups, int64_t n, int64_t m, const float* hinv,
                       Levels levels, int beam, float* codes, float* cost, int threads) noexcept {
  return detail::guarded([&] {
    return beam_checked(z, groups, n, m, hinv, levels, beam, codes, cost, threads);
  });
}

}  // namespace sdq
