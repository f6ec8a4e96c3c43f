/* An inference engine's use of the sdq C ABI, in plain C99 (built against the installed package).
 *
 *   c_engine                      self-check (what ctest runs): quantize a deterministic weight
 *                                 matrix, split over this program's own threads, then run the
 *                                 add-only GEMV/GEMM and compare it with W_hat x, where W_hat is
 *                                 decoded here from the documented bit layout (sdq_c.h), not by
 *                                 the library. Exit code 0 when every check passes.
 *   c_engine --quantize IN OUT    quantize the matrix in file IN and write the packed planes to
 *                                 OUT (the format is below; tests/test_native_package.py uses it
 *                                 to compare with the Python sdq.quantize_weight).
 *
 * IN  (little-endian): int64 out, in, block_size; int32 levels (2|3), order, hadamard, 0;
 *     float64 osr, sd_scale, p_scale, p_cut; float32 signs[block_size]; float32 W[out * in].
 * OUT: uint32 sign[out * words]; uint32 nonzero[out * words] (ternary only);
 *      uint16 scale[out * nb]; uint16 mean[out * nb].
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sdq_c.h>

static int failures = 0;

static void expect(int ok, const char* what) {
  printf("%s %s\n", ok ? "ok  " : "FAIL", what);
  if (!ok) ++failures;
}

/* Stops on a status other than SDQ_OK, naming the call. */
static int check(sdq_status st, const char* call) {
  if (st == SDQ_OK) return 1;
  fprintf(stderr, "%s: %s %s\n", call, sdq_status_string(st), sdq_last_error_text());
  exit(2);
}

static void* xmalloc(size_t bytes) {
  void* p = calloc(bytes ? bytes : 1, 1);
  if (!p) {
    fprintf(stderr, "out of memory (%zu bytes)\n", bytes);
    exit(2);
  }
  return p;
}

/* ---- a layer's packed arrays, allocated from the size queries ---- */
typedef struct Packed {
  uint32_t *sign, *nonzero;
  uint16_t *scale, *mean;
} Packed;

static Packed packed_alloc(const sdq_layer_info* in) {
  Packed p;
  p.sign = (uint32_t*)xmalloc(in->sign_bytes);
  p.nonzero = in->nonzero_bytes ? (uint32_t*)xmalloc(in->nonzero_bytes) : NULL;
  p.scale = (uint16_t*)xmalloc(in->scale_bytes);
  p.mean = (uint16_t*)xmalloc(in->mean_bytes);
  return p;
}

static void packed_free(Packed* p) {
  free(p->sign), free(p->nonzero), free(p->scale), free(p->mean);
}

/* ---- quantize on our own threads: each takes a disjoint row range, one core thread each ---- */
typedef struct Job {
  const sdq_layer* layer;
  const float* W;
  int64_t begin, end;
  Packed* out;
  sdq_status status;
} Job;

static void* quantize_job(void* arg) {
  Job* j = (Job*)arg;
  j->status = sdq_quantize_rows(j->layer, j->W, j->begin, j->end, j->out->sign, j->out->nonzero,
                                j->out->scale, j->out->mean, 1);
  return NULL;
}

static void quantize_threaded(const sdq_layer* layer, const float* W, int64_t rows, int n,
                              Packed* out) {
  pthread_t tid[8];
  Job jobs[8];
  int i;
  for (i = 0; i < n; ++i) {
    jobs[i].layer = layer, jobs[i].W = W, jobs[i].out = out;
    jobs[i].begin = rows * i / n, jobs[i].end = rows * (i + 1) / n;
    if (pthread_create(&tid[i], NULL, quantize_job, &jobs[i]) != 0) quantize_job(&jobs[i]), tid[i] = 0;
  }
  for (i = 0; i < n; ++i) {
    if (tid[i]) pthread_join(tid[i], NULL);
    check(jobs[i].status, "sdq_quantize_rows (own thread)");
  }
}

/* ---- the reference decoder: the bit layout of sdq_c.h, read by hand ---- */
static int code_at(const sdq_layer_info* in, const Packed* p, int64_t r, int64_t c) {
  const int64_t w = r * in->words_per_row + c / 32;
  const int bit = (int)(c % 32);
  const int s = (int)((p->sign[w] >> bit) & 1u);
  if (in->levels == SDQ_BINARY) return s ? 1 : -1;
  if (!((p->nonzero[w] >> bit) & 1u)) return 0;
  return s ? 1 : -1;
}

static int parity(int64_t v) {
  int n = 0;
  while (v) n ^= 1, v &= v - 1;
  return n;
}

/* W_hat [out, in] in double: row block = crop((s D q + mu) Hb^T), Hb^T applied as
 * v -> diag(signs) H v / sqrt(p) with the Hadamard matrix written out (no library FWHT). */
static double* decode(const sdq_layer* layer, const sdq_layer_info* in, const Packed* p,
                      const float* signs) {
  double* W_hat = (double*)xmalloc(sizeof(double) * in->out_features * in->in_features);
  int64_t r, b, i, j;
  for (b = 0; b < in->num_blocks; ++b) {
    int64_t off, m;
    const int64_t start = b * in->block_size;
    const int64_t width = in->in_features - start < in->block_size ? in->in_features - start
                                                                  : in->block_size;
    int64_t padded = 1;
    float* D;
    double *v, *rot;
    while (padded < width) padded <<= 1;
    check(sdq_layer_block(layer, b, &off, &m), "sdq_layer_block");
    D = (float*)xmalloc(sizeof(float) * padded * m);
    check(sdq_resample_matrix(m, padded, D), "sdq_resample_matrix");
    v = (double*)xmalloc(sizeof(double) * padded);
    rot = (double*)xmalloc(sizeof(double) * padded);
    for (r = 0; r < in->out_features; ++r) {
      const double s = sdq_half_to_float(p->scale[r * in->num_blocks + b]);
      const double mu = sdq_half_to_float(p->mean[r * in->num_blocks + b]);
      for (i = 0; i < padded; ++i) {
        double acc = 0.0;
        for (j = 0; j < m; ++j) acc += (double)D[i * m + j] * code_at(in, p, r, off + j);
        v[i] = s * acc + mu;
      }
      for (i = 0; i < padded; ++i) {
        double acc = 0.0;
        for (j = 0; j < padded; ++j) acc += (parity(i & j) ? -v[j] : v[j]);
        rot[i] = signs[i] * acc / sqrt((double)padded);
      }
      for (i = 0; i < width; ++i) W_hat[r * in->in_features + start + i] = rot[i];
    }
    free(D), free(v), free(rot);
  }
  return W_hat;
}

/* Padding code columns are 0 in every plane, and a ternary zero code has sign bit 0. */
static int layout_invariants_hold(const sdq_layer* layer, const sdq_layer_info* in, const Packed* p) {
  int64_t r, b, c;
  for (r = 0; r < in->out_features; ++r) {
    for (b = 0; b < in->num_blocks; ++b) {
      int64_t off, m, end = in->code_cols, unused; /* block b's columns end where b + 1 starts */
      check(sdq_layer_block(layer, b, &off, &m), "sdq_layer_block");
      if (b + 1 < in->num_blocks) check(sdq_layer_block(layer, b + 1, &end, &unused), "sdq_layer_block");
      for (c = off + m; c < end; ++c) {
        const int64_t w = r * in->words_per_row + c / 32;
        if ((p->sign[w] >> (c % 32)) & 1u) return 0;
        if (p->nonzero && ((p->nonzero[w] >> (c % 32)) & 1u)) return 0;
      }
    }
    if (p->nonzero)
      for (c = 0; c < in->words_per_row; ++c)
        if (p->sign[r * in->words_per_row + c] & ~p->nonzero[r * in->words_per_row + c]) return 0;
  }
  return 1;
}

/* ---- deterministic data ---- */
static uint64_t rng_state = 0x2545f4914f6cdd1dull;
static double uniform01(void) {
  rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
  return (double)(rng_state >> 11) / 9007199254740992.0;
}
static float gaussian(void) { /* Box-Muller */
  const double u = uniform01() + 1e-12, v = uniform01();
  return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

/* One configuration end to end. */
static void self_check(sdq_levels levels, double osr, int order) {
  const int64_t out = 40, in = 200, batch = 3; /* blocks of 64: 64, 64, 64 and a short 8 */
  sdq_config cfg;
  sdq_layer* layer = NULL;
  sdq_layer_info info;
  Packed one, split;
  float *W, *signs, *x, *y, *y1, *xt, *xsum;
  double *W_hat, err2 = 0.0, norm2 = 0.0, max_err = 0.0, max_y = 0.0;
  void* work;
  size_t work_bytes;
  int64_t i, j, t;
  char what[160];

  check(sdq_config_init(&cfg), "sdq_config_init");
  cfg.levels = levels, cfg.osr = osr, cfg.order = order, cfg.block_size = 64;
  signs = (float*)xmalloc(sizeof(float) * cfg.block_size);
  for (i = 0; i < cfg.block_size; ++i) signs[i] = uniform01() < 0.5 ? -1.0f : 1.0f;
  check(sdq_layer_create(&cfg, out, in, signs, &layer), "sdq_layer_create");
  check(sdq_layer_get_info(layer, &info), "sdq_layer_get_info");
  printf("-- %s osr %.2f order %d: %lld blocks, %lld words/row, kernel %s\n",
         levels == SDQ_BINARY ? "binary" : "ternary", osr, order, (long long)info.num_blocks,
         (long long)info.words_per_row, sdq_kernel_name());

  W = (float*)xmalloc(sizeof(float) * out * in);
  for (i = 0; i < out * in; ++i) W[i] = 0.02f * gaussian() + 0.001f * (float)(i % 7);
  one = packed_alloc(&info), split = packed_alloc(&info);
  check(sdq_quantize_rows(layer, W, 0, out, one.sign, one.nonzero, one.scale, one.mean, 0),
        "sdq_quantize_rows");
  quantize_threaded(layer, W, out, 3, &split);
  expect(memcmp(one.sign, split.sign, info.sign_bytes) == 0 &&
             (!one.nonzero || memcmp(one.nonzero, split.nonzero, info.nonzero_bytes) == 0) &&
             memcmp(one.scale, split.scale, info.scale_bytes) == 0 &&
             memcmp(one.mean, split.mean, info.mean_bytes) == 0,
         "3 row ranges on own threads == one call");
  expect(layout_invariants_hold(layer, &info, &one), "padding bits 0, ternary zero codes sign 0");

  W_hat = decode(layer, &info, &one, signs);
  for (i = 0; i < out * in; ++i) {
    err2 += (W_hat[i] - W[i]) * (W_hat[i] - W[i]);
    norm2 += (double)W[i] * W[i];
  }
  /* The paper's modulator is coarse at low OSR (0.35 ternary OSR 2, ~0.85 binary OSR 1.5 on
   * Gaussian weights); this only asks that W_hat be closer to W than zero is. */
  sprintf(what, "relative weight error %.3f < 1 (W_hat is W, coarsely)", sqrt(err2 / norm2));
  expect(sqrt(err2 / norm2) < 1.0, what);

  x = (float*)xmalloc(sizeof(float) * batch * in);
  y = (float*)xmalloc(sizeof(float) * batch * out);
  y1 = (float*)xmalloc(sizeof(float) * out);
  for (i = 0; i < batch * in; ++i) x[i] = gaussian();
  check(sdq_linear_workspace_bytes(layer, batch, &work_bytes), "sdq_linear_workspace_bytes");
  work = xmalloc(work_bytes);
  check(sdq_linear(layer, one.sign, one.nonzero, one.scale, one.mean, x, batch, y, work,
                   work_bytes, 0), "sdq_linear");
  for (t = 0; t < batch; ++t)
    for (i = 0; i < out; ++i) {
      double ref = 0.0;
      for (j = 0; j < in; ++j) ref += W_hat[i * in + j] * x[t * in + j];
      if (fabs(ref - y[t * out + i]) > max_err) max_err = fabs(ref - y[t * out + i]);
      if (fabs(ref) > max_y) max_y = fabs(ref);
    }
  sprintf(what, "add-only GEMM (batch 3) == W_hat x decoded here: max err %.2e of max |y| %.2e",
          max_err, max_y);
  expect(max_err <= 1e-4 * max_y + 1e-6, what);

  /* GEMV in two steps on the last token (a batch slice is pointer arithmetic). */
  xt = (float*)xmalloc(sizeof(float) * info.code_cols);
  xsum = (float*)xmalloc(sizeof(float) * info.num_blocks);
  check(sdq_activation_transform(layer, x + 2 * in, 1, xt, xsum, 1), "sdq_activation_transform");
  check(sdq_gemm(layer, one.sign, one.nonzero, one.scale, one.mean, xt, xsum, 1, y1, 1), "sdq_gemm");
  max_err = 0.0;
  for (i = 0; i < out; ++i)
    if (fabs(y1[i] - y[2 * out + i]) > max_err) max_err = fabs(y1[i] - y[2 * out + i]);
  expect(max_err <= 1e-5 * max_y, "GEMV (transform + gemm, batch 1) == row 2 of the GEMM");

  expect(sdq_gemm(layer, one.sign, NULL, one.scale, one.mean, xt, xsum, 1, y1, 1) ==
             (levels == SDQ_TERNARY ? SDQ_NULL_POINTER : SDQ_OK),
         "no nonzero plane: refused for ternary, accepted for binary");
  free(W), free(W_hat), free(signs), free(x), free(y), free(y1), free(xt), free(xsum), free(work);
  packed_free(&one), packed_free(&split);
  sdq_layer_destroy(layer);
}

static void argument_errors(void) {
  sdq_config cfg;
  sdq_layer* layer = (sdq_layer*)&cfg; /* must be reset to null on failure */
  check(sdq_config_init(&cfg), "sdq_config_init");
  cfg.block_size = 100;
  expect(sdq_layer_create(&cfg, 4, 100, NULL, &layer) == SDQ_NOT_POWER_OF_TWO && layer == NULL,
         "block_size 100 -> SDQ_NOT_POWER_OF_TWO, no handle");
  cfg.block_size = 128, cfg.osr = 17.0;
  expect(sdq_layer_create(&cfg, 4, 100, NULL, &layer) == SDQ_BAD_VALUE, "osr 17 -> SDQ_BAD_VALUE");
  cfg.osr = 2.0, cfg.order = 3;
  expect(sdq_layer_create(&cfg, 4, 100, NULL, &layer) == SDQ_BAD_ORDER, "order 3 -> SDQ_BAD_ORDER");
  expect(strlen(sdq_status_string(SDQ_BAD_SIZE)) > 0, "status strings are never empty");
  expect(sdq_c_abi_version() == SDQ_C_ABI_VERSION, "header and library agree on the ABI version");
}

/* ---- --quantize IN OUT ---- */
static void read_exact(FILE* f, void* dst, size_t bytes, const char* what) {
  if (fread(dst, 1, bytes, f) != bytes) {
    fprintf(stderr, "input file too short while reading %s\n", what);
    exit(2);
  }
}

static int quantize_file(const char* in_path, const char* out_path) {
  int64_t dims[3];
  int32_t ints[4];
  double reals[4];
  sdq_config cfg;
  sdq_layer* layer = NULL;
  sdq_layer_info info;
  Packed p;
  float *signs, *W;
  FILE *f = fopen(in_path, "rb"), *g;
  if (!f) {
    perror(in_path);
    return 2;
  }
  read_exact(f, dims, sizeof dims, "the sizes");
  read_exact(f, ints, sizeof ints, "the integer fields");
  read_exact(f, reals, sizeof reals, "the real fields");
  if (dims[0] <= 0 || dims[1] <= 0 || dims[2] <= 0 || dims[2] > (1 << 20) ||
      dims[0] > (1 << 24) / dims[1]) {
    fprintf(stderr, "implausible sizes in %s\n", in_path);
    return 2;
  }
  cfg.levels = (sdq_levels)ints[0], cfg.order = ints[1], cfg.hadamard = ints[2];
  cfg.block_size = dims[2];
  cfg.osr = reals[0], cfg.sd_scale = reals[1], cfg.p_scale = reals[2], cfg.p_cut = reals[3];
  signs = (float*)xmalloc(sizeof(float) * dims[2]);
  W = (float*)xmalloc(sizeof(float) * dims[0] * dims[1]);
  read_exact(f, signs, sizeof(float) * dims[2], "the Hadamard signs");
  read_exact(f, W, sizeof(float) * dims[0] * dims[1], "W");
  fclose(f);
  check(sdq_layer_create(&cfg, dims[0], dims[1], signs, &layer), "sdq_layer_create");
  check(sdq_layer_get_info(layer, &info), "sdq_layer_get_info");
  p = packed_alloc(&info);
  quantize_threaded(layer, W, dims[0], 2, &p);
  g = fopen(out_path, "wb");
  if (!g || fwrite(p.sign, 1, info.sign_bytes, g) != info.sign_bytes ||
      (p.nonzero && fwrite(p.nonzero, 1, info.nonzero_bytes, g) != info.nonzero_bytes) ||
      fwrite(p.scale, 1, info.scale_bytes, g) != info.scale_bytes ||
      fwrite(p.mean, 1, info.mean_bytes, g) != info.mean_bytes || fclose(g) != 0) {
    perror(out_path);
    return 2;
  }
  packed_free(&p), free(signs), free(W);
  sdq_layer_destroy(layer);
  return 0;
}

int main(int argc, char** argv) {
  if (argc == 4 && strcmp(argv[1], "--quantize") == 0) return quantize_file(argv[2], argv[3]);
  if (argc != 1) {
    fprintf(stderr, "usage: %s                    (self-check)\n"
                    "       %s --quantize IN OUT  (see the comment at the top of c_engine.c)\n",
            argv[0], argv[0]);
    return 2;
  }
  argument_errors();
  self_check(SDQ_TERNARY, 2.0, 1);
  self_check(SDQ_BINARY, 1.5, 1);
  self_check(SDQ_TERNARY, 3.0, 2);
  /* The same on the OpenMP thread backend where this build has it (sdq_set_thread_backend). */
  if (sdq_set_thread_backend(SDQ_THREADS_OPENMP) == SDQ_OK) {
    expect(sdq_get_thread_backend() == SDQ_THREADS_OPENMP, "OpenMP thread backend selected");
    self_check(SDQ_TERNARY, 2.0, 1);
    self_check(SDQ_BINARY, 1.5, 1);
    check(sdq_set_thread_backend(SDQ_THREADS_POOL), "sdq_set_thread_backend");
  }
  expect(sdq_get_thread_backend() == SDQ_THREADS_POOL, "back on the pool");
  expect(sdq_set_thread_backend((sdq_thread_backend)7) == SDQ_BAD_VALUE, "bad backend refused");
  printf("%s\n", failures == 0 ? "PASS" : "FAIL");
  return failures == 0 ? 0 : 1;
}
