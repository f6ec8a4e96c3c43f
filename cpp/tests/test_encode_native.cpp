// The data-free encoder (encode.h) without Python: a hand-checked row, threads and row ranges not
// changing the result, untouched rows outside the range, and the error statuses.
// (Bit-exactness against the float64 pipeline is tested from Python: tests/test_encode.py.)
// Exit code 0: all checks pass.
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "sdq/bitplane.h"
#include "sdq/encode.h"
#include "expect.h"

namespace {

using sdq::EncodeParams;
using sdq::Levels;
using sdq::Status;
using sdq::word_t;
using sdq_test::expect;

struct Encoded {
  std::vector<word_t> sign, nonzero;
  std::vector<uint16_t> scale, mean;
  Status status;
  bool operator==(const Encoded& o) const {
    return sign == o.sign && nonzero == o.nonzero && scale == o.scale && mean == o.mean;
  }
};

Encoded encode(const EncodeParams& p, const std::vector<float>& signs,
               const std::vector<float>& W, int64_t out, int64_t r0, int64_t r1, int threads,
               Encoded e = {}) {
  const int64_t words = p.layout.words_per_row(), nb = p.layout.num_blocks();
  e.sign.resize(out * words, 0xdeadbeef);
  e.nonzero.resize(out * words, 0xdeadbeef);
  e.scale.resize(out * nb, 0xbeef);
  e.mean.resize(out * nb, 0xbeef);
  e.status = sdq::encode_rows(p, signs.data(), W.data(), r0, r1, e.sign.data(),
                              e.nonzero.data(), e.scale.data(), e.mean.data(), threads);
  return e;
}

EncodeParams params(int64_t in, double osr, Levels levels, int order) {
  EncodeParams p;
  p.layout = {in, 128, osr};
  p.levels = levels;
  p.order = order;
  return p;
}

void hand_checked_row() {
  // One block of 32 ones, no rotation, OSR 1: u = 1 everywhere, mean 1 (fp16 0x3c00), every
  // deviation 0 so the scale is 0 and z = u - mean = 0; binary codes alternate from v = 0 -> -1:
  // v: 0 -> q -1; v = 0 - (-1) = 1 -> +1; v = 1 - 1 = 0 -> -1; ...
  EncodeParams p = params(32, 1.0, Levels::binary, 1);
  p.hadamard = false;
  const std::vector<float> W(32, 1.0f), signs(128, 1.0f);
  const Encoded e = encode(p, signs, W, 1, 0, 1, 1);
  expect(e.status == Status::ok, "constant row: ok");
  expect(e.mean[0] == 0x3c00 && e.scale[0] == 0, "constant row: mean 1.0, scale 0 (fp16 bits)");
  expect(e.sign[0] == 0xaaaaaaaau, "constant row: binary codes alternate -1, +1 from -1");
}

void threads_and_ranges() {
  const int64_t out = 37, in = 1000;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  std::vector<float> W(out * in), signs(128);
  for (float& w : W) w = normal(rng);
  for (float& s : signs) s = (rng() & 1) ? 1.0f : -1.0f;
  for (Levels levels : {Levels::binary, Levels::ternary}) {
    const EncodeParams p = params(in, 2.5, levels, 2);
    const Encoded one = encode(p, signs, W, out, 0, out, 1);
    const Encoded two = encode(p, signs, W, out, 0, out, 2);
    Encoded tiled = encode(p, signs, W, out, 0, 5, 2);
    tiled = encode(p, signs, W, out, 5, 21, 1, tiled);
    tiled = encode(p, signs, W, out, 21, out, 2, tiled);
    expect(one.status == Status::ok && one == two, "1 and 2 threads give the same bits");
    expect(tiled.status == Status::ok && tiled == one, "row ranges tiling the matrix = one call");
    const Encoded part = encode(p, signs, W, out, 5, 21, 2);
    const int64_t words = p.layout.words_per_row();
    bool untouched = true;
    for (int64_t i = 0; i < 5 * words; ++i) untouched &= part.sign[i] == 0xdeadbeef;
    for (int64_t i = 21 * words; i < out * words; ++i) untouched &= part.sign[i] == 0xdeadbeef;
    expect(untouched, "rows outside the range are not written");
  }
}

void statuses() {
  const std::vector<float> W(4 * 128, 0.5f), signs(128, 1.0f);
  const EncodeParams ok = params(128, 2.0, Levels::ternary, 1);
  EncodeParams p = ok;
  p.layout.block_size = 100;
  expect(encode(p, signs, W, 4, 0, 4, 1).status == Status::bad_size, "block 100 -> bad_size");
  expect(encode(ok, signs, W, 4, 3, 2, 1).status == Status::bad_size, "rows 3..2 -> bad_size");
  p = ok;
  p.order = 3;
  expect(encode(p, signs, W, 4, 0, 4, 1).status == Status::bad_order, "order 3 -> bad_order");
  p = ok;
  p.levels = static_cast<Levels>(4);
  expect(encode(p, signs, W, 4, 0, 4, 1).status == Status::bad_levels, "levels 4 -> bad_levels");
  p = ok;
  p.p_cut = 1.5;
  expect(encode(p, signs, W, 4, 0, 4, 1).status == Status::bad_value, "p_cut 1.5 -> bad_value");
  p = ok;
  p.sd_scale = std::numeric_limits<double>::infinity();
  expect(encode(p, signs, W, 4, 0, 4, 1).status == Status::bad_value, "sd_scale inf -> bad_value");
  std::vector<float> big(W);
  big[3] = 1e6f;
  expect(encode(ok, signs, big, 4, 0, 4, 1).status == Status::bad_value,
         "a mean beyond fp16 -> bad_value");
  std::vector<float> nan(W);
  nan[130] = std::numeric_limits<float>::quiet_NaN();
  expect(encode(ok, signs, nan, 4, 0, 4, 2).status == Status::bad_value, "NaN -> bad_value");
  Encoded e = encode(ok, signs, W, 4, 0, 4, 1);
  expect(sdq::encode_rows(ok, signs.data(), W.data(), 0, 4, e.sign.data(), nullptr,
                          e.scale.data(), e.mean.data(), 1) == Status::null_pointer,
         "ternary without a nonzero plane -> null_pointer");
  expect(sdq::encode_rows(ok, nullptr, W.data(), 0, 4, e.sign.data(), e.nonzero.data(),
                          e.scale.data(), e.mean.data(), 1) == Status::null_pointer,
         "hadamard without signs -> null_pointer");
  expect(sdq::encode_rows(ok, nullptr, nullptr, 2, 2, nullptr, nullptr, nullptr, nullptr, 1) ==
             Status::ok,
         "an empty range touches nothing");
}

}  // namespace

int main() {
  hand_checked_row();
  threads_and_ranges();
  statuses();
  return sdq_test::finish();
}
