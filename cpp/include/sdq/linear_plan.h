// A prepared linear layer: everything one add-only layer call needs, resolved once, so that a
// call is activation_transform + GEMM with no allocation and no checks repeated per call.
//
//   LinearPlanDesc d;  ... fill it from the layer's tensors ...
//   std::unique_ptr<LinearPlan> plan;
//   if (LinearPlan::create(d, &plan) == Status::ok) plan->run(x, batch, y, threads);
//
// Memory: the plan reads the packed codes, scales and means through the desc's pointers (they must
// outlive the plan); it copies the activation-transform constants (signs, down matrices), which
// are small, into an object shared by every plan whose constants are equal by content. Plans of
// the int8-table GEMMs also keep the scales and means laid out per 32-row tile (2 x 2 bytes per
// row and block: what the kernels read, instead of transposing them every call), so a change
// to the desc's scales or means after create needs a new plan.
//
// Shared transform: layers that read the same input (q/k/v; gate/up) compute the transform once.
// Each calling thread keeps the last transform it computed (xt, xsum and a copy of x), tagged with
// the shared constants' id and the batch; run reuses it when both match and x's contents are
// bitwise equal to the copy, wherever x lives: a compiled graph (torch.compile) hands q, k and v
// equal inputs in three buffers. A differing input costs a memcmp to its first difference.
//
// Transform precision: before the int8 GEMMs (tables and AMX), which round its output to int8
// next, the projection runs in bf16 on CPUs with AMX-BF16 (activation_transform_bf16,
// amx_gemm.h); before the exact kernel (addonly), and on other CPUs, it stays float32. A kept
// transform serves only calls that want the projection it ran. Before an int8-table GEMM (up to
// 16 tokens) the transform also builds that GEMM's tables, block by block, and keeps them with
// it: layers that share the transform (and the table GEMM) share the tables.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "sdq/bitplane.h"
#include "sdq/layout.h"
#include "sdq/levels.h"
#include "sdq/status.h"

namespace sdq {

namespace detail {
enum class PlanTables : int;  // linear_plan.cpp: which int8 tables a transform builds
}  // namespace detail

// Which GEMM a plan runs. `automatic` picks the best one for the codes the desc holds: the
// int8-table kernel of its levels when the desc has that form of the codes, else addonly
// (linear_plan.cpp, choose_gemm); where the CPU has AMX, prefill batches go to the AMX GEMM of
// the same codes instead (binary from 6 tokens, ternary from 8). Naming one forces it (tests,
// benchmarks).
enum class PlanGemm : int {
  automatic = 0,
  addonly = 1,      // addonly_gemm on sign (+ nonzero) bitplanes (gemv.h): exact float tables
  lut_binary = 2,   // lut_gemm_binary (lut_gemm.h) on the desc's lut_codes
  trit5 = 3,        // trit5_gemm (trit5.h) on the desc's trits / trit_signs
  amx_binary = 4,   // amx_gemm_binary (amx_gemm.h) on the desc's lut_codes (Intel AMX)
  amx_ternary = 5,  // amx_gemm_ternary (amx_gemm.h) on the desc's trits / trit_signs
};

struct LinearPlanDesc {
  BlockLayout layout{0, 0, 0.0};
  Levels levels = Levels::binary;
  int64_t out = 0;
  PlanGemm gemm = PlanGemm::automatic;
  // Codes (not copied), in one or more forms. Bitplanes [out, layout.words_per_row()], nonzero
  // null for binary (addonly reads them); binary's tile repack (lut_pack_binary, lut_gemm.h),
  // which lut_binary reads; ternary's trit5 form (trit5.h), which trit5 reads.
  const word_t* sign = nullptr;
  const word_t* nonzero = nullptr;
  const uint8_t* lut_codes = nullptr;
  const uint8_t* trits = nullptr;
  const uint32_t* trit_signs = nullptr;
  // Per row-block fp16 bit patterns [out, layout.num_blocks()] (not copied).
  const uint16_t* scale = nullptr;
  const uint16_t* mean = nullptr;
  // Activation-transform constants, as activation_transform takes them (copied by create).
  bool hadamard = true;
  const float* signs = nullptr;      // [block_size], null when !hadamard
  const float* down_full = nullptr;  // [padded(0), m(0)]; may be null with a single block
  const float* down_last = nullptr;  // [padded(nb-1), m(nb-1)]
};

struct TransformConstants;  // linear_plan.cpp

class LinearPlan {
 public:
  // Checks the desc (null_pointer, bad_size, bad_levels, not_built for a GEMM this build or CPU
  // lacks) and builds the plan; *plan is left untouched on failure.
  static Status create(const LinearPlanDesc& desc, std::unique_ptr<LinearPlan>* plan) noexcept;
  ~LinearPlan();
  LinearPlan(const LinearPlan&) = delete;
  LinearPlan& operator=(const LinearPlan&) = delete;

  // y [batch, out] = the layer applied to x [batch, in_features] (both float32, contiguous).
  // Safe to call from several threads at once.
  // `threads` (0: all cores) is an upper bound: with the pool backend (sdq/threads.h), a call of
  // little work (at batch 1 and OSR 2, a layer of up to about two million weights) runs on the
  // calling thread alone (linear_plan.cpp).
  Status run(const float* x, int64_t batch, float* y, int threads = 0) const noexcept;

  // Whether this plan and `other` share one transform (equal constants, found at create).
  bool shares_transform_with(const LinearPlan& other) const noexcept;
  const BlockLayout& layout() const noexcept { return desc_.layout; }
  int64_t out() const noexcept { return desc_.out; }
  // The GEMM of a call at `batch` tokens (automatic binary plans switch to AMX for prefill).
  PlanGemm gemm(int64_t batch = 1) const noexcept;
  const char* gemm_name(int64_t batch = 1) const noexcept;    // "addonly", "lut_binary", ...
  const char* kernel_name(int64_t batch = 1) const noexcept;  // its CPU variant ("avx2", ...)

 private:
  LinearPlan(const LinearPlanDesc& desc, PlanGemm gemm, bool amx_prefill,
             std::shared_ptr<const TransformConstants> transform,
             std::vector<uint16_t> scale_tiles) noexcept;
  struct Transformed;  // linear_plan.cpp: xt, xsum and (table GEMMs) their int8 tables
  const uint16_t* scale_tiles() const noexcept;  // null: none kept (not an int8-table plan)
  Status transform(const float* x, int64_t batch, bool bf16, detail::PlanTables tables,
                   int threads, Transformed* out) const;
  Status gemm_run(PlanGemm g, const Transformed& t, int64_t batch, float* y,
                  int threads) const noexcept;  // g: gemm(batch), which run has chosen

  LinearPlanDesc desc_;
  PlanGemm gemm_;
  bool amx_prefill_;  // automatic int8-table plan on an AMX CPU: its AMX GEMM for prefill
  std::shared_ptr<const TransformConstants> transform_;
  std::vector<uint16_t> scale_tiles_;  // scale_tiles.h layout for the int8-table GEMMs
};

// Transform reuses on the calling thread since it started (tests and diagnostics).
uint64_t linear_plan_transform_hits() noexcept;

}  // namespace sdq
