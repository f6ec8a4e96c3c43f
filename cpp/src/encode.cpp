// Data-free encoder of a row range (encode.h).
//
// Work unit: a tile of kModLanes row-blocks ("chains") of one block geometry. For a tile:
//   gather the padded rows -> rotate them (fwht.cpp's float32 operations, lanes in SIMD)
//   -> u = X U^T in float32 (upsample_impl), widened to double -> per chain, in double: mean,
//   two quantiles (selection, not sorting), z written
//   straight into the modulator's [sample][lane] layout -> modulate all lanes in lock-step
//   (modulator_lanes.h) -> pack the codes with 8x8 bit transposes, then copy each lane's words.
// Tiles are split over threads; every chain is computed in the same order whatever tile or thread
// holds it, so the output does not depend on threads or on the row split.
#include "sdq/encode.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "fp16.h"
#include "guard.h"
#include "isa.h"
#include "modulator_lanes.h"
#include "parallel.h"
#include "select.h"
#include "sdq/resample.h"

namespace sdq {
namespace {

using detail::half_finite;
using detail::half_from_double;
using detail::half_to_double;
using detail::kModLanes;
using detail::Quantile;
constexpr int64_t kPanel = 32;  // u columns per kernel pass; m is padded up to a multiple

// ---- one block geometry: its fused transform and its chains ----

struct Geometry {
  int64_t width, padded, m, mp;  // mp: m rounded up to kPanel
  int64_t code_offset;           // code column of the geometry's first block in a row
  int64_t code_cols;
  std::vector<float> Ut;         // [padded][mp]: the float32 resampling matrix U^T, 0 beyond m
};

Status make_geometry(const BlockLayout& L, int64_t b, Geometry& g) {
  g.width = L.width(b);
  g.padded = L.padded(b);
  g.m = L.m(b);
  g.mp = (g.m + kPanel - 1) / kPanel * kPanel;
  g.code_offset = L.code_offset(b);
  g.code_cols = L.code_cols(b);
  std::vector<float> U(static_cast<size_t>(g.m * g.padded));
  const Status st = resample_matrix(g.padded, g.m, U.data());
  if (st != Status::ok) return st;
  g.Ut.assign(static_cast<size_t>(g.padded * g.mp), 0.0f);
  for (int64_t n = 0; n < g.m; ++n)
    for (int64_t j = 0; j < g.padded; ++j) g.Ut[j * g.mp + n] = U[n * g.padded + j];
  return Status::ok;
}

// ---- rotation and up-sampling of a tile, stored [sample][lane] ----

typedef float lanes_f __attribute__((vector_size(kModLanes * sizeof(float))));

// fwht.h's forward transform of every lane of Xt [n][kModLanes] (n a power of two), with the
// operations of cpp/src/fwht.cpp in the same order (so the same float32 results), lanes in SIMD.
SDQ_CLONES_X86 void rotate_lanes(
    float* Xt, int64_t n, const float* signs) noexcept {
  lanes_f a, b;  // memcpy: the buffer is not aligned to the vector
  const auto load = [Xt](lanes_f& v, int64_t j) { std::memcpy(&v, Xt + j * kModLanes, sizeof v); };
  const auto store = [Xt](const lanes_f& v, int64_t j) {
    std::memcpy(Xt + j * kModLanes, &v, sizeof v);
  };
  for (int64_t j = 0; j < n; ++j) {
    load(a, j);
    store(a * signs[j], j);
  }
  for (int64_t h = 1; h < n; h <<= 1)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; ++j) {
        load(a, j);
        load(b, j + h);
        store(a + b, j);
        store(a - b, j + h);
      }
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(n)));
  if (scale != 1.0f)
    for (int64_t j = 0; j < n; ++j) {
      load(a, j);
      store(a * scale, j);
    }
}

// u = X U^T: X [padded][kModLanes] (the rotated rows as columns), Ut [padded][mp], u
// [kModLanes][mp]. float32 products and sums (the scale issue's "float32 where the result is
// unchanged within tolerance": the double version was a third of the encoder's time and changed
// about one code in 10^5 at order 1; tests/test_encode.py bounds the difference), widened to
// double for the normalisation. Each u[l][j] sums over k in order, whatever the tile or thread.
template <typename V, int kRows>
__attribute__((always_inline)) inline void upsample_impl(const float* __restrict X,
                                                         int64_t padded,
                                                         const float* __restrict Ut, int64_t mp,
                                                         double* __restrict u) {
  constexpr int64_t W = sizeof(V) / sizeof(float);
  static_assert(kPanel % (2 * W) == 0 && kModLanes % kRows == 0, "tile shape");
  for (int64_t j0 = 0; j0 < mp; j0 += 2 * W) {
    for (int64_t l0 = 0; l0 < kModLanes; l0 += kRows) {
      V acc[kRows][2] = {};
      for (int64_t k = 0; k < padded; ++k) {
        V a0, a1;
        std::memcpy(&a0, Ut + k * mp + j0, sizeof a0);
        std::memcpy(&a1, Ut + k * mp + j0 + W, sizeof a1);
        for (int r = 0; r < kRows; ++r) {
          V x;  // broadcast (spelled out: V{} + value would add a zero first)
          for (int64_t i = 0; i < W; ++i) x[i] = X[k * kModLanes + l0 + r];
          acc[r][0] += x * a0;
          acc[r][1] += x * a1;
        }
      }
      for (int r = 0; r < kRows; ++r)
        for (int h = 0; h < 2; ++h)
          for (int64_t i = 0; i < W; ++i) u[(l0 + r) * mp + j0 + h * W + i] = acc[r][h][i];
    }
  }
}

typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

#if SDQ_X86_GNU
__attribute__((target("avx512f"))) void upsample_avx512(const float* X, int64_t padded,
                                                        const float* Ut, int64_t mp, double* u) {
  upsample_impl<v16f, 8>(X, padded, Ut, mp, u);
}
__attribute__((target("avx2,fma"))) void upsample_avx2(const float* X, int64_t padded,
                                                       const float* Ut, int64_t mp, double* u) {
  upsample_impl<v8f, 4>(X, padded, Ut, mp, u);
}
#endif
void upsample_portable(const float* X, int64_t padded, const float* Ut, int64_t mp, double* u) {
  upsample_impl<v4f, 4>(X, padded, Ut, mp, u);
}

using UpsampleFn = void (*)(const float*, int64_t, const float*, int64_t, double*);

UpsampleFn pick_upsample() noexcept {
#if SDQ_X86_GNU
  if (__builtin_cpu_supports("avx512f")) return upsample_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return upsample_avx2;
#endif
  return upsample_portable;
}

// ---- one tile of chains ----

struct Outputs {
  word_t* sign;
  word_t* nonzero;
  uint16_t* scale;
  uint16_t* mean;
  int64_t words, num_blocks;
};

// Per-thread buffers, sized for the largest geometry.
struct Work {
  std::vector<float> X, zt;  // the tile's rows [padded][kModLanes], rotated in place; z likewise
  std::vector<double> u;  // [kModLanes][mp]
  std::vector<int8_t> ct;
  std::vector<word_t> sign, nonzero;  // the tile's packed words [code_cols / 32][kModLanes]
  std::vector<double> sel;
  explicit Work(int64_t padded, int64_t mp) {
    X.resize(static_cast<size_t>(kModLanes * padded));
    u.resize(static_cast<size_t>(kModLanes * mp));
    zt.resize(static_cast<size_t>(kModLanes * mp));
    ct.resize(static_cast<size_t>(kModLanes * mp));
    sign.resize(static_cast<size_t>(mp / kWordBits * kModLanes));
    nonzero.resize(sign.size());
    sel.resize(static_cast<size_t>(2 * mp));
  }
};

// Sum of x[0, n) in double with 8 interleaved partial sums (vectorises; a fixed order).
double sum_f64(const double* x, int64_t n) noexcept {
  double part[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) part[j] += x[i + j];
  for (; i < n; ++i) part[i % 8] += x[i];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// Steps 4 and 5 for one chain's u (double [m]): writes its z into lane `lane` of zt, its mean
// and scale as fp16 bits, and its ternary threshold. False if the scale or mean is not finite
// in fp16.
// Cloned per instruction set: its loops over doubles are most of its time.
SDQ_CLONES_X86 bool normalise(
    const double* u, const EncodeParams& p, int64_t m, Work& w, int64_t lane, uint16_t& mu_bits,
    uint16_t& s_bits, float& tau) noexcept {
  mu_bits = half_from_double(sum_f64(u, m) / static_cast<double>(m));
  const double mu = half_to_double(mu_bits);
  double* sel = w.sel.data();  // |u - mu|, then selection scratch
  for (int64_t n = 0; n < m; ++n) sel[n] = std::fabs(u[n] - mu);
  // |z| = |u - mu| / s_safe has the order of |u - mu|: one selection serves both quantiles.
  const bool ternary = p.levels == Levels::ternary;
  Quantile q[2] = {detail::quantile_target(m, p.p_scale), detail::quantile_target(m, p.p_cut)};
  Quantile* scale_q = &q[0];
  Quantile* cut_q = &q[1];
  if (ternary && q[1].k < q[0].k) {
    std::swap(q[0], q[1]);
    std::swap(scale_q, cut_q);
  }
  detail::select_quantiles(sel, sel + m, m, q, ternary ? 2 : 1);
  s_bits = half_from_double(detail::quantile_value(*scale_q, m) * p.sd_scale);
  if (!half_finite(mu_bits) || !half_finite(s_bits)) return false;
  const double s = half_to_double(s_bits);
  const double s_safe = s > 0.0 ? s : 1.0;
  float* zt = w.zt.data() + lane;
  for (int64_t n = 0; n < m; ++n)
    zt[n * kModLanes] = static_cast<float>((u[n] - mu) / s_safe);
  tau = 0.0f;
  if (ternary) {
    Quantile c = *cut_q;
    c.lo /= s_safe;
    c.hi /= s_safe;
    tau = static_cast<float>(detail::quantile_value(c, m));
  }
  return true;
}

// 8x8 bit-matrix transpose (Hacker's Delight 7-3): bit j of byte i <-> bit i of byte j.
uint64_t transpose8(uint64_t x) noexcept {
  uint64_t t;
  t = (x ^ (x >> 7)) & 0x00AA00AA00AA00AAull;
  x ^= t ^ (t << 7);
  t = (x ^ (x >> 14)) & 0x0000CCCC0000CCCCull;
  x ^= t ^ (t << 14);
  t = (x ^ (x >> 28)) & 0x00000000F0F0F0F0ull;
  x ^= t ^ (t << 28);
  return x;
}

static_assert(kModLanes == 16, "lane masks are 16 bits");

// Lanes of one column of the tile's codes as bit masks: code > 0, code != 0.
void lane_masks(const int8_t* col, uint32_t& pos, uint32_t& nz) noexcept {
#if defined(__SSE2__)
  const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(col));
  const __m128i zero = _mm_setzero_si128();
  pos = static_cast<uint32_t>(_mm_movemask_epi8(_mm_cmpgt_epi8(c, zero)));
  nz = ~static_cast<uint32_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(c, zero))) & 0xffffu;
#else
  pos = nz = 0;
  for (int l = 0; l < kModLanes; ++l) {
    pos |= static_cast<uint32_t>(col[l] > 0) << l;
    nz |= static_cast<uint32_t>(col[l] != 0) << l;
  }
#endif
}

// Word w of every lane from per-column lane masks mask[0, 32): bit n of lane l's word is bit l
// of mask[n]. Done as 8x8 bit transposes.
void masks_to_words(const uint32_t* mask, word_t* words) noexcept {
  for (int l = 0; l < kModLanes; ++l) words[l] = 0;
  for (int g = 0; g < kModLanes / 8; ++g)
    for (int h = 0; h < kWordBits / 8; ++h) {
      uint64_t x = 0;  // byte i: lanes 8g.. of column 8h + i
      for (int i = 0; i < 8; ++i)
        x |= static_cast<uint64_t>((mask[8 * h + i] >> (8 * g)) & 0xffu) << (8 * i);
      const uint64_t y = transpose8(x);  // byte j: columns 8h.. of lane 8g + j
      for (int j = 0; j < 8; ++j)
        words[8 * g + j] |= static_cast<word_t>((y >> (8 * j)) & 0xffu) << (8 * h);
    }
}

// Packs the tile's codes ct [m][kModLanes] into words [code_cols / 32][kModLanes] per plane
// (columns m .. code_cols are 0 in both).
void pack_tile(const int8_t* ct, int64_t m, int64_t code_cols, bool ternary, word_t* sign,
               word_t* nonzero) noexcept {
  uint32_t pos[kWordBits], nz[kWordBits];
  for (int64_t w = 0; w < code_cols / kWordBits; ++w) {
    for (int64_t b = 0; b < kWordBits; ++b) {
      const int64_t n = w * kWordBits + b;
      if (n < m) lane_masks(ct + n * kModLanes, pos[b], nz[b]);
      else pos[b] = nz[b] = 0;
    }
    masks_to_words(pos, sign + w * kModLanes);
    if (ternary) masks_to_words(nz, nonzero + w * kModLanes);
  }
}

// Chains of one geometry: chain i is row row_begin + i / per_row, block first + i % per_row.
struct ChainSet {
  const Geometry* g;
  int64_t first_block, per_row, count;
};

// Encodes chains [c0, c0 + lanes) of set cs; false on a non-finite scale or mean.
bool encode_tile(const EncodeParams& p, const float* signs, const float* W, int64_t row_begin,
                 const ChainSet& cs,
                 int64_t c0, const Outputs& out, UpsampleFn upsample, Work& w) {
  const Geometry& g = *cs.g;
  const int64_t lanes = std::min(kModLanes, cs.count - c0);
  const int64_t in = p.layout.in_features, bs = p.layout.block_size;
  std::fill(w.X.begin(), w.X.begin() + kModLanes * g.padded, 0.0f);
  for (int64_t l = 0; l < lanes; ++l) {
    const int64_t r = row_begin + (c0 + l) / cs.per_row, b = cs.first_block + (c0 + l) % cs.per_row;
    const float* src = W + r * in + b * bs;
    for (int64_t k = 0; k < g.width; ++k) w.X[k * kModLanes + l] = src[k];
  }
  if (p.hadamard) rotate_lanes(w.X.data(), g.padded, signs);
  upsample(w.X.data(), g.padded, g.Ut.data(), g.mp, w.u.data());
  detail::ModState st;
  for (int64_t l = 0; l < kModLanes; ++l) {
    uint16_t mu_bits, s_bits;
    if (l >= lanes) {  // an idle lane runs on zeros; its codes are dropped
      for (int64_t n = 0; n < g.m; ++n) w.zt[n * kModLanes + l] = 0.0f;
      continue;
    }
    if (!normalise(&w.u[l * g.mp], p, g.m, w, l, mu_bits, s_bits, st.tau[l])) return false;
    const int64_t r = row_begin + (c0 + l) / cs.per_row, b = cs.first_block + (c0 + l) % cs.per_row;
    out.scale[r * out.num_blocks + b] = s_bits;
    out.mean[r * out.num_blocks + b] = mu_bits;
  }
  detail::modulate_lanes(w.zt.data(), g.m, st, w.ct.data(), p.order,
                         p.levels == Levels::ternary);
  const bool ternary = p.levels == Levels::ternary;
  const int64_t words = g.code_cols / kWordBits;
  pack_tile(w.ct.data(), g.m, g.code_cols, ternary, w.sign.data(), w.nonzero.data());
  for (int64_t l = 0; l < lanes; ++l) {
    const int64_t r = row_begin + (c0 + l) / cs.per_row, b = cs.first_block + (c0 + l) % cs.per_row;
    const int64_t word0 = r * out.words + (g.code_offset + (b - cs.first_block) * g.code_cols) /
                                              kWordBits;
    for (int64_t i = 0; i < words; ++i) {
      out.sign[word0 + i] = w.sign[i * kModLanes + l];
      if (ternary) out.nonzero[word0 + i] = w.nonzero[i * kModLanes + l];
    }
  }
  return true;
}

Status check_params(const EncodeParams& p, const float* signs, const float* W, int64_t row_begin,
                    int64_t row_end, const word_t* sign, const word_t* nonzero,
                    const uint16_t* scale, const uint16_t* mean) {
  if (!p.layout.valid() || row_begin < 0 || row_end < row_begin) return Status::bad_size;
  if (p.levels != Levels::binary && p.levels != Levels::ternary) return Status::bad_levels;
  if (p.order != 1 && p.order != 2) return Status::bad_order;
  const bool in_unit = p.p_scale >= 0.0 && p.p_scale <= 1.0 && p.p_cut >= 0.0 && p.p_cut <= 1.0;
  if (!in_unit || !(p.sd_scale > 0.0) || !std::isfinite(p.sd_scale)) return Status::bad_value;
  if (row_end == row_begin) return Status::ok;
  if (!W || !sign || !scale || !mean || (p.hadamard && !signs) ||
      (p.levels == Levels::ternary && !nonzero))
    return Status::null_pointer;
  return Status::ok;
}

Status encode_checked(const EncodeParams& p, const float* signs, const float* W, int64_t row_begin,
                      int64_t row_end, word_t* sign, word_t* nonzero, uint16_t* scale,
                      uint16_t* mean, int threads) {
  Status st = check_params(p, signs, W, row_begin, row_end, sign, nonzero, scale, mean);
  if (st != Status::ok || row_end == row_begin) return st;
  const BlockLayout& L = p.layout;
  const int64_t nb = L.num_blocks(), rows = row_end - row_begin;
  // Full blocks share one geometry; a short last block has its own.
  const int64_t full = L.width(nb - 1) == L.block_size ? nb : nb - 1;
  Geometry geo[2];
  std::vector<ChainSet> sets;
  if (full > 0) {
    if ((st = make_geometry(L, 0, geo[0])) != Status::ok) return st;
    sets.push_back({&geo[0], 0, full, rows * full});
  }
  if (full < nb) {
    if ((st = make_geometry(L, nb - 1, geo[1])) != Status::ok) return st;
    sets.push_back({&geo[1], nb - 1, 1, rows});
  }
  const Outputs out{sign, p.levels == Levels::ternary ? nonzero : nullptr, scale, mean,
                    L.words_per_row(), nb};
  int64_t tiles = 0, padded = 0, mp = 0;
  for (const ChainSet& cs : sets) {
    tiles += (cs.count + kModLanes - 1) / kModLanes;
    padded = std::max(padded, cs.g->padded);
    mp = std::max(mp, cs.g->mp);
  }
  const UpsampleFn upsample = pick_upsample();
  bool finite = true;  // only ever set from true to false, by any thread
  detail::parallel_for(tiles, threads, 1, [&](int64_t begin, int64_t end) {
    Work w(padded, mp);
    int64_t t = 0;  // tile index where the current set starts
    for (const ChainSet& cs : sets) {
      const int64_t n = (cs.count + kModLanes - 1) / kModLanes;
      for (int64_t i = std::max(begin, t); i < std::min(end, t + n); ++i)
        if (!encode_tile(p, signs, W, row_begin, cs, (i - t) * kModLanes, out, upsample, w))
          __atomic_store_n(&finite, false, __ATOMIC_RELAXED);
      t += n;
    }
  });
  return finite ? Status::ok : Status::bad_value;
}

}  // namespace

Status encode_rows(const EncodeParams& p, const float* signs, const float* W, int64_t row_begin,
                   int64_t row_end, word_t* sign, word_t* nonzero, uint16_t* scale,
                   uint16_t* mean, int threads) noexcept {
  return detail::guarded([&] {
    return encode_checked(p, signs, W, row_begin, row_end, sign, nonzero, scale, mean, threads);
  });
}

}  // namespace sdq
