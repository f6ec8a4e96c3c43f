// CUDA entry points. They take device pointers and a stream (as cudaStream_t passed through a
// void*, so this header needs no CUDA include) and return a Status; they never allocate, never
// synchronise the stream and never touch the host. In a build without nvcc every function returns
// Status::not_built (built() returns false and last_error() says so).
//
// What the entry points check themselves (cheap, host-only): sizes, null pointers, alignment of
// each pointer to its element type (Status::bad_pointer), launch-grid limits. They do not ask the
// driver where a pointer points, which costs a runtime call per pointer: a caller that cannot
// vouch for its pointers (the Python binding) checks each with pointer_info() first.
//
// The launch plans below are plain host arithmetic (no CUDA), so a CPU-only build can test them.
#pragma once
#include <cstdint>

#include "sdq/bitplane.h"
#include "sdq/layout.h"
#include "sdq/levels.h"
#include "sdq/status.h"

namespace sdq::cuda {

// True iff this build contains the CUDA kernels. Never initialises CUDA.
bool built() noexcept;

// Text of the last CUDA runtime error seen by an entry point on this thread ("" if none).
const char* last_error() noexcept;

// Where a pointer points, from cudaPointerGetAttributes.
enum class MemoryKind : int {
  unregistered = 0,  // not known to CUDA: pageable host memory, or not a valid address at all
  host = 1,          // page-locked (pinned) host memory
  device = 2,        // device memory of `device`
  managed = 3,       // managed (unified) memory: usable from any device
};

struct PointerInfo {
  MemoryKind kind;
  int device;          // the device owning device/managed memory; -1 otherwise
  int current_device;  // cudaGetDevice() of the calling thread
  // True when a kernel launched on the current device may dereference the pointer.
  bool usable() const noexcept {
    return kind == MemoryKind::managed || (kind == MemoryKind::device && device == current_device);
  }
};

// Fills *info for p (non-null). Unlike the entry points' no-work paths, this initialises CUDA.
// cuda_error (with last_error()) when there is no usable device or driver.
Status pointer_info(const void* p, PointerInfo* info) noexcept;

// Same contract as sdq::fwht (fwht.h), on device memory. Lengths up to the largest power of two
// whose row fits the device's shared memory (32768 on A100/H100) take one pass; longer ones (up
// to 2^24) take two (rows, then columns of the row viewed as a matrix).
Status fwht(float* x, int64_t rows, int64_t n, const float* signs, bool inverse,
            void* stream) noexcept;

// Same contracts as sdq::activation_transform and sdq::addonly_gemm (gemv.h), on device memory.
// activation_transform needs padded(0) <= 32768 (bad_size otherwise).
// addonly_gemm: when the table kernel's plan has splits > 1 it zeroes y with cudaMemsetAsync and
// accumulates with atomicAdd, so the float summation order (not the math) can differ between
// runs; the warp_rows kernel writes each output once, in a fixed order.
Status activation_transform(const BlockLayout& L, bool hadamard, const float* signs,
                            const float* down_full, const float* down_last, const float* x,
                            int64_t batch, float* xt, float* xsum, void* stream) noexcept;
// kernel: which kernel family runs it. automatic is the table kernel at every batch (on an H200
// it beat warp_rows at batch 1, 4 and 16, and the first tensor kernel everywhere:
// bench/results/kernels_gpu.json, tensor_rows.cu). table and warp_rows are exact float kernels
// (warp_rows is kept, tested, as a coalesced float GEMV: see warp_rows.cu); tensor
// (tensor_rows.cu; sm_80+, bad_value on older devices; bad_size past its 32-bit offsets) rounds
// xt to bf16 (round to nearest even) and multiplies the +-1 codes on the tensor cores with fp32
// accumulation: every product is exact, so its result is the float kernels' on bf16-rounded
// activations, up to fp32 summation order.
enum class GemmKernel : int { automatic = 0, table = 1, warp_rows = 2, tensor = 3 };
Status addonly_gemm(const BlockLayout& L, Levels levels, const word_t* sign,
                    const word_t* nonzero, const uint16_t* scale, const uint16_t* mean,
                    int64_t out, const float* xt, const float* xsum, int64_t batch, float* y,
                    void* stream, GemmKernel kernel = GemmKernel::automatic) noexcept;

// ---- launch geometry (host only) ----

// Add-only GEMM/GEMV. A CTA of kGemmThreads threads owns kGemmThreads consecutive output rows
// (one row per thread) and `tokens` tokens; it walks its split's words in chunks of
// `chunk_words` words per row, building for each chunk a table of the 16 signed (binary) or
// subset (ternary) sums of every 4 consecutive activations, so that 4 codes cost one table
// lookup and one add. Grid: (row_tiles, splits, token_tiles).
constexpr int kGemmThreads = 256;

struct GemmPlan {
  int tokens;             // tokens per CTA: 1, 2, 4, 8 (GEMV path) or 16 (GEMM path)
  int chunk_words;        // words per row per table chunk
  int64_t words;          // words per row (L.words_per_row())
  int64_t chunks;         // ceil(words / chunk_words)
  int64_t row_tiles;      // ceil(out / kGemmThreads)
  int64_t token_tiles;    // ceil(batch / tokens)
  int64_t splits;         // CTAs sharing one row tile's words (> 1: atomicAdd into zeroed y)
  int64_t chunks_per_split;
  int64_t smem_bytes;     // dynamic shared memory per CTA (the tables)
  bool gemm_path() const noexcept { return tokens > 8; }
};

// Choose the plan for `num_sms` multiprocessors (>= 1). Requires L.valid(), out >= 1, batch >= 1.
inline GemmPlan plan_addonly_gemm(const BlockLayout& L, int64_t out, int64_t batch,
                                  int num_sms) noexcept {
  GemmPlan p{};
  p.tokens = batch <= 1 ? 1 : batch <= 2 ? 2 : batch <= 4 ? 4 : batch <= 8 ? 8 : 16;
  p.chunk_words = p.tokens >= 16 ? 4 : 8;
  p.words = L.words_per_row();
  p.chunks = (p.words + p.chunk_words - 1) / p.chunk_words;
  p.row_tiles = (out + kGemmThreads - 1) / kGemmThreads;
  p.token_tiles = (batch + p.tokens - 1) / p.tokens;
  // Aim for about 4 CTAs per multiprocessor; split the words of a row tile only when the row and
  // token tiles alone do not reach that.
  const int64_t target = 4 * static_cast<int64_t>(num_sms < 1 ? 1 : num_sms);
  const int64_t tiles = p.row_tiles * p.token_tiles;
  int64_t splits = tiles >= target ? 1 : (target + tiles - 1) / tiles;
  if (splits > p.chunks) splits = p.chunks;
  if (splits < 1) splits = 1;
  p.chunks_per_split = (p.chunks + splits - 1) / splits;
  p.splits = (p.chunks + p.chunks_per_split - 1) / p.chunks_per_split;
  // Table: per token, per group of 4 codes (8 per word), 16 floats.
  p.smem_bytes = static_cast<int64_t>(p.tokens) * p.chunk_words * 8 * 16 * 4;
  return p;
}

// Warp-rows GEMV (batch 1-4; larger batches run in token tiles). A warp owns rows_per_warp rows
// and every warps_per_cta-th segment of 32 words of them; lane l takes word l of a segment, so a
// row's segment is one coalesced 128-byte load, and keeps that word's 32 activations per token in
// registers, reused by all the warp's rows: a code costs one predicated add, no table and no
// barrier. The CTA's warps sum their partials in shared memory: no atomics, no zeroing of y.
// Grid: (row_tiles, token_tiles); CTA: warps_per_cta * 32 threads.
struct WarpRowsPlan {
  int tokens;              // tokens per CTA: 1, 2 or 4
  int rows_per_warp;       // 16 / tokens (the accumulators' registers stay at 16 per lane)
  int warps_per_cta;       // min(8, segments): each warp has at least one segment
  int64_t segments;        // ceil(words / 32)
  int64_t row_tiles;       // ceil(out / rows_per_warp)
  int64_t token_tiles;     // ceil(batch / tokens)
};

// Requires L.valid(), out >= 1, batch >= 1.
inline WarpRowsPlan plan_warp_rows(const BlockLayout& L, int64_t out, int64_t batch) noexcept {
  WarpRowsPlan p{};
  p.tokens = batch <= 1 ? 1 : batch <= 2 ? 2 : 4;
  p.rows_per_warp = 16 / p.tokens;
  p.segments = (L.words_per_row() + 31) / 32;
  p.warps_per_cta = p.segments < 8 ? static_cast<int>(p.segments) : 8;
  p.row_tiles = (out + p.rows_per_warp - 1) / p.rows_per_warp;
  p.token_tiles = (batch + p.tokens - 1) / p.tokens;
  return p;
}

// Tensor-core GEMV/GEMM (tensor_rows.cu). A warp owns kTensorTiles 16-row tiles and `tokens`
// tokens (one mma n tile of 8, or two); a CTA's kTensorWarps warps own consecutive tiles
// (rows_per_cta rows) and one split of the row blocks, walked 8 words of a block per step. Grid:
// (row_tiles, splits, token_tiles). Splits > 1: y zeroed, partial sums added atomically.
constexpr int kTensorWarps = 8;
constexpr int kTensorTiles = 2;

struct TensorRowsPlan {
  int tokens;                // tokens per CTA: 8 (batch <= 8) or 16
  int rows_per_cta;          // kTensorWarps * kTensorTiles * 16
  int64_t row_tiles;         // ceil(out / rows_per_cta)
  int64_t token_tiles;       // ceil(batch / tokens)
  int64_t splits;            // CTAs sharing a row tile's blocks
  int64_t blocks_per_split;  // the last split may have fewer
};

// Requires L.valid(), out >= 1, batch >= 1, num_sms >= 1. About 2 CTAs per multiprocessor (one
// wave: its registers allow 2 resident), splitting the blocks only when rows and tokens do not
// reach that.
inline TensorRowsPlan plan_tensor_rows(const BlockLayout& L, int64_t out, int64_t batch,
                                       int num_sms) noexcept {
  TensorRowsPlan p{};
  p.tokens = batch <= 8 ? 8 : 16;
  p.rows_per_cta = kTensorWarps * kTensorTiles * 16;
  p.row_tiles = (out + p.rows_per_cta - 1) / p.rows_per_cta;
  p.token_tiles = (batch + p.tokens - 1) / p.tokens;
  const int64_t nb = L.num_blocks();
  const int64_t target = 2 * static_cast<int64_t>(num_sms < 1 ? 1 : num_sms);
  const int64_t tiles = p.row_tiles * p.token_tiles;
  int64_t splits = tiles >= target ? 1 : (target + tiles - 1) / tiles;
  if (splits > nb) splits = nb;
  if (splits < 1) splits = 1;
  p.blocks_per_split = (nb + splits - 1) / splits;
  p.splits = (nb + p.blocks_per_split - 1) / p.blocks_per_split;
  return p;
}

// Activation transform: CTA of kActThreads threads = kActCols output columns x (kActThreads /
// kActCols) slices of the padded block; grid (num_blocks, ceil(code_cols(0) / kActCols),
// ceil(batch / tokens)). tokens is 4 when four padded rows fit in 48 KB of shared memory, else 1.
constexpr int kActThreads = 256;
constexpr int kActCols = 64;

// Shared-memory floats for n values with one pad word per 32 (bank-conflict-free butterflies).
constexpr int64_t padded_smem_floats(int64_t n) noexcept { return n + n / 32; }

struct ActPlan {
  int tokens;
  int64_t col_tiles, token_tiles;
  int64_t smem_bytes;
};

inline ActPlan plan_activation_transform(const BlockLayout& L, int64_t batch) noexcept {
  ActPlan p{};
  const int64_t pad = L.padded(0);
  p.tokens = padded_smem_floats(4 * pad) * 4 <= 48 * 1024 ? 4 : 1;
  p.col_tiles = (L.code_cols(0) + kActCols - 1) / kActCols;
  p.token_tiles = (batch + p.tokens - 1) / p.tokens;
  p.smem_bytes = padded_smem_floats(p.tokens * pad) * 4;
  return p;
}

// FWHT: rows of length n <= max_smem_n are done in one pass, rows_per_cta at a time; longer rows
// are viewed as [n1, n2] with n2 = max_smem_n: pass 1 transforms the n1 rows of length n2, pass 2
// the n2 columns of length n1, cols_per_cta at a time.
constexpr int kFwhtThreads = 256;

struct FwhtPlan {
  bool two_pass;
  int64_t n1, n2;          // two_pass: n = n1 * n2; one pass: n1 = 1, n2 = n
  int64_t rows_per_cta;    // pass 1 (or the only pass)
  int64_t cols_per_cta;    // pass 2
  int64_t smem_bytes_rows, smem_bytes_cols;
};

// Largest power of two n with padded_smem_floats(n) * 4 <= smem_optin bytes.
inline int64_t fwht_max_smem_n(int64_t smem_optin) noexcept {
  int64_t n = 1;
  while (padded_smem_floats(2 * n) * 4 <= smem_optin) n *= 2;
  return n;
}

inline FwhtPlan plan_fwht(int64_t rows, int64_t n, int64_t max_smem_n) noexcept {
  FwhtPlan p{};
  p.two_pass = n > max_smem_n;
  p.n2 = p.two_pass ? max_smem_n : n;
  p.n1 = n / p.n2;
  const int64_t sub_rows = rows * p.n1;
  const int64_t tile = 4096;  // elements per CTA for short rows
  p.rows_per_cta = p.n2 >= tile ? 1 : tile / p.n2;
  if (p.rows_per_cta > sub_rows) p.rows_per_cta = sub_rows < 1 ? 1 : sub_rows;
  p.smem_bytes_rows = padded_smem_floats(p.rows_per_cta * p.n2) * 4;
  p.cols_per_cta = 0;
  p.smem_bytes_cols = 0;
  if (p.two_pass) {
    int64_t c = max_smem_n / p.n1;
    if (c > p.n2) c = p.n2;
    p.cols_per_cta = c < 1 ? 1 : c;
    p.smem_bytes_cols = padded_smem_floats(p.n1 * p.cols_per_cta) * 4;
  }
  return p;
}

}  // namespace sdq::cuda
