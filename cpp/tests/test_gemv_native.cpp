// Native example and test of the add-only path, as an inference engine would use it without
// Python: it packs a layer's codes into bitplanes by hand, transforms one batch of activations,
// runs the add-only GEMM and compares with y = W_hat x computed by a plain dense loop, where
// W_hat_b = (S * D q + MU) @ Hb^T is the layer's reconstruction (method.md step 5).
// Exit code 0: every variant this CPU supports agrees; 1: a mismatch or an error status.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "sdq/gemv.h"
#include "sdq/resample.h"

namespace {

struct Rng {  // small deterministic generator: the test needs no <random> distribution quirks
  uint64_t s = 0x9e3779b97f4a7c15ull;
  uint32_t next() {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    return static_cast<uint32_t>(s >> 16);
  }
  float uniform() { return static_cast<float>(next() % 100000) / 100000.0f; }  // [0, 1)
};

// fp16 bit pattern of a value in the normal fp16 range, truncating the mantissa: enough here.
uint16_t to_half(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const int exp = static_cast<int>((b >> 23) & 0xff) - 127 + 15;
  return static_cast<uint16_t>(sign | (exp << 10) | ((b >> 13) & 0x3ffu));
}
float from_half(uint16_t h) {  // normal values only (all this test makes)
  const uint32_t b = ((h & 0x8000u) << 16) | ((((h >> 10) & 0x1fu) + 112) << 23) | ((h & 0x3ffu) << 13);
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

struct Layer {
  sdq::BlockLayout L;
  sdq::Levels levels;
  int64_t out;
  std::vector<int8_t> codes;  // [out, total_code_cols], zero in the padding
  std::vector<sdq::word_t> sign, nonzero;
  std::vector<uint16_t> scale, mean;
  std::vector<float> signs;
};

Layer make_layer(int64_t out, sdq::BlockLayout L, sdq::Levels levels, Rng& rng) {
  Layer y{L, levels, out, {}, {}, {}, {}, {}, {}};
  const int64_t cols = L.total_code_cols(), words = L.words_per_row(), nb = L.num_blocks();
  y.codes.assign(out * cols, 0);
  y.sign.assign(out * words, 0);
  y.nonzero.assign(levels == sdq::Levels::ternary ? out * words : 0, 0);
  for (int64_t r = 0; r < out; ++r)
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t j = 0; j < L.m(b); ++j) {
        const int64_t c = L.code_offset(b) + j;
        const int code = levels == sdq::Levels::binary ? (rng.next() & 1 ? 1 : -1)
                                                       : static_cast<int>(rng.next() % 3) - 1;
        y.codes[r * cols + c] = static_cast<int8_t>(code);
        const sdq::word_t bit = sdq::word_t{1} << (c % 32);
        if (code > 0) y.sign[r * words + c / 32] |= bit;
        if (code != 0 && levels == sdq::Levels::ternary) y.nonzero[r * words + c / 32] |= bit;
      }
  for (int64_t i = 0; i < out * nb; ++i) {
    y.scale.push_back(to_half(0.05f + rng.uniform()));
    y.mean.push_back(to_half(rng.uniform() - 0.5f));
  }
  for (int64_t i = 0; i < L.block_size; ++i) y.signs.push_back(rng.next() & 1 ? 1.0f : -1.0f);
  return y;
}

int hadamard_entry(int64_t i, int64_t j) { return __builtin_popcountll(i & j) & 1 ? -1 : 1; }

// y = W_hat x, with W_hat built column block by column block in double precision.
std::vector<double> dense_reference(const Layer& ly, const std::vector<std::vector<float>>& downs,
                                    const std::vector<float>& x, int64_t batch) {
  const sdq::BlockLayout& L = ly.L;
  const int64_t cols = L.total_code_cols(), nb = L.num_blocks(), in = L.in_features;
  std::vector<double> w(ly.out * in), y(batch * ly.out, 0.0);
  for (int64_t r = 0; r < ly.out; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t p = L.padded(b), m = L.m(b);
      std::vector<double> u(p);  // S * D q + MU
      for (int64_t i = 0; i < p; ++i) {
        double acc = 0.0;
        for (int64_t j = 0; j < m; ++j)
          acc += downs[b][i * m + j] * ly.codes[r * cols + L.code_offset(b) + j];
        u[i] = from_half(ly.scale[r * nb + b]) * acc + from_half(ly.mean[r * nb + b]);
      }
      for (int64_t j = 0; j < L.width(b); ++j) {  // (u @ Hb^T)_j = (u @ H)_j * signs_j / sqrt(p)
        double acc = 0.0;
        for (int64_t i = 0; i < p; ++i) acc += u[i] * hadamard_entry(i, j);
        w[r * in + L.start(b) + j] = acc * ly.signs[j] / std::sqrt(static_cast<double>(p));
      }
    }
  for (int64_t t = 0; t < batch; ++t)
    for (int64_t r = 0; r < ly.out; ++r)
      for (int64_t k = 0; k < in; ++k) y[t * ly.out + r] += w[r * in + k] * x[t * in + k];
  return y;
}

bool check(const char* what, sdq::Status s) {
  if (s == sdq::Status::ok) return true;
  std::printf("FAIL %s: %s\n", what, sdq::status_string(s));
  return false;
}

bool run_case(int64_t out, int64_t in, double osr, sdq::Levels levels, int64_t batch, Rng& rng) {
  const sdq::BlockLayout L{in, 128, osr};
  const Layer ly = make_layer(out, L, levels, rng);
  const int64_t nb = L.num_blocks();
  std::vector<std::vector<float>> downs(nb);
  for (int64_t b = 0; b < nb; ++b) {
    downs[b].resize(L.padded(b) * L.m(b));
    if (!check("resample_matrix", sdq::resample_matrix(L.m(b), L.padded(b), downs[b].data())))
      return false;
  }
  std::vector<float> x(batch * in), xt(batch * L.total_code_cols()), xsum(batch * nb);
  for (float& v : x) v = 2.0f * rng.uniform() - 1.0f;
  if (!check("activation_transform",
             sdq::activation_transform(L, true, ly.signs.data(), downs[0].data(),
                                       downs[nb - 1].data(), x.data(), batch, xt.data(),
                                       xsum.data())))
    return false;
  const std::vector<double> want = dense_reference(ly, downs, x, batch);
  double scale = 0.0;
  for (double v : want) scale = std::max(scale, std::fabs(v));
  bool ok = true;
  for (int k = 1; k <= 4; ++k) {
    const auto kernel = static_cast<sdq::AddonlyKernel>(k);
    if (!sdq::addonly_kernel_supported(kernel)) continue;
    std::vector<float> y(batch * out);
    if (!check("addonly_gemm", sdq::addonly_gemm_variant(
                                   kernel, L, levels, ly.sign.data(),
                                   ly.nonzero.empty() ? nullptr : ly.nonzero.data(),
                                   ly.scale.data(), ly.mean.data(), out, xt.data(), xsum.data(),
                                   batch, y.data())))
      return false;
    double err = 0.0;
    // std::max, not std::fmax: GCC 12 for AArch64 fails (internal error) vectorising an fmax reduction
    for (size_t i = 0; i < y.size(); ++i) err = std::max(err, std::fabs(y[i] - want[i]));
    const bool pass = err <= 1e-4 * (scale + 1.0);
    std::printf("%s %-10s out=%lld in=%lld osr=%.2f batch=%lld %s: max err %.3g (scale %.3g)\n",
                pass ? "ok  " : "FAIL", sdq::addonly_kernel_name(kernel),
                static_cast<long long>(out), static_cast<long long>(in), osr,
                static_cast<long long>(batch),
                levels == sdq::Levels::binary ? "binary" : "ternary", err, scale);
    ok = ok && pass;
  }
  return ok;
}

bool error_paths() {
  const sdq::BlockLayout bad{100, 100, 2.0};  // block size not a power of two
  float f = 0.0f;
  sdq::word_t w = 0;
  uint16_t h = 0;
  bool ok = sdq::addonly_gemm(bad, sdq::Levels::binary, &w, nullptr, &h, &h, 1, &f, &f, 1, &f) ==
            sdq::Status::bad_size;
  const sdq::BlockLayout L{128, 128, 1.0};
  ok = ok && sdq::addonly_gemm(L, sdq::Levels::ternary, &w, nullptr, &h, &h, 1, &f, &f, 1, &f) ==
                 sdq::Status::null_pointer;
  ok = ok && sdq::activation_transform(L, false, nullptr, nullptr, nullptr, &f, 1, &f, &f) ==
                 sdq::Status::null_pointer;
  std::printf("%s error paths\n", ok ? "ok  " : "FAIL");
  return ok;
}

}  // namespace

int main() {
  Rng rng;
  bool ok = error_paths();
  ok = run_case(37, 300, 1.5, sdq::Levels::binary, 1, rng) && ok;
  ok = run_case(37, 300, 1.5, sdq::Levels::ternary, 5, rng) && ok;
  ok = run_case(64, 256, 2.0, sdq::Levels::binary, 17, rng) && ok;
  ok = run_case(9, 64, 0.75, sdq::Levels::ternary, 3, rng) && ok;
  std::printf("%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
