/* sdq_c.h: the C ABI of the sdq core (C89-compatible declarations, usable from C and C++).
 *
 * Everything here is plain C: opaque handles, fixed-width integers, float/double, status codes.
 * No C++ type and no exception crosses it; every function returns an sdq_status (or a value
 * that cannot fail). The caller allocates every output buffer, sized by the query functions.
 * docs/c_api.md has the longer story (linking, threads, a worked example); the packed bit layout
 * that a kernel writer needs is given in full below, so this header is enough on its own.
 *
 * ---- One quantized linear layer ------------------------------------------------------------
 * W [out, in] (row-major float32) is quantized with a configuration (sdq_config) into:
 *   sign     uint32 [out, words]   sign bitplane
 *   nonzero  uint32 [out, words]   nonzero bitplane (ternary only; binary layers have none)
 *   scale    uint16 [out, nb]      per row-block scale s, IEEE binary16 bit pattern
 *   mean     uint16 [out, nb]      per row-block mean mu, IEEE binary16 bit pattern
 * plus the layer's Hadamard sign vector (block_size floats of +-1), which the caller keeps: it is
 * an input of both quantize and the activation transform (sdq_layer_create takes it).
 *
 * Blocks: `in` is cut into nb = ceil(in / B) blocks of B = block_size columns (the last may be
 * shorter). Block b has width w_b, is zero-padded to p_b = the next power of two >= w_b, and is
 * represented by m_b = floor(p_b * osr + 0.5) codes. In a packed row, block b's codes start at
 * code column b * c_0, where c_b = ceil(m_b / 32) * 32 ("code columns" of block b): every block
 * starts on a 32-bit word. words = (sum over b of c_b) / 32. sdq_layer_get_info reports all of it.
 *
 * Bits: code column c of row r lives in word r * words + c / 32, bit c % 32 (bit 0 = LSB).
 *   binary : sign bit 1 -> +1, 0 -> -1.
 *   ternary: nonzero bit 0 -> 0; nonzero 1 and sign 1 -> +1; nonzero 1 and sign 0 -> -1.
 *            The sign bit of a zero code is always 0 (so the +1 codes are exactly the sign bits).
 *   Padding columns (m_b <= j < c_b of each block) are 0 in every plane; a binary padding bit thus
 *   reads as -1 and must meet a zero activation (the transform below writes zeros there).
 *
 * What the layer computes (the reconstruction, exactly as the Python package's dequantize):
 *   W_hat[r, block b] = crop_{w_b}( (s_rb * D_b q_rb + mu_rb) Hb^T )
 *   q_rb   the m_b codes of row r, block b (as +-1 / 0)
 *   D_b    the band-limited down-sampler m_b -> p_b, a [p_b, m_b] matrix: sdq_resample_matrix(m_b, p_b)
 *   Hb     diag(signs[0:p_b]) H / sqrt(p_b), H the Sylvester Hadamard matrix
 *          H[i][j] = (-1)^popcount(i & j); so v Hb^T = (diag(signs) H v^T / sqrt(p_b))^T, which is
 *          sdq_fwht(..., inverse = 1) of the row v. With hadamard = 0, Hb is the identity.
 * so, for an activation x, y_r = sum_b s_rb <q_rb, xt_b> + mu_rb * xsum_b with
 *   x'_b  = H diag(signs) pad(x_b) / sqrt(p_b)   xt_b = D_b^T x'_b   xsum_b = sum(x'_b)
 * (sdq_activation_transform). <q, xt> needs only additions and subtractions.
 *
 * ---- Threads --------------------------------------------------------------------------------
 * `threads`: how many threads one call may use (<= 0: all hardware threads). The core keeps one
 * process-wide pool (or uses the caller's OpenMP team: sdq_set_thread_backend); concurrent calls
 * are safe (a call that finds the pool busy runs inline).
 * A layer handle is immutable after creation and may be shared by any number of threads. To split
 * work across your own threads, pass threads = 1 and give each thread a disjoint row range
 * (sdq_quantize_rows) or a disjoint slice of the batch (activation rows and output rows are
 * contiguous per token, so a batch slice is pointer arithmetic).
 */
#ifndef SDQ_C_H
#define SDQ_C_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a declaration below changes incompatibly. */
#define SDQ_C_ABI_VERSION 1
int sdq_c_abi_version(void);

/* Same values as sdq::Status (cpp/include/sdq/status.h). */
typedef enum sdq_status {
  SDQ_OK = 0,
  SDQ_NULL_POINTER = 1,      /* a required pointer argument is null */
  SDQ_BAD_SIZE = 2,          /* a size is zero, negative or inconsistent with another */
  SDQ_NOT_POWER_OF_TWO = 3,  /* block_size (or a transform length) is not a power of two */
  SDQ_BAD_ORDER = 4,         /* modulator order other than 1 or 2 */
  SDQ_BAD_LEVELS = 5,        /* levels other than binary or ternary */
  SDQ_BAD_CODE = 6,          /* a code outside the alphabet of the levels */
  SDQ_CUDA_ERROR = 7,        /* (not returned by this header's functions) */
  SDQ_NOT_BUILT = 8,         /* the routine is not in this build */
  SDQ_OUT_OF_MEMORY = 9,     /* a scratch buffer could not be allocated */
  SDQ_INTERNAL_ERROR = 10,   /* any other failure inside the core; see sdq_last_error_text */
  SDQ_BAD_POINTER = 11,      /* a pointer misaligned for its element type */
  SDQ_BAD_VALUE = 12         /* a configuration value out of range (osr, quantiles, ...) */
} sdq_status;

/* A short English description of a status; never null. */
const char* sdq_status_string(sdq_status status);
/* Detail of the last SDQ_OUT_OF_MEMORY / SDQ_INTERNAL_ERROR on the calling thread ("" if none). */
const char* sdq_last_error_text(void);
/* Name of the add-only kernel this CPU runs (e.g. "avx512-lut", "portable"). */
const char* sdq_kernel_name(void);

/* Where parallel work runs, process-wide (cpp/include/sdq/threads.h): SDQ_THREADS_POOL, the
 * default, sdq's own workers; SDQ_THREADS_OPENMP, the caller's OpenMP team, for an engine whose
 * own kernels are OpenMP (no second set of threads spinning on its cores; SDQ_NOT_BUILT in a
 * build without OpenMP). A forked child goes back to the pool. */
typedef enum sdq_thread_backend {
  SDQ_THREADS_POOL = 0,
  SDQ_THREADS_OPENMP = 1
} sdq_thread_backend;
sdq_status sdq_set_thread_backend(sdq_thread_backend backend);
sdq_thread_backend sdq_get_thread_backend(void);

typedef enum sdq_levels {
  SDQ_BINARY = 2,  /* codes {-1, +1}: one bitplane (sign) */
  SDQ_TERNARY = 3  /* codes {-1, 0, +1}: two bitplanes (nonzero, sign) */
} sdq_levels;

/* How a weight matrix is quantized: the fields of the Python sdq.SDQConfig that the data-free
 * Sigma-Delta path ("codes": "sigma_delta") uses. The Hadamard signs are not derived from a seed
 * here: the caller supplies them (the Python package draws them with NumPy's default_rng(seed)). */
typedef struct sdq_config {
  sdq_levels levels;   /* default SDQ_TERNARY */
  double osr;          /* over-sampling ratio, 0 < osr <= 16; default 2 */
  int64_t block_size;  /* B, a power of two; default 128 */
  int32_t order;       /* Sigma-Delta modulator order, 1 or 2; default 1 */
  int32_t hadamard;    /* 1: rotate each block by the random-sign Hadamard transform; default 1 */
  double sd_scale;     /* scale = quantile(|u - mean|, p_scale) * sd_scale; default 0.95 */
  double p_scale;      /* default 0.93 */
  double p_cut;        /* ternary threshold tau = quantile(|z|, p_cut); default 0.55 */
} sdq_config;

/* Fills *config with the defaults above (the Python SDQConfig's). */
sdq_status sdq_config_init(sdq_config* config);

/* ---- Layer handle: geometry + transform constants of one [out, in] layer ------------------ */
typedef struct sdq_layer sdq_layer;

/* hadamard_signs: block_size floats, each +1 or -1 (copied); null means all +1. Ignored when
 * config->hadamard is 0. On failure *layer is set to null. */
sdq_status sdq_layer_create(const sdq_config* config, int64_t out_features, int64_t in_features,
                            const float* hadamard_signs, sdq_layer** layer);
void sdq_layer_destroy(sdq_layer* layer); /* null is a no-op */

/* Sizes a caller needs to allocate buffers and to read the packed layout. */
typedef struct sdq_layer_info {
  int64_t out_features, in_features, block_size;
  double osr;
  sdq_levels levels;
  int64_t num_blocks;        /* nb */
  int64_t words_per_row;     /* words: uint32 per row in each bitplane */
  int64_t code_cols;         /* 32 * words: code columns of a packed row (xt floats per token) */
  int64_t samples_full;      /* m_0: codes of a full block */
  int64_t samples_last;      /* m_{nb-1}: codes of the last block (= samples_full if it is full) */
  int64_t padded_last;       /* p_{nb-1}: the last block's padded width */
  size_t sign_bytes;         /* out * words * 4 */
  size_t nonzero_bytes;      /* same as sign_bytes for ternary, 0 for binary */
  size_t scale_bytes;        /* out * nb * 2 */
  size_t mean_bytes;         /* out * nb * 2 */
} sdq_layer_info;

sdq_status sdq_layer_get_info(const sdq_layer* layer, sdq_layer_info* info);

/* First code column and number of codes of block b of a packed row. */
sdq_status sdq_layer_block(const sdq_layer* layer, int64_t block, int64_t* code_offset,
                           int64_t* samples);

/* ---- Quantize (data-free Sigma-Delta), a row range at a time ------------------------------ */
/* Encodes rows [row_begin, row_end) of W [out, in] (row-major float32; `W` points at row 0 of the
 * whole matrix) and writes exactly those rows of sign, nonzero (ternary only; null for binary),
 * scale and mean, which point at row 0 of the whole packed arrays (sizes: sdq_layer_get_info).
 * Per block: rotate (Hadamard), up-sample to m_b samples, normalise (fp16 mean and quantile
 * scale, as in the Python sdq.quantize_weight), modulate, pack. Disjoint row ranges may run
 * concurrently on the caller's own threads; the result does not depend on how rows are split.
 * This is the core's encoder (sdq::encode_rows, sdq/encode.h), the one the Python
 * sdq.quantize_weight(W, SDQConfig(codes="sigma_delta")) runs too: the same bytes for the same
 * configuration and signs.
 * SDQ_BAD_VALUE: a scale or mean does not fit fp16 (|value| >= 65520 after rotation and
 * resampling) or W holds NaN/inf; the range's outputs are then unspecified. */
sdq_status sdq_quantize_rows(const sdq_layer* layer, const float* W, int64_t row_begin,
                             int64_t row_end, uint32_t* sign, uint32_t* nonzero, uint16_t* scale,
                             uint16_t* mean, int threads);

/* ---- Pack / unpack codes you chose yourself ----------------------------------------------- */
/* codes [rows, cols] int8 (-1/+1, or -1/0/+1) -> sign/nonzero [rows, ceil(cols / 32)]. To build a
 * layer's planes, lay the codes out as packed rows (block b at its code offset, padding columns
 * -1 for binary, 0 for ternary) with cols = code_cols. */
sdq_status sdq_pack_codes(const int8_t* codes, int64_t rows, int64_t cols, sdq_levels levels,
                          uint32_t* sign, uint32_t* nonzero, int threads);
sdq_status sdq_unpack_codes(const uint32_t* sign, const uint32_t* nonzero, int64_t rows,
                            int64_t cols, sdq_levels levels, int8_t* codes, int threads);

/* ---- Add-only inference ------------------------------------------------------------------- */
/* x [batch, in] float32 -> xt [batch, code_cols], xsum [batch, num_blocks] (see the top). */
sdq_status sdq_activation_transform(const sdq_layer* layer, const float* x, int64_t batch,
                                    float* xt, float* xsum, int threads);

/* y [batch, out] = the layer applied to the transformed activations; only adds and subtracts
 * activations, plus one multiply by scale and one by mean per row-block. */
sdq_status sdq_gemm(const sdq_layer* layer, const uint32_t* sign, const uint32_t* nonzero,
                    const uint16_t* scale, const uint16_t* mean, const float* xt,
                    const float* xsum, int64_t batch, float* y, int threads);

/* Bytes of workspace sdq_linear needs for `batch` tokens (xt and xsum). */
sdq_status sdq_linear_workspace_bytes(const sdq_layer* layer, int64_t batch, size_t* bytes);

/* Both steps: y [batch, out] = W_hat x. workspace: at least sdq_linear_workspace_bytes bytes,
 * aligned for float. */
sdq_status sdq_linear(const sdq_layer* layer, const uint32_t* sign, const uint32_t* nonzero,
                      const uint16_t* scale, const uint16_t* mean, const float* x, int64_t batch,
                      float* y, void* workspace, size_t workspace_bytes, int threads);

/* ---- Building blocks, for kernel writers and reference checks ----------------------------- */
/* R [n_out, n_in] (row-major) with R x = scipy.signal.resample(x, n_out). D_b = R(m_b -> p_b). */
sdq_status sdq_resample_matrix(int64_t n_in, int64_t n_out, float* out);
/* In place on rows of x [rows, n]: forward x <- H diag(signs) x / sqrt(n), inverse
 * x <- diag(signs) H x / sqrt(n); signs [n] or null. n a power of two. */
sdq_status sdq_fwht(float* x, int64_t rows, int64_t n, const float* signs, int inverse,
                    int threads);
/* IEEE binary16 bit pattern -> float (subnormals, inf, NaN included). */
float sdq_half_to_float(uint16_t h);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* SDQ_C_H */
