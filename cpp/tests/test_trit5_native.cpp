// Native test of the trit5 storage and kernel (sdq/trit5.h) as an engine would use them: pack a
// layer's ternary bitplanes into trit5, unpack them back exactly, and run trit5_gemm (every variant
// this CPU supports) against the exact float kernel addonly_gemm on the same codes. The int8 tables
// may move each nonzero group's contribution by at most half a table step, so the bound is
// sum_b |S| * G_b * step_b / 2 with step_b = max_g (|x0| + |x1| + |x2|) / 127 over the block.
// Exit code 0: all checks pass.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "expect.h"
#include "sdq/gemv.h"
#include "sdq/trit5.h"

namespace {

using sdq_test::expect;

struct Rng {
  uint64_t s = 0x2545f4914f6cdd1dull;
  uint32_t next() {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    return static_cast<uint32_t>(s >> 16);
  }
  float normalish() {  // sum of uniforms: bell-shaped, enough for activations
    float v = 0.0f;
    for (int i = 0; i < 4; ++i) v += static_cast<float>(next() % 20001) / 10000.0f - 1.0f;
    return v;
  }
};

uint16_t half_of(float f) {  // normal fp16 values only, truncating the mantissa
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const int exp = static_cast<int>((b >> 23) & 0xff) - 127 + 15;
  return static_cast<uint16_t>(sign | (exp << 10) | ((b >> 13) & 0x3ffu));
}

float float_of(uint16_t h) {
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

void run_case(const Case& k, Rng& rng) {
  const sdq::BlockLayout L{k.in, k.block, k.osr};
  const int64_t words = L.words_per_row(), nb = L.num_blocks(), cols = L.total_code_cols();
  std::vector<sdq::word_t> sign(k.out * words, 0), nonzero(k.out * words, 0);
  for (int64_t r = 1; r < k.out; ++r)  // row 0 stays all-zero
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t j = 0; j < L.m(b); ++j) {
        const int64_t c = L.code_offset(b) + j;
        const uint32_t v = rng.next() % 3;  // 0: zero, 1: +1, 2: -1
        if (v) nonzero[r * words + c / 32] |= 1u << (c % 32);
        if (v == 1) sign[r * words + c / 32] |= 1u << (c % 32);
      }
  std::vector<uint8_t> trits(sdq::trit5_trits_bytes(L, k.out));
  std::vector<uint32_t> tsigns(sdq::trit5_sign_words(L, k.out));
  expect(sdq::trit5_pack(L, sign.data(), nonzero.data(), k.out, trits.data(), tsigns.data(), 2) ==
             sdq::Status::ok, "trit5_pack ok");
  std::vector<sdq::word_t> sign2(sign.size(), ~0u), nonzero2(nonzero.size(), ~0u);
  expect(sdq::trit5_unpack(L, trits.data(), tsigns.data(), k.out, sign2.data(), nonzero2.data(), 2) ==
             sdq::Status::ok, "trit5_unpack ok");
  expect(sign2 == sign && nonzero2 == nonzero, "pack then unpack gives the bitplanes back");

  std::vector<uint16_t> scale(k.out * nb), mean(k.out * nb);
  for (auto& s : scale) s = half_of(0.05f + 0.5f * static_cast<float>(rng.next() % 1000) / 1000.0f);
  for (auto& m : mean) m = half_of(0.01f * rng.normalish() + 0.02f);
  std::vector<float> xt(k.batch * cols, 0.0f), xsum(k.batch * nb);
  for (int64_t t = 0; t < k.batch; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      for (int64_t j = 0; j < L.m(b); ++j) xt[t * cols + L.code_offset(b) + j] = rng.normalish();
      xsum[t * nb + b] = rng.normalish();
    }
  std::vector<float> exact(k.batch * k.out);
  expect(sdq::addonly_gemm(L, sdq::Levels::ternary, sign.data(), nonzero.data(), scale.data(),
                           mean.data(), k.out, xt.data(), xsum.data(), k.batch, exact.data(), 2) ==
             sdq::Status::ok, "addonly_gemm ok");
  // Half a table step per group, per (token, block), from the definition in trit5.h.
  std::vector<double> half_step(k.batch * nb);
  for (int64_t t = 0; t < k.batch; ++t)
    for (int64_t b = 0; b < nb; ++b) {
      double mx = 0.0;
      const float* x = xt.data() + t * cols + L.code_offset(b);
      for (int64_t j = 0; j < L.m(b); j += 3) {
        double v = 0.0;
        for (int64_t i = j; i < j + 3 && i < L.m(b); ++i) v += std::fabs(x[i]);
        mx = v > mx ? v : mx;
      }
      half_step[t * nb + b] = 0.5 * mx / 127.0 * (1.0 + 1e-5);
    }
  for (auto kernel : {sdq::Trit5Kernel::portable, sdq::Trit5Kernel::avx2, sdq::Trit5Kernel::avx512,
                      sdq::Trit5Kernel::neon}) {
    char what[160];
    if (!sdq::trit5_kernel_supported(kernel)) {
      std::vector<float> y(k.batch * k.out);
      std::snprintf(what, sizeof what, "%s unsupported here: not_built", sdq::trit5_kernel_name(kernel));
      expect(sdq::trit5_gemm(L, trits.data(), tsigns.data(), scale.data(), mean.data(), k.out,
                             xt.data(), xsum.data(), k.batch, y.data(), 1, kernel) ==
                 sdq::Status::not_built, what);
      continue;
    }
    for (int threads : {1, 2}) {
      std::vector<float> y(k.batch * k.out, NAN);
      const sdq::Status st = sdq::trit5_gemm(L, trits.data(), tsigns.data(), scale.data(),
                                             mean.data(), k.out, xt.data(), xsum.data(), k.batch,
                                             y.data(), threads, kernel);
      double worst = 0.0;  // error / bound
      for (int64_t t = 0; t < k.batch; ++t)
        for (int64_t r = 0; r < k.out; ++r) {
          double bound = 1e-5 * (1.0 + std::fabs(exact[t * k.out + r]));  // float rounding
          for (int64_t b = 0; b < nb; ++b)
            bound += std::fabs(float_of(scale[r * nb + b])) * static_cast<double>(trit5_groups(L, b)) *
                     half_step[t * nb + b];
          const double err = std::fabs(static_cast<double>(y[t * k.out + r]) - exact[t * k.out + r]);
          worst = std::isnan(err) ? 1e9 : std::fmax(worst, err / bound);
        }
      std::snprintf(what, sizeof what,
                    "%s, %d thread(s), out %lld in %lld B %lld osr %.2f batch %lld: error %.3f of the bound",
                    sdq::trit5_kernel_name(kernel), threads, static_cast<long long>(k.out),
                    static_cast<long long>(k.in), static_cast<long long>(k.block), k.osr,
                    static_cast<long long>(k.batch), worst);
      expect(st == sdq::Status::ok && worst <= 1.0, what);
    }
  }
}

void bad_arguments() {
  const sdq::BlockLayout L{64, 32, 2.0};
  std::vector<sdq::word_t> sign(2 * L.words_per_row(), 0), nonzero(sign.size(), 0);
  std::vector<uint8_t> trits(sdq::trit5_trits_bytes(L, 2));
  std::vector<uint32_t> ts(sdq::trit5_sign_words(L, 2));
  sign[0] = 1;  // a sign bit without its nonzero bit
  expect(sdq::trit5_pack(L, sign.data(), nonzero.data(), 2, trits.data(), ts.data()) ==
             sdq::Status::bad_code, "pack: sign without nonzero is bad_code");
  expect(sdq::trit5_pack(L, nullptr, nonzero.data(), 2, trits.data(), ts.data()) ==
             sdq::Status::null_pointer, "pack: null sign is null_pointer");
  expect(sdq::trit5_pack(sdq::BlockLayout{64, 48, 2.0}, sign.data(), nonzero.data(), 2,
                         trits.data(), ts.data()) == sdq::Status::bad_size,
         "pack: block size 48 is bad_size");
  std::fill(trits.begin(), trits.end(), 0xff);  // pattern 15
  expect(sdq::trit5_unpack(L, trits.data(), ts.data(), 2, sign.data(), nonzero.data()) ==
             sdq::Status::bad_code, "unpack: pattern 15 is bad_code");
  float y = 0.0f;
  expect(sdq::trit5_gemm(L, trits.data(), ts.data(), nullptr, nullptr, 2, nullptr, nullptr, 1, &y) ==
             sdq::Status::null_pointer, "gemm: null scale is null_pointer");
  expect(sdq::trit5_gemm(L, nullptr, nullptr, nullptr, nullptr, 2, nullptr, nullptr, 0, nullptr) ==
             sdq::Status::ok, "gemm: batch 0 is a no-op");
  expect(sdq::trit5_gemm(L, trits.data(), ts.data(), nullptr, nullptr, -1, nullptr, nullptr, 1, &y) ==
             sdq::Status::bad_size, "gemm: negative out is bad_size");
}

}  // namespace

int main() {
  Rng rng;
  std::printf("trit5 kernel chosen here: %s\n", sdq::trit5_kernel_name());
  // short last block, m % 3 != 0, out % 32 != 0, a block of 342 groups (int16 flushes), batch 17
  for (const Case& k : {Case{45, 200, 64, 1.3, 1}, Case{70, 384, 128, 2.5, 3},
                        Case{40, 128, 64, 16.0, 2}, Case{33, 4096, 128, 2.0, 17}})
    run_case(k, rng);
  bad_arguments();
  return sdq_test::finish();
}
