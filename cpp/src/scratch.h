// Internal: per-thread scratch memory that outlives a call, so the kernels of a small layer do
// not allocate (and zero) their look-up tables and buffers on every call.
//
// Each thread has one buffer per slot; a slot is used by one kind of caller at a time (the GEMM's
// tables are held by the calling thread while its row chunks, possibly on the same thread, use
// another slot). A buffer only grows; its contents are whatever the last user left, so callers
// write every element they read. Growing may throw (bad_alloc, length_error) like a vector.
#pragma once
#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>

namespace sdq::detail {

enum class ScratchSlot : int {
  gemm_tables, gemm_sums, gemm_rows, transform,
  lut_tables,  // lut_gemm.cpp: int8 tables and their scales of a token chunk (calling thread)
  lut_rows,    // lut_gemm_<isa>.cpp: a row tile's partial sums (workers; NEON: its scales too)
  trit5_tables,  // trit5_gemm.cpp: int8 tables and steps of a token chunk (calling thread)
  trit5_rows,    // trit5_gemm_neon.cpp: a row tile's scales as float (workers)
  amx_acts,      // amx_gemm.cpp: the int8 activations and their scales (calling thread)
  amx_rows,      // amx_gemm.cpp: a row tile's scales, B tiles, C tiles and sums (workers)
  scale_tiles,   // lut_gemm.cpp, trit5_gemm.cpp: a one-off call's scale_tiles.h layout (caller)
  // linear_plan.cpp only: the calling thread's last transform (x copy, xt, xsum; the int8 tables
  // and their scales when built with it). Unlike the other slots their contents are read back by
  // a later call on purpose (the shared-transform cache), so nothing else may write them.
  plan_input, plan_xt, plan_xsum, plan_tables,
  count
};

// At least `bytes` bytes, 64-byte aligned, owned by this thread and slot.
void* scratch_bytes(ScratchSlot slot, size_t bytes);

template <typename T>
T* scratch(ScratchSlot slot, int64_t count) {
  if (count < 0 || static_cast<uint64_t>(count) > std::numeric_limits<size_t>::max() / sizeof(T))
    throw std::length_error("scratch: size overflows");
  return static_cast<T*>(scratch_bytes(slot, static_cast<size_t>(count) * sizeof(T)));
}

}  // namespace sdq::detail
