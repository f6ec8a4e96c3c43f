// Add-only inference on packed codes (method.md "Inference, multiplication-free").
//
// For one linear layer with layout L (layout.h), Hadamard signs s (length L.block_size) and per
// row-block fp16 scale S and mean MU:
//   1. activation_transform:  x'_b = H diag(s) pad(x_b) / sqrt(padded_b)      (fwht.h, forward)
//                             xt_b = D_b^T x'_b   (D_b = resample_matrix(m_b, padded_b), [padded_b, m_b])
//                             xsum_b = sum(x'_b)
//      xt is laid out like a packed row: block b at column L.code_offset(b), zeros in the padding.
//   2. addonly_gemm:          y[t, r] = sum_b S[r,b] * <q_rb, xt_b> + MU[r,b] * xsum_b
//      <q, xt> only adds and subtracts activations; the two multiplies per row-block are the
//      scale and mean correction.
#pragma once
#include <cstdint>

#include "sdq/bitplane.h"
#include "sdq/layout.h"
#include "sdq/levels.h"
#include "sdq/status.h"

namespace sdq {

// x: [batch, in_features] float32, contiguous.
// signs: [block_size] +-1.0f (null: no sign flips). hadamard=false skips the FWHT and signs.
// down_full: D of a full block, [padded(0), m(0)] row-major; down_last: D of the last block
//   (may equal down_full when the last block is full).
// xt: [batch, L.total_code_cols()] output; xsum: [batch, L.num_blocks()] output.
Status activation_transform(const BlockLayout& L, bool hadamard, const float* signs,
                            const float* down_full, const float* down_last, const float* x,
                            int64_t batch, float* xt, float* xsum, int threads = 0) noexcept;

// sign, nonzero: bitplanes [out, L.words_per_row()] (nonzero null for binary).
// scale, mean: [out, L.num_blocks()] IEEE fp16 bit patterns.
// xt, xsum: from activation_transform. y: [batch, out] float32 output.
Status addonly_gemm(const BlockLayout& L, Levels levels, const word_t* sign,
                    const word_t* nonzero, const uint16_t* scale, const uint16_t* mean,
                    int64_t out, const float* xt, const float* xsum, int64_t batch, float* y,
                    int threads = 0) noexcept;

// Name of the kernel variant chosen at run time for this CPU (e.g. "avx2-lut", "portable").
const char* addonly_kernel_name() noexcept;

// The variants of addonly_gemm. `automatic` is the best one this CPU supports; naming another one
// (for tests and benchmarks) returns Status::not_built when this CPU cannot run it.
enum class AddonlyKernel : int {
  automatic = 0,
  portable = 1,     // one row at a time, 16-entry tables of subset sums per 4 codes
  avx2 = 2,         // tables, 8 rows per vector (two vpermps + blend per look-up)
  avx512 = 3,       // tables, 16 rows per vector (one vpermps per look-up)
  avx512_mask = 4,  // no tables: code bits as write masks of vaddps, 32 codes per 2 adds
};

Status addonly_gemm_variant(AddonlyKernel kernel, const BlockLayout& L, Levels levels,
                            const word_t* sign, const word_t* nonzero, const uint16_t* scale,
                            const uint16_t* mean, int64_t out, const float* xt,
                            const float* xsum, int64_t batch, float* y, int threads = 0) noexcept;

// Name of a variant ("portable", "avx2-lut", "avx512-lut", "avx512-mask"); "unknown" otherwise.
const char* addonly_kernel_name(AddonlyKernel kernel) noexcept;

// Whether this CPU can run a variant (automatic and portable: always).
bool addonly_kernel_supported(AddonlyKernel kernel) noexcept;

}  // namespace sdq
