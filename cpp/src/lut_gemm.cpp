// lut_gemm_binary (sdq/lut_gemm.h): argument checks, the packed layout, the per-call int8 tables
// (built per token, in parallel), the run-time choice of variant and the split of row tiles over
// threads. Table builders and row kernels live in lut_gemm_<isa>.cpp.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "guard.h"
#include "lut_gemm.h"
#include "parallel.h"
#include "scale_tiles.h"
#include "scratch.h"

namespace sdq {
namespace {

using detail::kLutEntries;
using detail::kLutGroup;
using detail::LutCtx;

constexpr int64_t kTokenChunk = detail::kLutTokenChunk;
// The least work worth a chunk of its own: a few microseconds (a spinning worker joins within
// ~1-3 us, thread_pool.cpp; see trit5_gemm.cpp).
constexpr double kMinChunkBytes = 1 << 14;   // packed code bytes looked up (x tokens)
constexpr double kMinChunkGroups = 8192;     // tables built

using detail::grain_for;

bool cpu_has(LutKernel k) noexcept {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  if (k == LutKernel::avx2) return avx2;
  const bool bw = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  if (k == LutKernel::avx512) return bw;
  if (k == LutKernel::avx512_vnni)
    return bw && __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni");
#elif defined(__aarch64__)
  if (k == LutKernel::neon) return true;  // AArch64 has NEON always
#endif
  return k == LutKernel::portable;
}

LutKernel best_kernel() noexcept {
  static const LutKernel best = cpu_has(LutKernel::neon)          ? LutKernel::neon
                                : cpu_has(LutKernel::avx512_vnni) ? LutKernel::avx512_vnni
                                : cpu_has(LutKernel::avx512) ? LutKernel::avx512
                                : cpu_has(LutKernel::avx2) ? LutKernel::avx2
                                                           : LutKernel::portable;
  return best;
}

detail::LutRows rows_fn(LutKernel k) noexcept {
  switch (k) {
    case LutKernel::avx512_vnni: return detail::lut_rows_avx512_vnni;
    case LutKernel::avx512: return detail::lut_rows_avx512;
    case LutKernel::avx2: return detail::lut_rows_avx2;
    case LutKernel::neon: return detail::lut_rows_neon;
    default: return detail::lut_rows_portable;
  }
}

Status check_args(const BlockLayout& L, const uint8_t* packed, const uint16_t* scale,
                  const uint16_t* mean, int64_t out, const float* xt, const float* xsum,
                  int64_t batch, float* y) noexcept {
  if (!L.valid() || out < 0 || batch < 0) return Status::bad_size;
  if (out == 0 || batch == 0) return Status::ok;
  if (!packed || !scale || !mean || !xt || !xsum || !y) return Status::null_pointer;
  return Status::ok;
}

detail::LutTableShape table_shape(LutKernel kernel, const BlockLayout& L) noexcept {
  const int64_t nb = L.num_blocks();
  return {nb, L.code_cols(0) / kLutGroup, L.code_cols(nb - 1) / kLutGroup,
          kernel == LutKernel::avx512_vnni};
}

bool is_x86(LutKernel kernel) noexcept {
  return kernel == LutKernel::avx2 || kernel == LutKernel::avx512 ||
         kernel == LutKernel::avx512_vnni;
}

detail::LutBlockTablesFn block_tables_fn(LutKernel kernel) noexcept {
  return is_x86(kernel) ? detail::lut_block_tables_avx2 : detail::lut_block_tables_portable;
}

// The rows of every tile for the tokens of c (tables in c.q, c.tscale). fill: scale tiles to lay
// out first (each worker its own), or null.
void rows_phase(LutKernel kernel, LutCtx& c, int threads, uint16_t* fill) {
  const detail::LutRows fn = rows_fn(kernel);
  const int64_t tiles = (c.out + kLutTileRows - 1) / kLutTileRows;
  const double tile_cost = static_cast<double>(c.tile_bytes) * static_cast<double>(c.tokens);
  detail::parallel_for(tiles, threads, grain_for(kMinChunkBytes, tile_cost),
                       [&](int64_t b, int64_t e) {
    if (fill) detail::scale_tiles_fill(c.scale, c.mean, c.out, c.nb, b, e, fill);
    fn(c, b, e);
  });
}

LutCtx make_ctx(const BlockLayout& L, const uint8_t* packed, const uint16_t* scale,
                const uint16_t* mean, const uint16_t* scale_tiles, int64_t out) noexcept {
  LutCtx c{};
  c.packed = packed;
  c.scale = scale;
  c.mean = mean;
  c.scale_tiles = scale_tiles;
  c.out = out;
  c.nb = L.num_blocks();
  c.tile_bytes = lut_tile_bytes(L);
  c.pairs_per_block = L.code_cols(0) / 8;
  c.last_pairs = L.code_cols(c.nb - 1) / 8;
  c.groups = L.total_code_cols() / kLutGroup;
  return c;
}

Status run(LutKernel kernel, const BlockLayout& L, const uint8_t* packed, const uint16_t* scale,
           const uint16_t* mean, const uint16_t* scale_tiles, int64_t out, const float* xt,
           const float* xsum, int64_t batch, float* y, int threads) {
  const int64_t nb = L.num_blocks(), cols = L.total_code_cols(), groups = cols / kLutGroup;
  const int64_t chunk = std::min(batch, kTokenChunk);
  const detail::LutTableShape shape = table_shape(kernel, L);
  // One buffer: the int8 tables, then (64-byte aligned) the table scales. Every entry read is
  // written first by the table builder.
  const int64_t q_bytes = (chunk * groups * kLutEntries + 63) / 64 * 64;
  auto* buf = detail::scratch<uint8_t>(detail::ScratchSlot::lut_tables,
                                       q_bytes + chunk * nb * static_cast<int64_t>(sizeof(float)));
  auto* q = reinterpret_cast<int8_t*>(buf);
  auto* tscale = reinterpret_cast<float*>(buf + q_bytes);
  const detail::LutBlockTablesFn tables_fn = block_tables_fn(kernel);
  // The x86 variants read the scales laid out per tile (scale_tiles.h): a plan's, else laid out
  // here, each worker its own tiles in the first token chunk (every tile before any is read).
  uint16_t* own_tiles = is_x86(kernel) && !scale_tiles
                           ? detail::scratch<uint16_t>(detail::ScratchSlot::scale_tiles,
                                                       detail::scale_tiles_size(out, nb))
                           : nullptr;
  LutCtx c = make_ctx(L, packed, scale, mean, own_tiles ? own_tiles : scale_tiles, out);
  c.q = q;
  c.tscale = tscale;
  const int64_t token_grain = grain_for(kMinChunkGroups, static_cast<double>(groups));
  for (int64_t t0 = 0; t0 < batch; t0 += chunk) {
    c.tokens = std::min(chunk, batch - t0);
    c.xsum = xsum + t0 * nb;
    c.y = y + t0 * out;
    detail::parallel_for(c.tokens, threads, token_grain, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t)
        for (int64_t k = 0; k < nb; ++k)
          tables_fn(shape, xt + (t0 + t) * cols, k, q + t * groups * kLutEntries, tscale + t * nb);
    });
    rows_phase(kernel, c, threads, t0 == 0 ? own_tiles : nullptr);
  }
  return Status::ok;
}

}  // namespace

int64_t lut_tile_bytes(const BlockLayout& L) noexcept {
  return L.words_per_row() * static_cast<int64_t>(sizeof(word_t)) * kLutTileRows;
}

int64_t lut_packed_bytes(const BlockLayout& L, int64_t out) noexcept {
  if (!L.valid() || out < 0) return 0;
  return (out + kLutTileRows - 1) / kLutTileRows * lut_tile_bytes(L);
}

Status lut_pack_binary(const BlockLayout& L, const word_t* sign_planes, int64_t out,
                       uint8_t* packed, int threads) noexcept {
  if (!L.valid() || out < 0) return Status::bad_size;
  if (out == 0) return Status::ok;
  if (!sign_planes || !packed) return Status::null_pointer;
  return detail::guarded([&] {
    const int64_t words = L.words_per_row(), tile = lut_tile_bytes(L);
    const int64_t tiles = (out + kLutTileRows - 1) / kLutTileRows;
    detail::parallel_for(tiles, threads, grain_for(kMinChunkBytes, static_cast<double>(tile)),
                         [&](int64_t b, int64_t e) {
      for (int64_t k = b; k < e; ++k) {
        uint8_t* dst = packed + k * tile;
        for (int64_t i = 0; i < kLutTileRows; ++i) {
          const int64_t r = k * kLutTileRows + i;
          uint8_t row[4];
          for (int64_t w = 0; w < words; ++w) {
            const word_t v = r < out ? sign_planes[r * words + w] : 0;
            for (int j = 0; j < 4; ++j) row[j] = static_cast<uint8_t>(v >> (8 * j));  // little end
            for (int j = 0; j < 4; ++j) dst[(4 * w + j) * kLutTileRows + i] = row[j];
          }
        }
      }
    });
    return Status::ok;
  });
}

Status lut_gemm_binary(const BlockLayout& L, const uint8_t* packed, const uint16_t* scale,
                       const uint16_t* mean, int64_t out, const float* xt, const float* xsum,
                       int64_t batch, float* y, int threads, LutKernel kernel) noexcept {
  const Status s = check_args(L, packed, scale, mean, out, xt, xsum, batch, y);
  if (s != Status::ok || out == 0 || batch == 0) return s;
  if (kernel == LutKernel::automatic) kernel = best_kernel();
  if (!cpu_has(kernel)) return Status::not_built;
  return detail::guarded([&] {
    return run(kernel, L, packed, scale, mean, nullptr, out, xt, xsum, batch, y, threads);
  });
}

namespace detail {

Status lut_gemm_binary_tiled(const BlockLayout& L, const uint8_t* packed, const uint16_t* scale,
                             const uint16_t* mean, const uint16_t* scale_tiles, int64_t out,
                             const float* xt, const float* xsum, int64_t batch, float* y,
                             int threads) noexcept {
  const Status s = check_args(L, packed, scale, mean, out, xt, xsum, batch, y);
  if (s != Status::ok || out == 0 || batch == 0) return s;
  return guarded([&] {
    return run(best_kernel(), L, packed, scale, mean, scale_tiles, out, xt, xsum, batch, y,
               threads);
  });
}

LutTableForm lut_table_form(const BlockLayout& L) noexcept {
  return {table_shape(best_kernel(), L), block_tables_fn(best_kernel()),
          L.total_code_cols() / kLutGroup};
}

Status lut_gemm_binary_prebuilt(const BlockLayout& L, const uint8_t* packed, const uint16_t* scale,
                                const uint16_t* mean, const uint16_t* scale_tiles, int64_t out,
                                const int8_t* q, const float* tscale, const float* xsum,
                                int64_t batch, float* y, int threads) noexcept {
  if (!L.valid() || out < 0 || batch < 0 || batch > kTokenChunk) return Status::bad_size;
  if (out == 0 || batch == 0) return Status::ok;
  if (!packed || !scale || !mean || !scale_tiles || !q || !tscale || !xsum || !y)
    return Status::null_pointer;
  return guarded([&] {
    LutCtx c = make_ctx(L, packed, scale, mean, scale_tiles, out);
    c.q = q;
    c.tscale = tscale;
    c.tokens = batch;
    c.xsum = xsum;
    c.y = y;
    rows_phase(best_kernel(), c, threads, nullptr);
    return Status::ok;
  });
}

}  // namespace detail

const char* lut_kernel_name(LutKernel kernel) noexcept {
  switch (kernel == LutKernel::automatic ? best_kernel() : kernel) {
    case LutKernel::portable: return "portable";
    case LutKernel::avx2: return "avx2";
    case LutKernel::avx512: return "avx512";
    case LutKernel::avx512_vnni: return "avx512-vnni";
    case LutKernel::neon: return "neon";
    default: return "unknown";
  }
}

bool lut_kernel_supported(LutKernel kernel) noexcept {
  return kernel == LutKernel::automatic || cpu_has(kernel);
}

}  // namespace sdq
