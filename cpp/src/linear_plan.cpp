// LinearPlan (linear_plan.h): one layer call = activation_transform + the GEMM chosen once, with
// the transform's output kept per calling thread so that layers sharing an input reuse it.
#include "sdq/linear_plan.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <vector>

#include "guard.h"
#include "lut_gemm.h"
#include "project.h"
#include "scale_tiles.h"
#include "scratch.h"
#include "sdq/amx_gemm.h"
#include "trit5_tables.h"
#include "sdq/gemv.h"
#include "sdq/lut_gemm.h"
#include "sdq/threads.h"
#include "sdq/trit5.h"

namespace sdq {

namespace detail {
// The int8 tables a transform builds with it (TableSink): none, the binary table GEMM's or the
// ternary (trit5) one's.
enum class PlanTables : int { none, binary, ternary };
}  // namespace detail

using Tables = detail::PlanTables;

// The transform's constants, owned (so plans sharing them need not keep each other's arrays
// alive), with an id that no other set of constants ever had (addresses get reused, ids do not).
// down_full_bf16 / down_last_bf16: the down-samplers packed for the bf16 AMX projection
// (project.h), where the CPU has it; empty otherwise.
struct TransformConstants {
  uint64_t id;
  BlockLayout layout;
  bool hadamard;
  std::vector<float> signs, down_full, down_last;
  std::vector<uint16_t> down_full_bf16, down_last_bf16;
};

namespace {

std::vector<float> copy_of(const float* p, int64_t n) {
  return p ? std::vector<float>(p, p + n) : std::vector<float>{};
}

bool equal_to(const std::vector<float>& v, const float* p) noexcept {
  return v.empty() ? p == nullptr : p && std::memcmp(v.data(), p, v.size() * sizeof(float)) == 0;
}

bool same_layout(const BlockLayout& a, const BlockLayout& b) noexcept {
  return a.in_features == b.in_features && a.block_size == b.block_size && a.osr == b.osr;
}

bool same_constants(const TransformConstants& c, const LinearPlanDesc& d) noexcept {
  return same_layout(c.layout, d.layout) && c.hadamard == d.hadamard &&
         equal_to(c.signs, d.hadamard ? d.signs : nullptr) && equal_to(c.down_full, d.down_full) &&
         equal_to(c.down_last, d.down_last);
}

// The constants of d, shared with every live plan whose constants are equal by content: compared
// once here, at create, so run only compares ids.
std::shared_ptr<const TransformConstants> shared_constants(const LinearPlanDesc& d) {
  static std::mutex mutex;
  static std::vector<std::weak_ptr<const TransformConstants>> live;
  static uint64_t next_id = 1;
  const std::lock_guard<std::mutex> lock(mutex);
  live.erase(std::remove_if(live.begin(), live.end(), [](const auto& w) { return w.expired(); }),
             live.end());
  for (const auto& w : live)
    if (auto c = w.lock(); c && same_constants(*c, d)) return c;
  const BlockLayout& L = d.layout;
  const int64_t last = L.num_blocks() - 1;
  auto c = std::make_shared<TransformConstants>(TransformConstants{
      next_id++, L, d.hadamard, copy_of(d.hadamard ? d.signs : nullptr, L.block_size),
      copy_of(d.down_full, L.padded(0) * L.m(0)), copy_of(d.down_last, L.padded(last) * L.m(last)),
      {}, {}});
  if (last > 0) c->down_full_bf16 = detail::project_amx_packed(d.down_full, L.padded(0), L.m(0));
  c->down_last_bf16 = detail::project_amx_packed(d.down_last, L.padded(last), L.m(last));
  live.push_back(c);
  return c;
}


// What this thread's plan_* scratch slots hold: the transform of `batch` rows (copied to the
// plan_input slot) by the constants with id `id`, projected in bf16 or not, with which tables;
// id 0: nothing valid.
struct LastTransform {
  uint64_t id = 0;
  int64_t batch = 0;
  bool bf16 = false;
  Tables tables = Tables::none;
};
thread_local LastTransform t_last;
thread_local uint64_t t_hits = 0;

// Automatic plans run their AMX GEMM from this many tokens where the CPU has AMX. Measured (2
// threads, OSR 2, 576x576 to 4096x4096): binary, the table kernel is faster up to 4 tokens, the
// two are even at 6 and AMX is 1.2-2x faster from 8; ternary (whose trit5 codes cost more to
// unpack), even at 6-8, AMX 1.8-2.1x faster at 16 and 3-4x at 64. AMX unpacks every code once
// per call, which the tables' look-ups only beat when enough tokens share it.
constexpr int64_t kAmxMinBatchBinary = 6;
constexpr int64_t kAmxMinBatchTernary = 8;

// The one place that decides which GEMM a plan runs. Automatic: the int8-table kernels (binary:
// lut_binary; ternary: trit5 when the desc has the trit5 form; on AMX CPUs their AMX GEMM for
// prefill batches, LinearPlan::gemm), else the exact float kernel. The int8 kernels round the
// activations (lut_gemm.h, amx_gemm.h, trit5.h); addonly stays the exact one.
Status choose_gemm(const LinearPlanDesc& d, PlanGemm* gemm) noexcept {
  const bool binary = d.levels == Levels::binary;
  const bool has_planes = d.sign && (binary || d.nonzero);
  const bool has_lut = binary && d.lut_codes;
  const bool has_trit5 = !binary && d.trits && d.trit_signs;
  PlanGemm g = d.gemm;
  if (g == PlanGemm::automatic) {
    g = has_lut ? PlanGemm::lut_binary : has_trit5 ? PlanGemm::trit5 : PlanGemm::addonly;
  }
  switch (g) {
    case PlanGemm::addonly:
      if (!has_planes) return Status::null_pointer;
      break;
    case PlanGemm::lut_binary:
      if (!binary) return Status::bad_levels;
      if (!has_lut) return Status::null_pointer;
      break;
    case PlanGemm::amx_binary:
      if (!binary) return Status::bad_levels;
      if (!has_lut) return Status::null_pointer;
      if (!amx_gemm_supported()) return Status::not_built;
      break;
    case PlanGemm::trit5:
      if (binary) return Status::bad_levels;
      if (!has_trit5) return Status::null_pointer;
      break;
    case PlanGemm::amx_ternary:
      if (binary) return Status::bad_levels;
      if (!has_trit5) return Status::null_pointer;
      if (!amx_gemm_supported()) return Status::not_built;
      break;
    default:
      return Status::bad_value;
  }
  *gemm = g;
  return Status::ok;
}

// With sdq's own pool (sdq/threads.h), a call with less work than this (tokens x (out + block)
// x code columns: the GEMM's look-ups and the transform's projection) runs on the calling thread
// alone. Measured inside a compiled decode step of the default model (576/1536-wide layers,
// batch 1, 2 cores): every such layer was as fast or faster on one thread, and the whole step 15%
// faster, because the pool's worker, spinning after each call, took the core that torch's OpenMP
// threads needed between the layers. On torch's own OpenMP team (the openmp backend) there is
// no such contest, and splitting every layer made the same step 13% faster still.
constexpr int64_t kInlineWork = int64_t{4} << 20;

int call_threads(const LinearPlanDesc& d, int64_t batch, int threads) noexcept {
  if (thread_backend() == ThreadBackend::openmp) return threads;
  const int64_t work = batch * (d.out + d.layout.block_size) * d.layout.total_code_cols();
  return work < kInlineWork ? 1 : threads;
}

Status check_desc(const LinearPlanDesc& d) noexcept {
  if (d.levels != Levels::binary && d.levels != Levels::ternary) return Status::bad_levels;
  if (!d.layout.valid() || d.out <= 0) return Status::bad_size;
  if (!d.scale || !d.mean || !d.down_last || (d.hadamard && !d.signs)) return Status::null_pointer;
  if (d.layout.num_blocks() > 1 && !d.down_full) return Status::null_pointer;
  return Status::ok;
}

}  // namespace

LinearPlan::LinearPlan(const LinearPlanDesc& desc, PlanGemm gemm, bool amx_prefill,
                       std::shared_ptr<const TransformConstants> transform,
                       std::vector<uint16_t> scale_tiles) noexcept
    : desc_(desc), gemm_(gemm), amx_prefill_(amx_prefill), transform_(std::move(transform)),
      scale_tiles_(std::move(scale_tiles)) {}

const uint16_t* LinearPlan::scale_tiles() const noexcept {
  return scale_tiles_.empty() ? nullptr : scale_tiles_.data();
}

LinearPlan::~LinearPlan() = default;

Status LinearPlan::create(const LinearPlanDesc& desc, std::unique_ptr<LinearPlan>* plan) noexcept {
  if (!plan) return Status::null_pointer;
  Status s = check_desc(desc);
  PlanGemm gemm = PlanGemm::automatic;
  if (s == Status::ok) s = choose_gemm(desc, &gemm);
  if (s != Status::ok) return s;
  const bool amx_prefill = desc.gemm == PlanGemm::automatic &&
                           (gemm == PlanGemm::lut_binary || gemm == PlanGemm::trit5) &&
                           amx_gemm_supported();
  return detail::guarded([&] {
    // The int8-table GEMMs' scales laid out per tile once (scale_tiles.h), not per call.
    std::vector<uint16_t> tiles;
    if (gemm == PlanGemm::lut_binary || gemm == PlanGemm::trit5) {
      const int64_t nb = desc.layout.num_blocks(), out = desc.out;
      tiles.resize(detail::scale_tiles_size(out, nb));
      detail::scale_tiles_fill(desc.scale, desc.mean, out, nb, 0,
                               (out + detail::kScaleTileRows - 1) / detail::kScaleTileRows,
                               tiles.data());
    }
    plan->reset(new LinearPlan(desc, gemm, amx_prefill, shared_constants(desc), std::move(tiles)));
    return Status::ok;
  });
}

struct LinearPlan::Transformed {
  const float* xt = nullptr;
  const float* xsum = nullptr;
  const int8_t* tables = nullptr;  // the int8 tables of the table GEMM, when built (TableSink)
  const float* scales = nullptr;   // their scales (binary) or steps (ternary), [batch, nb]
};

namespace {

// Where a transform builds the int8-table GEMMs' tables, block by block as each block's codes
// land in xt (detail::VectorSink): on both threads, from codes still in L1, instead of on one
// thread after the transform; and layers that share the transform share them.
struct TableSink {
  Tables kind = Tables::none;
  const BlockLayout* layout = nullptr;
  detail::LutTableForm binary{};
  detail::Trit5TableForm ternary{};
  int8_t* tables = nullptr;
  float* scales = nullptr;
  int64_t token_bytes = 0, nb = 0;

  TableSink(Tables k, const BlockLayout& L) : kind(k), layout(&L), nb(L.num_blocks()) {
    if (k == Tables::binary) {
      binary = detail::lut_table_form(L);
      token_bytes = binary.groups * detail::kLutEntries;
    } else if (k == Tables::ternary) {
      ternary = detail::trit5_table_form(L);
      token_bytes = ternary.token_bytes;
    }
  }
  static void build(void* ctx, const float* xt_token, int64_t token, int64_t block) {
    const auto& s = *static_cast<const TableSink*>(ctx);
    int8_t* q = s.tables + token * s.token_bytes;
    float* scale = s.scales + token * s.nb;
    if (s.kind == Tables::binary)
      s.binary.build(s.binary.shape, xt_token, block, q, scale);
    else
      s.ternary.build(*s.layout, xt_token, s.ternary.stride, block, q, scale);
  }
};

}  // namespace

// Points *out at the transform of x: this thread's last one when it is the same (see the
// header), else computed into this thread's plan_* slots. bf16: the AMX projection (project.h),
// for the int8 GEMMs, which round its output to int8 next, where the constants have its form
// (elsewhere the float32 one runs, and the kept transform is keyed as what ran: an exact-kernel
// call on a CPU without AMX-BF16 reuses an int8 call's transform). tables: build that table
// GEMM's tables too (a kept transform without them is computed again).
Status LinearPlan::transform(const float* x, int64_t batch, bool bf16, Tables tables,
                             int threads, Transformed* out) const {
  const TransformConstants& c = *transform_;
  const BlockLayout& L = c.layout;
  bf16 = bf16 && !c.down_last_bf16.empty();  // the last group always has one where any has
  const int64_t n = batch * L.in_features, nb = L.num_blocks();
  const bool same_key = t_last.id == c.id && t_last.batch == batch && t_last.bf16 == bf16 &&
                        (tables == Tables::none || t_last.tables == tables);
  // Same key: the slots already have these sizes, so scratch() hands back the same buffers.
  // Otherwise they may be reallocated (or fail to be): forget what they held first.
  if (!same_key) t_last = LastTransform{};
  float* saved = detail::scratch<float>(detail::ScratchSlot::plan_input, n);
  float* out_xt = detail::scratch<float>(detail::ScratchSlot::plan_xt, batch * L.total_code_cols());
  float* out_xsum = detail::scratch<float>(detail::ScratchSlot::plan_xsum, batch * nb);
  *out = Transformed{out_xt, out_xsum, nullptr, nullptr};
  TableSink sink(tables, L);
  if (tables != Tables::none) {
    const int64_t q_bytes = (batch * sink.token_bytes + 63) / 64 * 64;
    auto* buf = detail::scratch<uint8_t>(detail::ScratchSlot::plan_tables,
                                         q_bytes + batch * nb * int64_t{sizeof(float)});
    sink.tables = reinterpret_cast<int8_t*>(buf);
    sink.scales = reinterpret_cast<float*>(buf + q_bytes);
    out->tables = sink.tables;
    out->scales = sink.scales;
  }
  if (same_key && std::memcmp(saved, x, static_cast<size_t>(n) * sizeof(float)) == 0) {
    ++t_hits;
    return Status::ok;
  }
  t_last = LastTransform{};  // a failure below leaves nothing to reuse
  const auto form = [bf16](const std::vector<float>& down, const std::vector<uint16_t>& packed) {
    return detail::Projection{down.empty() ? nullptr : down.data(),
                              bf16 && !packed.empty() ? packed.data() : nullptr};
  };
  const detail::VectorSink vs{TableSink::build, &sink};
  const Status s = detail::activation_transform_projected(
      L, c.hadamard, c.signs.empty() ? nullptr : c.signs.data(),
      form(c.down_full, c.down_full_bf16), form(c.down_last, c.down_last_bf16), x, batch, out_xt,
      out_xsum, threads, saved, tables != Tables::none ? &vs : nullptr);
  if (s != Status::ok) return s;
  t_last = LastTransform{c.id, batch, bf16, tables};
  return Status::ok;
}

Status LinearPlan::gemm_run(PlanGemm g, const Transformed& t, int64_t batch, float* y,
                            int threads) const noexcept {
  const LinearPlanDesc& d = desc_;
  const float *xt = t.xt, *xsum = t.xsum;
  switch (g) {
    case PlanGemm::addonly:
      return addonly_gemm(d.layout, d.levels, d.sign, d.nonzero, d.scale, d.mean, d.out, xt,
                          xsum, batch, y, threads);
    case PlanGemm::lut_binary:
      if (t.tables)
        return detail::lut_gemm_binary_prebuilt(d.layout, d.lut_codes, d.scale, d.mean,
                                                scale_tiles(), d.out, t.tables, t.scales, xsum,
                                                batch, y, threads);
      return detail::lut_gemm_binary_tiled(d.layout, d.lut_codes, d.scale, d.mean,
                                           scale_tiles(), d.out, xt, xsum, batch, y, threads);
    case PlanGemm::amx_binary:
      return detail::amx_gemm_binary_tiled(d.layout, d.lut_codes, d.scale, d.mean, scale_tiles(),
                                           d.out, xt, xsum, batch, y, threads);
    case PlanGemm::trit5:
      if (t.tables)
        return detail::trit5_gemm_prebuilt(d.layout, d.trits, d.trit_signs, d.scale, d.mean,
                                           scale_tiles(), d.out, t.tables, t.scales, xsum, batch,
                                           y, threads);
      return detail::trit5_gemm_tiled(d.layout, d.trits, d.trit_signs, d.scale, d.mean,
                                      scale_tiles(), d.out, xt, xsum, batch, y, threads);
    case PlanGemm::amx_ternary:
      return detail::amx_gemm_ternary_tiled(d.layout, d.trits, d.trit_signs, d.scale, d.mean,
                                            scale_tiles(), d.out, xt, xsum, batch, y, threads);
    default:
      return Status::bad_value;
  }
}

Status LinearPlan::run(const float* x, int64_t batch, float* y, int threads) const noexcept {
  if (batch < 0) return Status::bad_size;
  if (batch == 0) return Status::ok;
  if (!x || !y) return Status::null_pointer;
  threads = call_threads(desc_, batch, threads);
  return detail::guarded([&] {
    const PlanGemm g = gemm(batch);
    const bool bf16 = g != PlanGemm::addonly;  // int8 GEMMs next (header: transform precision)
    // the table GEMMs' tables built with the transform (TableSink), one token chunk's worth
    const Tables tables = g == PlanGemm::lut_binary && batch <= detail::kLutTokenChunk
                              ? Tables::binary
                          : g == PlanGemm::trit5 && batch <= detail::kTrit5TokenChunk
                              ? Tables::ternary
                              : Tables::none;
    Transformed t;
    const Status s = transform(x, batch, bf16, tables, threads, &t);
    return s != Status::ok ? s : gemm_run(g, t, batch, y, threads);
  });
}

bool LinearPlan::shares_transform_with(const LinearPlan& other) const noexcept {
  return transform_ == other.transform_;
}

PlanGemm LinearPlan::gemm(int64_t batch) const noexcept {
  if (!amx_prefill_) return gemm_;
  if (gemm_ == PlanGemm::lut_binary)
    return batch >= kAmxMinBatchBinary ? PlanGemm::amx_binary : gemm_;
  return batch >= kAmxMinBatchTernary ? PlanGemm::amx_ternary : gemm_;
}

const char* LinearPlan::gemm_name(int64_t batch) const noexcept {
  switch (gemm(batch)) {
    case PlanGemm::addonly: return "addonly";
    case PlanGemm::lut_binary: return "lut_binary";
    case PlanGemm::amx_binary: return "amx_binary";
    case PlanGemm::amx_ternary: return "amx_ternary";
    case PlanGemm::trit5: return "trit5";
    default: return "unknown";
  }
}

const char* LinearPlan::kernel_name(int64_t batch) const noexcept {
  switch (gemm(batch)) {
    case PlanGemm::addonly: return addonly_kernel_name();
    case PlanGemm::lut_binary: return lut_kernel_name();
    case PlanGemm::amx_binary:
    case PlanGemm::amx_ternary: return "amx";
    case PlanGemm::trit5: return trit5_kernel_name();
    default: return "unknown";
  }
}

uint64_t linear_plan_transform_hits() noexcept { return t_hits; }

}  // namespace sdq
