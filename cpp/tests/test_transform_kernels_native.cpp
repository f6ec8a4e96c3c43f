// The activation transform's inner kernels against plain loops: every projection variant this
// CPU runs (project.h) against a double-precision sum, on token counts around the register
// tiles (1-16), output counts around the vector widths (1-200, tails), and extreme values; and
// the bf16 AMX projection (where the CPU has it) against the double-precision sum of its
// bf16-rounded operands, on token counts around its 16-row tiles and 64-vector chunks; and
// the FWHT's vector path against the scalar butterflies, bit for bit, for n = 1 .. 4096.
// Exit code 0: all agree.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "expect.h"
#include "project.h"
#include "sdq/fwht.h"

namespace {

using sdq::detail::ProjectKernel;
using sdq_test::expect;

struct Rng {
  uint64_t s = 0x243f6a8885a308d3ull;
  uint32_t next() {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    return static_cast<uint32_t>(s >> 16);
  }
  float normal() {  // sum of uniforms: enough spread for a test
    float a = 0;
    for (int i = 0; i < 4; ++i) a += static_cast<float>(next() % 100000) / 50000.0f - 1.0f;
    return a;
  }
};

// One random projection problem: down [padded, m], v [tokens, padded], and an output of stride
// m + 3 with a row to spare, filled with a canary that must survive past m and past `tokens`.
struct Problem {
  int64_t padded, m, tokens, stride;
  std::vector<float> down, v, out;
  static constexpr float kCanary = -7.25f;
  Problem(int64_t p, int64_t m_, int64_t t, float scale, Rng& rng)
      : padded(p), m(m_), tokens(t), stride(m_ + 3), down(p * m_), v(t * p),
        out((t + 1) * (m_ + 3), kCanary) {
    for (auto& d : down) d = rng.normal();
    for (auto& x : v) x = rng.normal() * scale;
  }
  // Every output within `rel` * sum |d v| (+ tiny) of the double sum of round(d) * round(v),
  // and the canaries intact.
  template <typename Round>
  bool check(double rel, Round round) const {
    for (int64_t t = 0; t <= tokens; ++t)
      for (int64_t j = 0; j < stride; ++j) {
        const float got = out[t * stride + j];
        if (t == tokens || j >= m) {
          if (got != kCanary) return false;
          continue;
        }
        double exact = 0, mag = 0;
        for (int64_t i = 0; i < padded; ++i) {
          const double p = static_cast<double>(round(down[i * m + j])) * round(v[t * padded + i]);
          exact += p;
          mag += std::fabs(p);
        }
        if (!(std::fabs(got - exact) <= rel * mag + 1e-37)) return false;
      }
    return true;
  }
};

// |out - exact| <= 1e-5 * sum |d v| + tiny.
bool projection_ok(sdq::detail::ProjectFn fn, int64_t padded, int64_t m, int64_t tokens,
                   float scale, Rng& rng) {
  Problem p(padded, m, tokens, scale, rng);
  fn(p.down.data(), padded, m, p.v.data(), tokens, p.out.data(), p.stride);
  return p.check(1e-5, [](float x) { return x; });
}

void test_projection() {
  const struct { ProjectKernel k; const char* name; } kernels[] = {
      {ProjectKernel::portable, "portable"}, {ProjectKernel::avx2, "avx2"},
      {ProjectKernel::avx512, "avx512"}};
  for (const auto& kernel : kernels) {
    const auto fn = sdq::detail::project_kernel(kernel.k);
    if (!fn) {
      std::printf("skip projection %s: not supported by this CPU\n", kernel.name);
      continue;
    }
    Rng rng;
    bool ok = true;
    for (int64_t tokens : {1, 2, 5, 6, 7, 12, 13, 16})
      for (int64_t m : {1, 7, 8, 15, 16, 17, 63, 64, 65, 83, 166, 200})
        for (int64_t padded : {1, 2, 64, 128}) ok = ok && projection_ok(fn, padded, m, tokens, 1.0f, rng);
    expect(ok, (std::string("projection ") + kernel.name + ": random shapes").c_str());
    expect(projection_ok(fn, 128, 256, 16, 1e30f, rng) && projection_ok(fn, 128, 256, 16, 1e-30f, rng),
           (std::string("projection ") + kernel.name + ": huge and tiny activations").c_str());
  }
}

// float -> the nearest bf16 (half to even), as a float: what project_amx multiplies.
float bf16_round(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  std::memcpy(&f, &u, sizeof u);
  return f;
}

// |out - exact| <= (padded + 1) 2^-24 sum |d v| + tiny over the bf16-rounded operands (products of
// two bf16 values are exact in float32; only the float32 additions round).
bool projection_amx_ok(int64_t padded, int64_t m, int64_t tokens, float scale, Rng& rng) {
  Problem p(padded, m, tokens, scale, rng);
  std::vector<uint16_t> packed(sdq::detail::project_amx_packed_size(padded, m));
  sdq::detail::project_amx_pack(p.down.data(), padded, m, packed.data());
  std::vector<uint16_t> a(sdq::detail::project_amx_scratch_size(padded, tokens));
  std::vector<float*> rows(tokens);
  for (int64_t t = 0; t < tokens; ++t) rows[t] = p.out.data() + t * p.stride;
  sdq::detail::project_amx(packed.data(), padded, m, p.v.data(), tokens, rows.data(), a.data());
  return p.check((padded + 1) * 0x1p-24, bf16_round);
}

void test_projection_amx() {
  if (!sdq::detail::project_amx_supported()) {
    std::printf("skip projection amx-bf16: not supported by this CPU\n");
    return;
  }
  Rng rng;
  bool ok = true;
  for (int64_t tokens : {1, 15, 16, 17, 64, 70})
    for (int64_t m : {1, 15, 16, 17, 63, 64, 65, 83, 200, 256})
      for (int64_t padded : {1, 2, 31, 32, 33, 64, 128})
        ok = ok && projection_amx_ok(padded, m, tokens, 1.0f, rng);
  expect(ok, "projection amx-bf16: random shapes");
  expect(projection_amx_ok(128, 256, 16, 1e30f, rng) &&
             projection_amx_ok(128, 256, 16, 1e-30f, rng),
         "projection amx-bf16: huge and tiny activations");
}

void scalar_fwht(float* x, int64_t n) {  // the butterflies of fwht.cpp, one element at a time
  for (int64_t h = 1; h < n; h <<= 1)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        const float u = x[j], v = x[j + h];
        x[j] = u + v;
        x[j + h] = u - v;
      }
}

void test_fwht() {
  Rng rng;
  bool ok = true;
  for (int64_t n = 1; n <= 4096; n <<= 1) {
    std::vector<float> x(3 * n), want;
    for (auto& v : x) v = rng.normal();
    want = x;
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
    for (int64_t r = 0; r < 3; ++r) {
      scalar_fwht(want.data() + r * n, n);
      for (int64_t j = 0; j < n; ++j) want[r * n + j] *= scale;
    }
    ok = ok && sdq::fwht(x.data(), 3, n, nullptr, false, 1) == sdq::Status::ok && x == want;
  }
  expect(ok, "fwht: bit-identical to the scalar butterflies, n = 1 .. 4096");
}

}  // namespace

int main() {
  test_projection();
  test_projection_amx();
  test_fwht();
  return sdq_test::finish();
}
