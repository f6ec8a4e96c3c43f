// trit5_gemm (trit5.h): argument checks, the per-token int8 tables, run-time choice of variant and
// the split of row tiles over threads. The variants live in trit5_gemm_<isa>.cpp.
#include <algorithm>
#include <cmath>

#include "guard.h"
#include "parallel.h"
#include "scale_tiles.h"
#include "scratch.h"
#include "trit5_gemm.h"

namespace sdq {
namespace {

using detail::Trit5Ctx;

constexpr int64_t kTokenChunk = detail::kTrit5TokenChunk;
// The least work worth a chunk of its own: a few microseconds, since a worker spinning between
// jobs joins within ~1-3 us (thread_pool.cpp); a sleeping one costs ~10-50 us, but in a decode
// loop the layers come faster than the spin ends.
constexpr double kMinChunkPairs = 1024;    // (pair x 32 rows) look-ups, ~1-2 ns each
constexpr double kMinChunkGroups = 16384;  // table groups built, ~3 ns each

using detail::grain_for;

bool cpu_has(Trit5Kernel k) noexcept {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (k == Trit5Kernel::avx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (k == Trit5Kernel::avx2)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#elif defined(__aarch64__)
  if (k == Trit5Kernel::neon) return true;  // AArch64 has NEON always
#endif
  return k == Trit5Kernel::portable;
}

Trit5Kernel best_kernel() noexcept {
  static const Trit5Kernel best = cpu_has(Trit5Kernel::neon)     ? Trit5Kernel::neon
                                  : cpu_has(Trit5Kernel::avx512) ? Trit5Kernel::avx512
                                  : cpu_has(Trit5Kernel::avx2) ? Trit5Kernel::avx2
                                                               : Trit5Kernel::portable;
  return best;
}

struct Variant {
  detail::Trit5TableFn tables;
  detail::Trit5RowsFn rows;
  int64_t table_stride;
  bool x86;  // reads the scales in the scale_tiles.h layout
};

Variant variant(Trit5Kernel k) noexcept {
  using namespace detail;
  switch (k) {
    case Trit5Kernel::avx512:
      return {trit5_block_tables_avx512, trit5_rows_avx512, 2 * kTrit5Entries, true};
    case Trit5Kernel::avx2:
      return {trit5_block_tables_avx2, trit5_rows_avx2, kTrit5Entries, true};
    case Trit5Kernel::neon:
      return {trit5_block_tables_portable, trit5_rows_neon, kTrit5Entries, false};
    default:
      return {trit5_block_tables_portable, trit5_rows_portable, kTrit5Entries, false};
  }
}

Status check_args(const BlockLayout& L, const uint8_t* trits, const uint32_t* trit_signs,
                  const uint16_t* scale, const uint16_t* mean, int64_t out, const float* xt,
                  const float* xsum, int64_t batch, float* y) noexcept {
  if (!L.valid() || out < 0 || batch < 0) return Status::bad_size;
  if (out == 0 || batch == 0) return Status::ok;
  if (!trits || !trit_signs || !scale || !mean || !xt || !xsum || !y) return Status::null_pointer;
  return Status::ok;
}

Trit5Ctx make_ctx(const Variant& v, const BlockLayout& L, const uint8_t* trits,
                  const uint32_t* trit_signs, const uint16_t* scale, const uint16_t* mean,
                  const uint16_t* scale_tiles, int64_t out) noexcept {
  Trit5Ctx c{};
  c.trits = trits;
  c.signs = trit_signs;
  c.scale = scale;
  c.mean = mean;
  c.scale_tiles = scale_tiles;
  c.out = out;
  c.nb = L.num_blocks();
  c.groups = trit5_total_groups(L);
  c.gp_full = trit5_padded_groups(L, 0);
  c.gp_last = trit5_padded_groups(L, c.nb - 1);
  c.table_stride = v.table_stride;
  return c;
}

// The rows of every tile for the tokens of c (tables in c.tables, c.step). fill: scale tiles to
// lay out first (each worker its own), or null.
void rows_phase(const Variant& v, const Trit5Ctx& c, int threads, uint16_t* fill) {
  const double tile_pairs = static_cast<double>(c.groups / 2);
  const int64_t grain = grain_for(kMinChunkPairs, tile_pairs * static_cast<double>(c.tokens));
  detail::parallel_for(trit5_tiles(c.out), threads, grain, [&](int64_t b, int64_t e) {
    if (fill) detail::scale_tiles_fill(c.scale, c.mean, c.out, c.nb, b, e, fill);
    v.rows(c, b, e);
  });
}

Status run(const Variant& v, const BlockLayout& L, const uint8_t* trits,
           const uint32_t* trit_signs, const uint16_t* scale, const uint16_t* mean,
           const uint16_t* scale_tiles, int64_t out, const float* xt, const float* xsum,
           int64_t batch, float* y, int threads) {
  const int64_t nb = L.num_blocks(), cols = L.total_code_cols();
  const int64_t chunk = std::min(batch, kTokenChunk);
  // The x86 variants read the scales laid out per tile (scale_tiles.h): a plan's, else laid out
  // here, each worker its own tiles in the first token chunk (every tile before any is read).
  uint16_t* own_tiles = v.x86 && !scale_tiles
                           ? detail::scratch<uint16_t>(detail::ScratchSlot::scale_tiles,
                                                       detail::scale_tiles_size(out, nb))
                           : nullptr;
  Trit5Ctx c = make_ctx(v, L, trits, trit_signs, scale, mean,
                        own_tiles ? own_tiles : scale_tiles, out);
  // Reused per thread: every byte read is written first (the table builders write all groups).
  int8_t* tables = detail::scratch<int8_t>(detail::ScratchSlot::trit5_tables,
                                           chunk * c.token_table_bytes() + chunk * nb * 4);
  float* step = reinterpret_cast<float*>(tables + chunk * c.token_table_bytes());
  c.tables = tables;
  c.step = step;
  for (int64_t t0 = 0; t0 < batch; t0 += chunk) {
    c.tokens = std::min(chunk, batch - t0);
    c.xsum = xsum + t0 * nb;
    c.y = y + t0 * out;
    detail::parallel_for(c.tokens, threads, grain_for(kMinChunkGroups, static_cast<double>(c.groups)),
                         [&](int64_t b, int64_t e) {
                           for (int64_t t = b; t < e; ++t)
                             for (int64_t k = 0; k < nb; ++k)
                               v.tables(L, xt + (t0 + t) * cols, c.table_stride, k,
                                        tables + t * c.token_table_bytes(), step + t * nb);
                         });
    rows_phase(v, c, threads, t0 == 0 ? own_tiles : nullptr);
  }
  return Status::ok;
}

}  // namespace

Status trit5_gemm(const BlockLayout& L, const uint8_t* trits, const uint32_t* trit_signs,
                  const uint16_t* scale, const uint16_t* mean, int64_t out, const float* xt,
                  const float* xsum, int64_t batch, float* y, int threads,
                  Trit5Kernel kernel) noexcept {
  const Status s = check_args(L, trits, trit_signs, scale, mean, out, xt, xsum, batch, y);
  if (s != Status::ok || out == 0 || batch == 0) return s;
  if (kernel == Trit5Kernel::automatic) kernel = best_kernel();
  if (!cpu_has(kernel)) return Status::not_built;
  const Variant v = variant(kernel);
  return detail::guarded([&] {
    return run(v, L, trits, trit_signs, scale, mean, nullptr, out, xt, xsum, batch, y, threads);
  });
}

namespace detail {

Status trit5_gemm_tiled(const BlockLayout& L, const uint8_t* trits, const uint32_t* trit_signs,
                        const uint16_t* scale, const uint16_t* mean, const uint16_t* scale_tiles,
                        int64_t out, const float* xt, const float* xsum, int64_t batch, float* y,
                        int threads) noexcept {
  const Status s = check_args(L, trits, trit_signs, scale, mean, out, xt, xsum, batch, y);
  if (s != Status::ok || out == 0 || batch == 0) return s;
  const Variant v = variant(best_kernel());
  return guarded([&] {
    return run(v, L, trits, trit_signs, scale, mean, scale_tiles, out, xt, xsum, batch, y,
               threads);
  });
}

Trit5TableForm trit5_table_form(const BlockLayout& L) noexcept {
  const Variant v = variant(best_kernel());
  return {v.tables, v.table_stride, trit5_total_groups(L) * v.table_stride};
}

Status trit5_gemm_prebuilt(const BlockLayout& L, const uint8_t* trits, const uint32_t* trit_signs,
                           const uint16_t* scale, const uint16_t* mean,
                           const uint16_t* scale_tiles, int64_t out, const int8_t* tables,
                           const float* step, const float* xsum, int64_t batch, float* y,
                           int threads) noexcept {
  if (!L.valid() || out < 0 || batch < 0 || batch > kTokenChunk) return Status::bad_size;
  if (out == 0 || batch == 0) return Status::ok;
  if (!trits || !trit_signs || !scale || !mean || !tables || !step || !xsum || !y)
    return Status::null_pointer;
  const Variant v = variant(best_kernel());
  if (v.x86 && !scale_tiles) return Status::null_pointer;
  return guarded([&] {
    Trit5Ctx c = make_ctx(v, L, trits, trit_signs, scale, mean, scale_tiles, out);
    c.tables = tables;
    c.step = step;
    c.tokens = batch;
    c.xsum = xsum;
    c.y = y;
    rows_phase(v, c, threads, nullptr);
    return Status::ok;
  });
}

}  // namespace detail

const char* trit5_kernel_name(Trit5Kernel kernel) noexcept {
  switch (kernel == Trit5Kernel::automatic ? best_kernel() : kernel) {
    case Trit5Kernel::portable: return "portable";
    case Trit5Kernel::avx2: return "avx2";
    case Trit5Kernel::avx512: return "avx512";
    case Trit5Kernel::neon: return "neon";
    default: return "unknown";
  }
}

bool trit5_kernel_supported(Trit5Kernel kernel) noexcept {
  return kernel == Trit5Kernel::automatic || cpu_has(kernel);
}

}  // namespace sdq
