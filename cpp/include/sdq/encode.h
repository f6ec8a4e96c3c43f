// Data-free Sigma-Delta encoder of a weight matrix (method.md section 1, steps 1-4 and packing):
// the whole of sdq.quantize_weight(W, SDQConfig(codes="sigma_delta")) for a range of rows.
//
// For every row r in [row_begin, row_end) and every block b of the layout (layout.h):
//   1. x = W[r, start(b) : start(b) + width(b)], zero-padded to padded(b)
//   2. rotate:   x <- H diag(signs[0 : padded(b)]) x / sqrt(padded(b))     (fwht.h, float32;
//                if hadamard)
//   3. up-sample: u = U x in double, U = resample_matrix(padded(b), m(b)) (float32, resample.h)
//   4. normalise exactly as python/sdq/methods/normalise.py (in double):
//        mu = fp16(mean(u));  dev = |u - mu|;  s = fp16(quantile(dev, p_scale) * sd_scale)
//        z  = float32((u - mu) / (s > 0 ? s : 1))
//      quantile(x, p) is numpy's default ("linear"): with v = sorted(x), pos = p * (m - 1),
//      lo = floor(pos), hi = min(lo + 1, m - 1): v[lo] + (v[hi] - v[lo]) * (pos - lo).
//      fp16 rounding is round-to-nearest-even (through float32, as torch's .half() of a double).
//   5. ternary threshold tau = float32(quantile(|z|, p_cut)), |z| taken in double before the cast.
//   6. modulate z with the given order (modulator.h; identical float32 recurrence).
//   7. pack the m codes into the sign (and, ternary, nonzero) planes at code columns
//      code_offset(b) .. code_offset(b) + m(b) of row r (bitplane.h); every other bit of the row's
//      words is 0. scale[r, b] = s and mean[r, b] = mu as IEEE fp16 bits.
// Each row-block is encoded independently and in a fixed order of operations, so the result does
// not depend on `threads` nor on how the rows are split over calls: calls on row ranges that tile
// [0, out) write exactly what one call on [0, out) writes.
//
// These are the operations of the float64 Python pipeline that came before, in the same
// precision; only the order of the double sums differs (u, the mean), by ~1e-16 relative, which
// moves a decision (a code, or an fp16 rounding of s or mu) only when a value lies that close to
// a threshold (tests/test_encode.py measures how often against sdq.ref).
#pragma once
#include <cstdint>

#include "sdq/bitplane.h"
#include "sdq/layout.h"
#include "sdq/levels.h"
#include "sdq/status.h"

namespace sdq {

struct EncodeParams {
  BlockLayout layout;       // in_features, block_size, osr (must be layout.valid())
  Levels levels = Levels::ternary;
  int order = 1;            // modulator order, 1 or 2
  bool hadamard = true;     // rotate each block before up-sampling
  double sd_scale = 0.95;   // scale = fp16(quantile(|u - mu|, p_scale) * sd_scale); > 0, finite
  double p_scale = 0.93;    // in [0, 1]
  double p_cut = 0.55;      // ternary threshold quantile of |z|, in [0, 1] (unused for binary)
};

// signs:   float32 [layout.block_size], +-1.0f: the layer's Hadamard signs (read only if hadamard;
//          may be null otherwise). The short last block uses its first padded(b) entries.
// W:       float32 [out, in_features], row-major, contiguous; row r starts at W + r * in_features.
// sign:    uint32 [out, layout.words_per_row()]; nonzero likewise (ternary; null for binary).
// scale, mean: fp16 bits [out, layout.num_blocks()].
// All pointers address row 0 of the whole matrix; only rows [row_begin, row_end) are read and
// written (so several calls on disjoint ranges may run at once on the same arrays).
// threads: worker threads; <= 0 means std::thread::hardware_concurrency().
// Returns ok; bad_size (invalid layout, row_begin < 0 or row_end < row_begin), bad_levels,
// bad_order, bad_value (a parameter out of its range, or a scale or mean that is not finite in
// fp16: |value| >= 65520 after rotation and resampling, or a NaN/inf in W; the outputs of the
// range are then unspecified), null_pointer, out_of_memory, internal_error.
Status encode_rows(const EncodeParams& p, const float* signs, const float* W, int64_t row_begin,
                   int64_t row_end, word_t* sign, word_t* nonzero, uint16_t* scale,
                   uint16_t* mean, int threads = 0) noexcept;

}  // namespace sdq
