// The Gram loops (gram_codes.h) without Python: against scalar loops of the documented
// recurrences (float32, products then sums, built like the core without fused multiply-add),
// 1 and 2 threads, row counts around the 16-row tiles, and the error statuses.
// Exit code 0: all checks pass.
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "expect.h"
#include "sdq/gram_codes.h"

namespace {

using sdq::Levels;
using sdq::Status;
using sdq_test::expect;

// An upper-triangular factor with a positive diagonal, and a symmetric G with one dead sample.
std::vector<float> upper(int64_t m, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 0.3f);
  std::vector<float> U(static_cast<size_t>(m * m), 0.0f);
  for (int64_t j = 0; j < m; ++j) {
    U[j * m + j] = 1.0f + std::fabs(nd(rng));
    for (int64_t k = j + 1; k < m; ++k) U[j * m + k] = nd(rng);
  }
  return U;
}

std::vector<float> gram(int64_t m, std::mt19937& rng) {
  const std::vector<float> U = upper(m, rng);
  std::vector<float> G(static_cast<size_t>(m * m), 0.0f);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < m; ++j)
      for (int64_t k = 0; k <= std::min(i, j); ++k) G[i * m + j] += U[k * m + i] * U[k * m + j];
  if (m > 2)
    for (int64_t k = 0; k < m; ++k) G[2 * m + k] = G[k * m + 2] = 0.0f;  // sample 2 unseen
  return G;
}

float level(float v, float tau, bool ternary) {
  if (!ternary) return v > 0.0f ? 1.0f : -1.0f;
  return v >= tau ? 1.0f : (v <= -tau ? -1.0f : 0.0f);
}

std::vector<float> select_reference(const std::vector<float>& z, int64_t groups, int64_t n,
                                     int64_t m, const std::vector<float>& hinv,
                                     const std::vector<float>& tau, bool ternary) {
  std::vector<float> codes(z.size());
  for (int64_t r = 0; r < groups * n; ++r) {
    const float* U = hinv.data() + (r / n) * m * m;
    std::vector<float> v(z.begin() + r * m, z.begin() + (r + 1) * m);
    for (int64_t j = 0; j < m; ++j) {
      const float q = level(v[j], ternary ? tau[r] : 0.0f, ternary);
      const float inv = 1.0f / U[j * m + j];
      const float e = (v[j] - q) * inv;
      for (int64_t k = j + 1; k < m; ++k) {
        const float t = U[j * m + k] * e;
        v[k] = v[k] - t;
      }
      codes[r * m + j] = q;
    }
  }
  return codes;
}

std::vector<float> refine_reference(std::vector<float> q, const std::vector<float>& h, int64_t n,
                                    int64_t m, const std::vector<float>& G,
                                    const std::vector<uint8_t>& active, bool ternary) {
  for (int64_t r = 0; r < n; ++r) {
    if (!active[r]) continue;
    std::vector<float> hr(h.begin() + r * m, h.begin() + (r + 1) * m);
    for (int64_t j = 0; j < m; ++j) {
      const float g = G[j * m + j];
      if (!(g > 0.0f)) continue;
      float& qj = q[r * m + j];
      float d;
      if (ternary) {
        const float a = static_cast<float>(-1.0 / static_cast<double>(g));
        const float t = qj + hr[j] * a;
        d = std::fmin(1.0f, std::fmax(-1.0f, std::nearbyint(t))) - qj;
      } else {
        d = qj * hr[j] > g ? qj * -2.0f : 0.0f;
      }
      qj += d;
      for (int64_t k = j + 1; k < m; ++k) {
        const float t = G[j * m + k] * d;
        hr[k] = hr[k] + t;
      }
    }
  }
  return q;
}

void check_select(int64_t groups, int64_t n, int64_t m, bool ternary, int threads) {
  std::mt19937 rng(static_cast<unsigned>(groups * 1000 + n * 10 + m));
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> z(static_cast<size_t>(groups * n * m)), tau(groups * n, 0.5f), hinv;
  for (float& v : z) v = nd(rng);
  for (int64_t g = 0; g < groups; ++g) {
    const std::vector<float> U = upper(m, rng);
    hinv.insert(hinv.end(), U.begin(), U.end());
  }
  std::vector<float> codes(z.size(), 7.0f);
  const Status st = sdq::gram_select_codes(z.data(), groups, n, m, hinv.data(), tau.data(),
                                           ternary ? Levels::ternary : Levels::binary,
                                           codes.data(), threads);
  expect(st == Status::ok && codes == select_reference(z, groups, n, m, hinv, tau, ternary),
         ternary ? "select: ternary codes equal the scalar recurrence"
                 : "select: binary codes equal the scalar recurrence");
}

void check_refine(int64_t n, int64_t m, bool ternary, int threads) {
  std::mt19937 rng(static_cast<unsigned>(n * 10 + m));
  std::normal_distribution<float> nd(0.0f, 2.0f);
  std::uniform_int_distribution<int> pick(0, 2);
  std::vector<float> q(static_cast<size_t>(n * m)), h(q.size());
  for (float& v : q) v = ternary ? static_cast<float>(pick(rng) - 1) : (pick(rng) ? 1.0f : -1.0f);
  for (float& v : h) v = nd(rng);
  std::vector<uint8_t> active(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r) active[r] = r % 5 != 1;
  const std::vector<float> G = gram(m, rng);
  const std::vector<float> want = refine_reference(q, h, n, m, G, active, ternary);
  std::vector<float> got = q, scratch = h;
  const Status st = sdq::gram_refine_pass(got.data(), scratch.data(), n, m, G.data(),
                                          active.data(),
                                          ternary ? Levels::ternary : Levels::binary, threads);
  expect(st == Status::ok && got == want,
         ternary ? "refine: ternary pass equals the scalar recurrence"
                 : "refine: binary pass equals the scalar recurrence");
}

}  // namespace

int main() {
  for (int threads : {1, 2})
    for (bool ternary : {false, true}) {
      check_select(1, 1, 1, ternary, threads);
      check_select(3, 17, 40, ternary, threads);
      check_select(2, 16, 130, ternary, threads);
      check_refine(1, 1, ternary, threads);
      check_refine(33, 64, ternary, threads);
      check_refine(16, 129, ternary, threads);
    }
  float one = 1.0f, out = 0.0f;
  expect(sdq::gram_select_codes(&one, 1, 1, 1, &one, nullptr, Levels::ternary, &out) ==
             Status::null_pointer,
         "select: ternary without tau is null_pointer");
  expect(sdq::gram_select_codes(&one, -1, 1, 1, &one, nullptr, Levels::binary, &out) ==
             Status::bad_size,
         "select: negative groups is bad_size");
  expect(sdq::gram_refine_pass(&out, &one, 1, 1, nullptr, nullptr, Levels::binary) ==
             Status::null_pointer,
         "refine: null G is null_pointer");
  expect(sdq::gram_refine_pass(&out, &one, 1, 1, &one, nullptr, static_cast<Levels>(9)) ==
             Status::bad_levels,
         "refine: unknown levels is bad_levels");
  return sdq_test::finish();
}
