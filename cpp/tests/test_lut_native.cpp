// Native test of the binary int8 look-up kernel (sdq/lut_gemm.h), as an engine would use it:
// pack the sign bitplanes once, then call lut_gemm_binary. Checks the packed layout byte by
// byte, every variant this CPU supports against the portable one (float rounding) and against
// the exact dot products (within the table rounding bound), and the argument checks.
// Exit code 0: all checks pass.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "expect.h"
#include "sdq/lut_gemm.h"

namespace {

using sdq_test::expect;

struct Rng {
  uint64_t s = 0x2545f4914f6cdd1dull;
  uint32_t next() {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    return static_cast<uint32_t>(s >> 16);
  }
  float uniform() { return static_cast<float>(next() % 100000) / 100000.0f; }  // [0, 1)
  float normal() {  // sum of uniforms: enough here
    float a = 0.0f;
    for (int i = 0; i < 12; ++i) a += uniform();
    return a - 6.0f;
  }
};

uint16_t to_half(float f) {  // normal fp16 range, mantissa truncated
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const int exp = static_cast<int>((b >> 23) & 0xff) - 127 + 15;
  return static_cast<uint16_t>(sign | (exp << 10) | ((b >> 13) & 0x3ffu));
}
float from_half(uint16_t h) {
  const uint32_t b = ((h & 0x8000u) << 16) | ((((h >> 10) & 0x1fu) + 112) << 23) | ((h & 0x3ffu) << 13);
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

struct Case {
  int64_t out, in, block;
  double osr;
  int64_t batch;
};

bool run_case(const Case& k, Rng& rng) {
  const sdq::BlockLayout L{k.in, k.block, k.osr};
  const int64_t words = L.words_per_row(), cols = L.total_code_cols(), nb = L.num_blocks();
  std::vector<sdq::word_t> sign(k.out * words);
  for (auto& w : sign) w = rng.next() ^ (rng.next() << 16);
  // padding columns are 0 bits, and zero activations there
  std::vector<bool> live(cols, false);
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t j = 0; j < L.m(b); ++j) live[L.code_offset(b) + j] = true;
  for (int64_t r = 0; r < k.out; ++r)
    for (int64_t c = 0; c < cols; ++c)
      if (!live[c]) sign[r * words + c / 32] &= ~(sdq::word_t{1} << (c % 32));
  std::vector<uint16_t> scale(k.out * nb), mean(k.out * nb);
  for (auto& s : scale) s = to_half(0.05f + rng.uniform());
  for (auto& m : mean) m = to_half(rng.uniform() - 0.5f);
  std::vector<float> xt(k.batch * cols, 0.0f), xsum(k.batch * nb);
  for (int64_t t = 0; t < k.batch; ++t)
    for (int64_t c = 0; c < cols; ++c)
      if (live[c]) xt[t * cols + c] = rng.normal();
  for (auto& v : xsum) v = rng.normal();

  bool ok = true;
  const int64_t bytes = sdq::lut_packed_bytes(L, k.out);
  ok &= bytes == (k.out + 31) / 32 * 32 * words * 4;
  std::vector<uint8_t> packed(bytes, 0xAB);
  ok &= sdq::lut_pack_binary(L, sign.data(), k.out, packed.data(), 2) == sdq::Status::ok;
  for (int64_t tile = 0; tile * 32 < k.out; ++tile)  // byte p * 32 + i = byte p of row 32 tile + i
    for (int64_t p = 0; p < 4 * words; ++p)
      for (int64_t i = 0; i < 32; ++i) {
        const int64_t r = tile * 32 + i;
        const uint8_t want = r < k.out ? static_cast<uint8_t>(sign[r * words + p / 4] >> (8 * (p % 4))) : 0;
        ok &= packed[tile * sdq::lut_tile_bytes(L) + p * 32 + i] == want;
      }

  // Exact dot products, and the table rounding bound: per block, groups * tscale / 2 * S.
  std::vector<double> exact(k.batch * k.out), bound(k.batch * k.out);
  for (int64_t t = 0; t < k.batch; ++t) {
    for (int64_t b = 0; b < nb; ++b) {
      double amax = 0.0;
      for (int64_t g = L.code_offset(b) / 4; g < (L.code_offset(b) + L.code_cols(b)) / 4; ++g) {
        double a = 0.0;
        for (int j = 0; j < 4; ++j) a += std::fabs(xt[t * cols + 4 * g + j]);
        amax = std::max(amax, a);
      }
      for (int64_t r = 0; r < k.out; ++r) {
        double dot = 0.0;
        for (int64_t c = L.code_offset(b); c < L.code_offset(b) + L.code_cols(b); ++c) {
          const bool bit = (sign[r * words + c / 32] >> (c % 32)) & 1;
          dot += bit ? xt[t * cols + c] : -xt[t * cols + c];
        }
        const double s = from_half(scale[r * nb + b]), mu = from_half(mean[r * nb + b]);
        exact[t * k.out + r] += s * dot + mu * xsum[t * nb + b];
        bound[t * k.out + r] += s * (L.code_cols(b) / 4.0) * (amax / 127.0 * 0.5 + 1e-5 * amax);
      }
    }
  }
  std::vector<float> y0(k.batch * k.out);
  ok &= sdq::lut_gemm_binary(L, packed.data(), scale.data(), mean.data(), k.out, xt.data(),
                             xsum.data(), k.batch, y0.data(), 1, sdq::LutKernel::portable) ==
        sdq::Status::ok;
  for (int64_t i = 0; i < k.batch * k.out; ++i) ok &= std::fabs(y0[i] - exact[i]) <= bound[i];
  for (auto kern : {sdq::LutKernel::avx2, sdq::LutKernel::avx512, sdq::LutKernel::avx512_vnni,
                    sdq::LutKernel::neon,
                    sdq::LutKernel::automatic}) {
    if (!sdq::lut_kernel_supported(kern)) continue;
    for (int threads : {1, 2}) {
      std::vector<float> y(k.batch * k.out, NAN);
      ok &= sdq::lut_gemm_binary(L, packed.data(), scale.data(), mean.data(), k.out, xt.data(),
                                 xsum.data(), k.batch, y.data(), threads, kern) == sdq::Status::ok;
      for (int64_t i = 0; i < k.batch * k.out; ++i)
        ok &= std::fabs(y[i] - y0[i]) <= 1e-5f * (std::fabs(y0[i]) + static_cast<float>(bound[i]));
    }
  }
  return ok;
}

}  // namespace

int main() {
  Rng rng;
  for (const Case& k : {Case{70, 300, 128, 1.3, 3}, Case{32, 256, 128, 2.0, 1},
                        Case{45, 1000, 64, 2.5, 17}, Case{5, 128, 128, 16.0, 2}}) {
    char what[128];
    std::snprintf(what, sizeof what, "out %lld in %lld block %lld osr %.2f batch %lld",
                  static_cast<long long>(k.out), static_cast<long long>(k.in),
                  static_cast<long long>(k.block), k.osr, static_cast<long long>(k.batch));
    expect(run_case(k, rng), what);
  }
  const sdq::BlockLayout L{256, 128, 2.0}, bad{256, 100, 2.0};
  std::vector<uint8_t> packed(sdq::lut_packed_bytes(L, 4));
  std::vector<uint16_t> h(8, 0);
  std::vector<float> xt(L.total_code_cols()), xsum(2), y(4);
  expect(sdq::lut_packed_bytes(bad, 4) == 0, "packed bytes of a bad layout: 0");
  expect(sdq::lut_pack_binary(bad, nullptr, 4, packed.data()) == sdq::Status::bad_size,
         "pack: bad layout");
  expect(sdq::lut_pack_binary(L, nullptr, 4, packed.data()) == sdq::Status::null_pointer,
         "pack: null bitplanes");
  expect(sdq::lut_gemm_binary(L, nullptr, h.data(), h.data(), 4, xt.data(), xsum.data(), 1,
                              y.data()) == sdq::Status::null_pointer, "gemm: null packed");
  expect(sdq::lut_gemm_binary(L, packed.data(), h.data(), h.data(), -1, xt.data(), xsum.data(),
                              1, y.data()) == sdq::Status::bad_size, "gemm: negative out");
  expect(sdq::lut_gemm_binary(L, packed.data(), h.data(), h.data(), 4, xt.data(), xsum.data(), 1,
                              y.data(), 1, static_cast<sdq::LutKernel>(99)) == sdq::Status::not_built,
         "gemm: unknown variant");
  expect(std::string(sdq::lut_kernel_name(sdq::LutKernel::portable)) == "portable", "kernel name");
  std::printf("lut kernel: %s\n", sdq::lut_kernel_name());
  return sdq_test::finish();
}
