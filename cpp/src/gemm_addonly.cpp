// addonly_gemm (gemv.h): argument checks, the shared look-up tables, run-time choice of variant
// and the split of output rows over threads. The variants live in gemm_addonly_<isa>.cpp.
#include <algorithm>
#include <cmath>

#include "gemm_addonly.h"
#include "guard.h"
#include "parallel.h"
#include "scratch.h"
#include "sdq/gemv.h"

namespace sdq {
namespace {

using detail::GemmCtx;
using detail::kGroup;
using detail::kLutEntries;

constexpr int64_t kTokenChunk = 16;  // tokens whose tables are built together
constexpr int64_t kTileRows = 16;    // rows split between threads in multiples of this: whole
                                     // SIMD tiles (16 lanes for avx512, two tiles for avx2)
// The least work worth a chunk of its own (waking a worker costs ~10-50 us on a loaded machine):
constexpr double kMinChunkWords = 32768;    // code words looked up (~1 ns each)
constexpr double kMinChunkEntries = 65536;  // table entries built

using detail::grain_for;

bool cpu_has(AddonlyKernel k) noexcept {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (k == AddonlyKernel::avx512 || k == AddonlyKernel::avx512_mask)
    return __builtin_cpu_supports("avx512f");
  if (k == AddonlyKernel::avx2)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#endif
  return k == AddonlyKernel::portable;
}

AddonlyKernel best_kernel() noexcept {
  static const AddonlyKernel best = cpu_has(AddonlyKernel::avx512) ? AddonlyKernel::avx512
                                    : cpu_has(AddonlyKernel::avx2) ? AddonlyKernel::avx2
                                                                   : AddonlyKernel::portable;
  return best;
}

detail::GemmKernel kernel_fn(AddonlyKernel k) noexcept {
  switch (k) {
    case AddonlyKernel::avx512: return detail::gemm_rows_avx512;
    case AddonlyKernel::avx512_mask: return detail::gemm_rows_avx512_mask;
    case AddonlyKernel::avx2: return detail::gemm_rows_avx2;
    default: return detail::gemm_rows_portable;
  }
}

// Subset sums of each group of 4 activations: entry i adds the activations whose bit is set in i.
void build_tables(const float* xt, int64_t groups, float* lut) noexcept {
  for (int64_t g = 0; g < groups; ++g) {
    const float* x = xt + g * kGroup;
    float* p = lut + g * kLutEntries;
    p[0] = 0.0f;
    for (int j = 0, half = 1; j < kGroup; ++j, half <<= 1)
      for (int i = 0; i < half; ++i) p[half + i] = p[i] + x[j];
  }
}

void block_sums(const BlockLayout& L, const float* xt, float* out) noexcept {
  for (int64_t b = 0; b < L.num_blocks(); ++b) {
    const float* v = xt + L.code_offset(b);
    double s = 0.0;
    for (int64_t j = 0; j < L.m(b); ++j) s += v[j];
    out[b] = static_cast<float>(s);
  }
}

Status check_args(const BlockLayout& L, Levels levels, const word_t* sign, const word_t* nonzero,
                  const uint16_t* scale, const uint16_t* mean, int64_t out, const float* xt,
                  const float* xsum, int64_t batch, float* y) noexcept {
  if (levels != Levels::binary && levels != Levels::ternary) return Status::bad_levels;
  if (!L.valid() || out < 0 || batch < 0) return Status::bad_size;
  if (out == 0 || batch == 0) return Status::ok;
  if (!sign || !scale || !mean || !xt || !xsum || !y) return Status::null_pointer;
  if (levels == Levels::ternary && !nonzero) return Status::null_pointer;
  return Status::ok;
}

Status run(AddonlyKernel kernel, const BlockLayout& L, Levels levels, const word_t* sign,
           const word_t* nonzero, const uint16_t* scale, const uint16_t* mean, int64_t out,
           const float* xt, const float* xsum, int64_t batch, float* y, int threads) {
  const int64_t nb = L.num_blocks(), cols = L.total_code_cols(), groups = cols / kGroup;
  const int64_t chunk = std::min(batch, kTokenChunk);
  const bool tables = kernel != AddonlyKernel::avx512_mask;
  // Reused per thread: every entry read is written first (build_tables, block_sums).
  float* lut = tables ? detail::scratch<float>(detail::ScratchSlot::gemm_tables,
                                               chunk * groups * kLutEntries)
                      : nullptr;
  float* xtsum = detail::scratch<float>(detail::ScratchSlot::gemm_sums, chunk * nb);
  GemmCtx c{};
  c.ternary = levels == Levels::ternary;
  c.sign = sign;
  c.nonzero = c.ternary ? nonzero : nullptr;
  c.scale = scale;
  c.mean = mean;
  c.out = out;
  c.words = L.words_per_row();
  c.nb = nb;
  c.words_per_block = L.code_cols(0) / kWordBits;
  c.last_words = L.code_cols(nb - 1) / kWordBits;
  c.lut = lut;
  c.lut_stride = groups * kLutEntries;
  c.xtsum = xtsum;
  const detail::GemmKernel fn = kernel_fn(kernel);
  const int64_t tiles = (out + kTileRows - 1) / kTileRows;
  const double planes = c.ternary ? 2.0 : 1.0;
  const int64_t token_grain =
      grain_for(kMinChunkEntries, static_cast<double>(tables ? c.lut_stride : nb));
  for (int64_t t0 = 0; t0 < batch; t0 += chunk) {
    c.tokens = std::min(chunk, batch - t0);
    c.xt = xt + t0 * cols;
    c.xsum = xsum + t0 * nb;
    c.y = y + t0 * out;
    detail::parallel_for(c.tokens, threads, token_grain, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        if (tables) build_tables(xt + (t0 + t) * cols, groups, lut + t * c.lut_stride);
        block_sums(L, xt + (t0 + t) * cols, xtsum + t * nb);
      }
    });
    const double tile_words =
        static_cast<double>(kTileRows) * static_cast<double>(c.words) * c.tokens * planes;
    detail::parallel_for(tiles, threads, grain_for(kMinChunkWords, tile_words),
                         [&](int64_t b, int64_t e) {
                           fn(c, b * kTileRows, std::min(out, e * kTileRows));
                         });
  }
  return Status::ok;
}

}  // namespace

Status addonly_gemm_variant(AddonlyKernel kernel, const BlockLayout& L, Levels levels,
                            const word_t* sign, const word_t* nonzero, const uint16_t* scale,
                            const uint16_t* mean, int64_t out, const float* xt,
                            const float* xsum, int64_t batch, float* y, int threads) noexcept {
  const Status s = check_args(L, levels, sign, nonzero, scale, mean, out, xt, xsum, batch, y);
  if (s != Status::ok || out == 0 || batch == 0) return s;
  if (kernel == AddonlyKernel::automatic) kernel = best_kernel();
  if (!cpu_has(kernel)) return Status::not_built;
  // The tables of a huge layer may not fit (out_of_memory); a kernel's worker may throw too.
  return detail::guarded([&] {
    return run(kernel, L, levels, sign, nonzero, scale, mean, out, xt, xsum, batch, y, threads);
  });
}

Status addonly_gemm(const BlockLayout& L, Levels levels, const word_t* sign,
                    const word_t* nonzero, const uint16_t* scale, const uint16_t* mean,
                    int64_t out, const float* xt, const float* xsum, int64_t batch, float* y,
                    int threads) noexcept {
  return addonly_gemm_variant(AddonlyKernel::automatic, L, levels, sign, nonzero, scale, mean,
                              out, xt, xsum, batch, y, threads);
}

const char* addonly_kernel_name(AddonlyKernel kernel) noexcept {
  switch (kernel == AddonlyKernel::automatic ? best_kernel() : kernel) {
    case AddonlyKernel::portable: return "portable";
    case AddonlyKernel::avx2: return "avx2-lut";
    case AddonlyKernel::avx512: return "avx512-lut";
    case AddonlyKernel::avx512_mask: return "avx512-mask";
    default: return "unknown";
  }
}

bool addonly_kernel_supported(AddonlyKernel kernel) noexcept {
  return kernel == AddonlyKernel::automatic || cpu_has(kernel);
}

const char* addonly_kernel_name() noexcept { return addonly_kernel_name(AddonlyKernel::automatic); }

}  // namespace sdq
