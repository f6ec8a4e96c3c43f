// wgm_gemm (wgm_gemm.h): per output row, decode the row's signs and group indices once (8 columns
// per table look-up), then add the signed activations into one accumulator per group and finish
// with one multiply per group.
//
// Activations are regrouped once per call into chunks of kTokens tokens laid out column-major
// ([chunk][column][token]), so that one column's update touches kTokens contiguous floats: the
// accumulation vectorises across tokens. A lone token (batch 1, read in place, or the last token
// of a batch) runs a scalar variant instead of padding to kTokens. Consecutive columns go to kBanks
// interleaved accumulator banks, so that two columns of the same group do not wait on each other
// through memory. Portable C++ without intrinsics (no hand-written AVX2 variant yet).
#include <algorithm>
#include <cstring>
#include <vector>

#include "gemm_addonly.h"  // detail::half_to_float
#include "guard.h"
#include "parallel.h"
#include "sdq/wgm_gemm.h"

namespace sdq {
namespace {

constexpr int64_t kTokens = 8;  // tokens per vectorised chunk
constexpr int64_t kBanks = 4;   // interleaved accumulator sets (column i uses bank i % kBanks)

struct WgmCtx {
  const word_t* sign;
  const word_t* index;
  const uint16_t* scale;
  int64_t groups, block, out, in, words, batch;
  int bits;
  const float* xc;  // activations: [chunks][in][xstride] (x itself when batch == 1)
  int64_t xstride;  // kTokens, or 1 for a single token read in place
  float* y;

  int64_t slots() const noexcept { return int64_t{1} << bits; }  // every decodable index
  int64_t span() const noexcept { return block > 0 ? block : in; }  // columns sharing scales
  int64_t spans() const noexcept { return (in + span() - 1) / span(); }
  int64_t chunks() const noexcept { return (batch + kTokens - 1) / kTokens; }
};

// x [batch, in] -> [chunks][in][kTokens] (tokens past the batch are 0).
std::vector<float> regroup(const float* x, int64_t batch, int64_t in) {
  const int64_t chunks = (batch + kTokens - 1) / kTokens;
  std::vector<float> xc(static_cast<size_t>(chunks * in * kTokens), 0.0f);
  for (int64_t t = 0; t < batch; ++t) {
    float* dst = xc.data() + (t / kTokens) * in * kTokens + t % kTokens;
    for (int64_t i = 0; i < in; ++i) dst[i * kTokens] = x[t * in + i];
  }
  return xc;
}

// spread(v): 8 bytes in memory order, byte j = bit j of v (0 or 1). Shifting the uint64 left by
// b < 8 moves every byte's bit to bit b of the same byte, whatever the machine's byte order.
struct SpreadTable {
  uint64_t v[256];
  SpreadTable() noexcept {
    for (int i = 0; i < 256; ++i) {
      uint8_t bytes[8];
      for (int j = 0; j < 8; ++j) bytes[j] = static_cast<uint8_t>((i >> j) & 1);
      std::memcpy(&v[i], bytes, sizeof bytes);
    }
  }
};

const SpreadTable kSpread;  // built when the library loads: no guard check in the hot loop

inline uint64_t spread(word_t w, int k) noexcept { return kSpread.v[(w >> (8 * k)) & 0xffu]; }

// Row o's group index and negative flag (1: -1) per column, 8 columns per look-up; the buffers
// hold words * 32 columns (the padding columns are decoded too and never read).
void decode_row(const WgmCtx& c, int64_t o, uint8_t* idx, uint8_t* neg) noexcept {
  for (int64_t w = 0; w < c.words; ++w) {
    const word_t s = ~c.sign[o * c.words + w];
    uint64_t g[kWordBits / 8] = {};
    for (int k = 0; k < kWordBits / 8; ++k) {
      const uint64_t n = spread(s, k);
      std::memcpy(neg + w * kWordBits + 8 * k, &n, sizeof n);
    }
    for (int b = 0; b < c.bits; ++b) {
      const word_t p = c.index[(b * c.out + o) * c.words + w];
      for (int k = 0; k < kWordBits / 8; ++k) g[k] |= spread(p, k) << b;
    }
    std::memcpy(idx + w * kWordBits, g, sizeof g);
  }
}

inline float flipped(float v, uint32_t mask) noexcept {  // sign * v without a multiply
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  u ^= mask;
  std::memcpy(&v, &u, sizeof v);
  return v;
}

// acc[bank(i)][idx[i]][0..T) += sign_i * x[i][0..T) for columns [begin, end); x is [in][stride].
template <int64_t T>
void accumulate(const float* x, int64_t stride, const uint8_t* idx, const uint8_t* neg,
                int64_t begin, int64_t end, int64_t slots, float* acc) noexcept {
  for (int64_t i = begin; i < end; ++i) {
    float* a = acc + ((i % kBanks) * slots + idx[i]) * T;
    const float* xi = x + i * stride;
    const uint32_t m = static_cast<uint32_t>(neg[i]) << 31;
    for (int64_t t = 0; t < T; ++t) a[t] += flipped(xi[t], m);
  }
}

// y[t] += sum_g scale_g * (sum over banks of acc[bank][g][t]) for t < T; acc is zeroed after.
template <int64_t T>
void finish_span(const float* s, int64_t groups, int64_t slots, float* acc, float* y) noexcept {
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t t = 0; t < T; ++t) {
      float sum = 0.0f;
      for (int64_t k = 0; k < kBanks; ++k) sum += acc[(k * slots + g) * T + t];
      y[t] += s[g] * sum;
    }
  }
  std::fill(acc, acc + kBanks * slots * T, 0.0f);
}

template <int64_t T>
void row_chunk(const WgmCtx& c, const float* x, const uint8_t* idx, const uint8_t* neg,
               const float* s, float* acc, float* y) noexcept {
  const int64_t span = c.span(), slots = c.slots();
  for (int64_t k = 0; k < c.spans(); ++k) {
    accumulate<T>(x, c.xstride, idx, neg, k * span, std::min(c.in, (k + 1) * span), slots, acc);
    finish_span<T>(s + (c.block > 0 ? k * c.groups : 0), c.groups, slots, acc, y);
  }
}

// Row o's scales as floats: G per block, block after block (the matrix's G for block == 0).
void load_scales(const WgmCtx& c, int64_t o, float* s) noexcept {
  const int64_t n = c.block > 0 ? c.spans() * c.groups : c.groups;
  const uint16_t* src = c.block > 0 ? c.scale + o * n : c.scale;
  for (int64_t j = 0; j < n; ++j) s[j] = detail::half_to_float(src[j]);
}

void rows(const WgmCtx& c, int64_t begin, int64_t end) {
  std::vector<uint8_t> idx(static_cast<size_t>(c.words * kWordBits));
  std::vector<uint8_t> neg(static_cast<size_t>(c.words * kWordBits));
  std::vector<float> acc(static_cast<size_t>(kBanks * c.slots() * kTokens), 0.0f);
  std::vector<float> s(static_cast<size_t>(c.block > 0 ? c.spans() * c.groups : c.groups));
  for (int64_t o = begin; o < end; ++o) {
    decode_row(c, o, idx.data(), neg.data());
    load_scales(c, o, s.data());
    for (int64_t ch = 0; ch < c.chunks(); ++ch) {
      const float* x = c.xc + ch * c.in * c.xstride;
      const int64_t tokens = std::min(kTokens, c.batch - ch * kTokens);
      float y[kTokens] = {};
      if (tokens == 1)
        row_chunk<1>(c, x, idx.data(), neg.data(), s.data(), acc.data(), y);
      else
        row_chunk<kTokens>(c, x, idx.data(), neg.data(), s.data(), acc.data(), y);
      for (int64_t t = 0; t < tokens; ++t) c.y[(ch * kTokens + t) * c.out + o] = y[t];
    }
  }
}

Status check_args(const word_t* sign, const word_t* index, const uint16_t* scale, int64_t groups,
                  int64_t block, int64_t out, int64_t in, const float* x, int64_t batch,
                  const float* y) noexcept {
  if (groups < 1 || groups > kWgmMaxGroups || block < 0 || in <= 0 || out < 0 || batch < 0)
    return Status::bad_size;
  if (out == 0 || batch == 0) return Status::ok;
  if (!sign || !scale || !x || !y) return Status::null_pointer;
  if (wgm_index_bits(groups) > 0 && !index) return Status::null_pointer;
  return Status::ok;
}

}  // namespace

Status wgm_gemm(const word_t* sign, const word_t* index, const uint16_t* scale, int64_t groups,
                int64_t block, int64_t out, int64_t in, const float* x, int64_t batch, float* y,
                int threads) noexcept {
  const Status s = check_args(sign, index, scale, groups, block, out, in, x, batch, y);
  if (s != Status::ok || out == 0 || batch == 0) return s;
  return detail::guarded([&] {
    const bool single = batch == 1;  // one token: read x in place
    const std::vector<float> xc = single ? std::vector<float>() : regroup(x, batch, in);
    const WgmCtx c{sign, index, scale, groups, block, out, in, words_for(in), batch,
                   wgm_index_bits(groups), single ? x : xc.data(), single ? 1 : kTokens, y};
    detail::parallel_for(out, threads, 8, [&](int64_t b, int64_t e) { rows(c, b, e); });
    return Status::ok;
  });
}

}  // namespace sdq
