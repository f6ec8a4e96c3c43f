// The C ABI (cpp/include/sdq_c.h): thin wrappers over the C++ core. Each function checks what the
// C caller can get wrong that the C++ API takes on trust (enum values, alignment, handle
// consistency), then calls the one C++ implementation. Nothing here computes a result itself.
#include "sdq_c.h"

#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "gemm_addonly.h"  // detail::half_to_float
#include "guard.h"
#include "sdq/bitplane.h"
#include "sdq/encode.h"
#include "sdq/fwht.h"
#include "sdq/threads.h"
#include "sdq/gemv.h"
#include "sdq/layout.h"
#include "sdq/resample.h"
#include "sdq/status.h"

static_assert(SDQ_OK == static_cast<int>(sdq::Status::ok) &&
                  SDQ_NULL_POINTER == static_cast<int>(sdq::Status::null_pointer) &&
                  SDQ_BAD_SIZE == static_cast<int>(sdq::Status::bad_size) &&
                  SDQ_NOT_POWER_OF_TWO == static_cast<int>(sdq::Status::not_power_of_two) &&
                  SDQ_BAD_ORDER == static_cast<int>(sdq::Status::bad_order) &&
                  SDQ_BAD_LEVELS == static_cast<int>(sdq::Status::bad_levels) &&
                  SDQ_BAD_CODE == static_cast<int>(sdq::Status::bad_code) &&
                  SDQ_CUDA_ERROR == static_cast<int>(sdq::Status::cuda_error) &&
                  SDQ_NOT_BUILT == static_cast<int>(sdq::Status::not_built) &&
                  SDQ_OUT_OF_MEMORY == static_cast<int>(sdq::Status::out_of_memory) &&
                  SDQ_INTERNAL_ERROR == static_cast<int>(sdq::Status::internal_error) &&
                  SDQ_BAD_POINTER == static_cast<int>(sdq::Status::bad_pointer) &&
                  SDQ_BAD_VALUE == static_cast<int>(sdq::Status::bad_value),
              "sdq_status must mirror sdq::Status value for value");
static_assert(SDQ_BINARY == static_cast<int>(sdq::Levels::binary) &&
                  SDQ_TERNARY == static_cast<int>(sdq::Levels::ternary),
              "sdq_levels must mirror sdq::Levels");

// The handle: everything derived from the configuration once, read-only afterwards, so one
// layer may serve any number of threads.
struct sdq_layer {
  sdq::EncodeParams params;
  int64_t out_features = 0;
  std::vector<float> signs;      // [block_size]; all +1 when the caller gave none
  std::vector<float> down_full;  // D of a full block, [padded(0), m(0)]
  std::vector<float> down_last;  // D of the last block, [padded(nb-1), m(nb-1)]
};

namespace {

sdq_status to_c(sdq::Status s) { return static_cast<sdq_status>(static_cast<int>(s)); }

bool aligned(const void* p, size_t alignment) {
  return reinterpret_cast<uintptr_t>(p) % alignment == 0;
}

bool valid_levels(int levels) { return levels == SDQ_BINARY || levels == SDQ_TERNARY; }

bool in_unit_interval(double p) { return std::isfinite(p) && p >= 0.0 && p <= 1.0; }

sdq_status check_config(const sdq_config& c) {
  if (!valid_levels(c.levels)) return SDQ_BAD_LEVELS;
  if (c.order != 1 && c.order != 2) return SDQ_BAD_ORDER;
  if (!sdq::is_power_of_two(c.block_size)) return SDQ_NOT_POWER_OF_TWO;
  if (!(std::isfinite(c.osr) && c.osr > 0.0 && c.osr <= sdq::kMaxOsr)) return SDQ_BAD_VALUE;
  if (!(std::isfinite(c.sd_scale) && c.sd_scale > 0.0)) return SDQ_BAD_VALUE;
  if (!in_unit_interval(c.p_scale) || !in_unit_interval(c.p_cut)) return SDQ_BAD_VALUE;
  if (c.hadamard != 0 && c.hadamard != 1) return SDQ_BAD_VALUE;
  return SDQ_OK;
}

sdq_status build_down(const sdq::BlockLayout& L, int64_t b, std::vector<float>& out) {
  out.resize(static_cast<size_t>(L.padded(b) * L.m(b)));
  return to_c(sdq::resample_matrix(L.m(b), L.padded(b), out.data()));
}

// The packed arrays of one layer, checked against the handle before a kernel reads them.
sdq_status check_packed(const sdq_layer* layer, const uint32_t* sign, const uint32_t* nonzero,
                        const uint16_t* scale, const uint16_t* mean) {
  if (!layer || !sign || !scale || !mean) return SDQ_NULL_POINTER;
  const bool ternary = layer->params.levels == sdq::Levels::ternary;
  if (ternary && !nonzero) return SDQ_NULL_POINTER;
  if (!aligned(sign, 4) || (nonzero && !aligned(nonzero, 4)) || !aligned(scale, 2) ||
      !aligned(mean, 2))
    return SDQ_BAD_POINTER;
  return SDQ_OK;
}

}  // namespace

extern "C" {

int sdq_c_abi_version(void) { return SDQ_C_ABI_VERSION; }

const char* sdq_status_string(sdq_status status) {
  return sdq::status_string(static_cast<sdq::Status>(static_cast<int>(status)));
}

const char* sdq_last_error_text(void) { return sdq::last_exception_text(); }

const char* sdq_kernel_name(void) { return sdq::addonly_kernel_name(); }

sdq_status sdq_set_thread_backend(sdq_thread_backend backend) {
  // an unknown value: SDQ_BAD_VALUE from sdq::set_thread_backend
  return static_cast<sdq_status>(
      sdq::set_thread_backend(static_cast<sdq::ThreadBackend>(static_cast<int>(backend))));
}

sdq_thread_backend sdq_get_thread_backend(void) {
  return static_cast<sdq_thread_backend>(static_cast<int>(sdq::thread_backend()));
}

sdq_status sdq_config_init(sdq_config* config) {
  if (!config) return SDQ_NULL_POINTER;
  const sdq::EncodeParams d{};  // the defaults live in one place: encode.h
  config->levels = static_cast<sdq_levels>(static_cast<int>(d.levels));
  config->osr = 2.0;
  config->block_size = 128;
  config->order = d.order;
  config->hadamard = d.hadamard ? 1 : 0;
  config->sd_scale = d.sd_scale;
  config->p_scale = d.p_scale;
  config->p_cut = d.p_cut;
  return SDQ_OK;
}

sdq_status sdq_layer_create(const sdq_config* config, int64_t out_features, int64_t in_features,
                            const float* hadamard_signs, sdq_layer** layer) {
  if (!layer) return SDQ_NULL_POINTER;
  *layer = nullptr;
  if (!config) return SDQ_NULL_POINTER;
  const sdq_status bad = check_config(*config);
  if (bad != SDQ_OK) return bad;
  if (out_features <= 0 || in_features <= 0) return SDQ_BAD_SIZE;
  const sdq::BlockLayout L{in_features, config->block_size, config->osr};
  if (!L.valid()) return SDQ_BAD_SIZE;  // e.g. an osr so small that a short block gets no sample
  if (hadamard_signs && config->hadamard) {
    if (!aligned(hadamard_signs, alignof(float))) return SDQ_BAD_POINTER;
    for (int64_t i = 0; i < L.block_size; ++i)
      if (hadamard_signs[i] != 1.0f && hadamard_signs[i] != -1.0f) return SDQ_BAD_VALUE;
  }
  sdq_status st = SDQ_OK;
  const sdq::Status caught = sdq::detail::guarded([&] {
    auto h = std::make_unique<sdq_layer>();  // freed on any failure: nothing half-built escapes
    h->params.layout = L;
    h->params.levels = static_cast<sdq::Levels>(static_cast<int>(config->levels));
    h->params.order = config->order;
    h->params.hadamard = config->hadamard != 0;
    h->params.sd_scale = config->sd_scale;
    h->params.p_scale = config->p_scale;
    h->params.p_cut = config->p_cut;
    h->out_features = out_features;
    h->signs.assign(static_cast<size_t>(L.block_size), 1.0f);
    if (hadamard_signs && config->hadamard)
      h->signs.assign(hadamard_signs, hadamard_signs + L.block_size);
    st = build_down(L, 0, h->down_full);
    if (st == SDQ_OK) st = build_down(L, L.num_blocks() - 1, h->down_last);
    if (st == SDQ_OK) *layer = h.release();
    return sdq::Status::ok;
  });
  return caught != sdq::Status::ok ? to_c(caught) : st;
}

void sdq_layer_destroy(sdq_layer* layer) { delete layer; }

sdq_status sdq_layer_get_info(const sdq_layer* layer, sdq_layer_info* info) {
  if (!layer || !info) return SDQ_NULL_POINTER;
  const sdq::BlockLayout& L = layer->params.layout;
  const int64_t nb = L.num_blocks(), words = L.words_per_row(), out = layer->out_features;
  const bool ternary = layer->params.levels == sdq::Levels::ternary;
  info->out_features = out;
  info->in_features = L.in_features;
  info->block_size = L.block_size;
  info->osr = L.osr;
  info->levels = static_cast<sdq_levels>(static_cast<int>(layer->params.levels));
  info->num_blocks = nb;
  info->words_per_row = words;
  info->code_cols = L.total_code_cols();
  info->samples_full = L.m(0);
  info->samples_last = L.m(nb - 1);
  info->padded_last = L.padded(nb - 1);
  info->sign_bytes = static_cast<size_t>(out * words) * sizeof(uint32_t);
  info->nonzero_bytes = ternary ? info->sign_bytes : 0;
  info->scale_bytes = static_cast<size_t>(out * nb) * sizeof(uint16_t);
  info->mean_bytes = info->scale_bytes;
  return SDQ_OK;
}

sdq_status sdq_layer_block(const sdq_layer* layer, int64_t block, int64_t* code_offset,
                           int64_t* samples) {
  if (!layer || !code_offset || !samples) return SDQ_NULL_POINTER;
  const sdq::BlockLayout& L = layer->params.layout;
  if (block < 0 || block >= L.num_blocks()) return SDQ_BAD_SIZE;
  *code_offset = L.code_offset(block);
  *samples = L.m(block);
  return SDQ_OK;
}

sdq_status sdq_quantize_rows(const sdq_layer* layer, const float* W, int64_t row_begin,
                             int64_t row_end, uint32_t* sign, uint32_t* nonzero, uint16_t* scale,
                             uint16_t* mean, int threads) {
  const sdq_status bad = check_packed(layer, sign, nonzero, scale, mean);
  if (bad != SDQ_OK) return bad;
  if (!W) return SDQ_NULL_POINTER;
  if (!aligned(W, alignof(float))) return SDQ_BAD_POINTER;
  if (row_begin < 0 || row_end < row_begin || row_end > layer->out_features) return SDQ_BAD_SIZE;
  const bool ternary = layer->params.levels == sdq::Levels::ternary;
  return to_c(sdq::encode_rows(layer->params, layer->signs.data(), W, row_begin, row_end, sign,
                               ternary ? nonzero : nullptr, scale, mean, threads));
}

sdq_status sdq_pack_codes(const int8_t* codes, int64_t rows, int64_t cols, sdq_levels levels,
                          uint32_t* sign, uint32_t* nonzero, int threads) {
  if (!valid_levels(levels)) return SDQ_BAD_LEVELS;
  if ((sign && !aligned(sign, 4)) || (nonzero && !aligned(nonzero, 4))) return SDQ_BAD_POINTER;
  return to_c(sdq::pack_bitplanes(codes, rows, cols, static_cast<sdq::Levels>(levels), sign,
                                  levels == SDQ_TERNARY ? nonzero : nullptr, threads));
}

sdq_status sdq_unpack_codes(const uint32_t* sign, const uint32_t* nonzero, int64_t rows,
                            int64_t cols, sdq_levels levels, int8_t* codes, int threads) {
  if (!valid_levels(levels)) return SDQ_BAD_LEVELS;
  if ((sign && !aligned(sign, 4)) || (nonzero && !aligned(nonzero, 4))) return SDQ_BAD_POINTER;
  return to_c(sdq::unpack_bitplanes(sign, levels == SDQ_TERNARY ? nonzero : nullptr, rows, cols,
                                    static_cast<sdq::Levels>(levels), codes, threads));
}

sdq_status sdq_activation_transform(const sdq_layer* layer, const float* x, int64_t batch,
                                    float* xt, float* xsum, int threads) {
  if (!layer || !x || !xt || !xsum) return SDQ_NULL_POINTER;
  if (!aligned(x, alignof(float)) || !aligned(xt, alignof(float)) ||
      !aligned(xsum, alignof(float)))
    return SDQ_BAD_POINTER;
  return to_c(sdq::activation_transform(layer->params.layout, layer->params.hadamard,
                                        layer->signs.data(), layer->down_full.data(),
                                        layer->down_last.data(), x, batch, xt, xsum, threads));
}

sdq_status sdq_gemm(const sdq_layer* layer, const uint32_t* sign, const uint32_t* nonzero,
                    const uint16_t* scale, const uint16_t* mean, const float* xt,
                    const float* xsum, int64_t batch, float* y, int threads) {
  const sdq_status bad = check_packed(layer, sign, nonzero, scale, mean);
  if (bad != SDQ_OK) return bad;
  if (!xt || !xsum || !y) return SDQ_NULL_POINTER;
  if (!aligned(xt, alignof(float)) || !aligned(xsum, alignof(float)) ||
      !aligned(y, alignof(float)))
    return SDQ_BAD_POINTER;
  const bool ternary = layer->params.levels == sdq::Levels::ternary;
  return to_c(sdq::addonly_gemm(layer->params.layout, layer->params.levels, sign,
                                ternary ? nonzero : nullptr, scale, mean, layer->out_features, xt,
                                xsum, batch, y, threads));
}

sdq_status sdq_linear_workspace_bytes(const sdq_layer* layer, int64_t batch, size_t* bytes) {
  if (!layer || !bytes) return SDQ_NULL_POINTER;
  if (batch < 0) return SDQ_BAD_SIZE;
  const sdq::BlockLayout& L = layer->params.layout;
  *bytes = static_cast<size_t>(batch * (L.total_code_cols() + L.num_blocks())) * sizeof(float);
  return SDQ_OK;
}

sdq_status sdq_linear(const sdq_layer* layer, const uint32_t* sign, const uint32_t* nonzero,
                      const uint16_t* scale, const uint16_t* mean, const float* x, int64_t batch,
                      float* y, void* workspace, size_t workspace_bytes, int threads) {
  size_t need = 0;
  sdq_status st = sdq_linear_workspace_bytes(layer, batch, &need);
  if (st != SDQ_OK) return st;
  if (!workspace) return SDQ_NULL_POINTER;
  if (workspace_bytes < need) return SDQ_BAD_SIZE;
  if (!aligned(workspace, alignof(float))) return SDQ_BAD_POINTER;
  float* xt = static_cast<float*>(workspace);
  float* xsum = xt + batch * layer->params.layout.total_code_cols();
  st = sdq_activation_transform(layer, x, batch, xt, xsum, threads);
  if (st != SDQ_OK) return st;
  return sdq_gemm(layer, sign, nonzero, scale, mean, xt, xsum, batch, y, threads);
}

sdq_status sdq_resample_matrix(int64_t n_in, int64_t n_out, float* out) {
  if (out && !aligned(out, alignof(float))) return SDQ_BAD_POINTER;
  return to_c(sdq::resample_matrix(n_in, n_out, out));
}

sdq_status sdq_fwht(float* x, int64_t rows, int64_t n, const float* signs, int inverse,
                    int threads) {
  if ((x && !aligned(x, alignof(float))) || (signs && !aligned(signs, alignof(float))))
    return SDQ_BAD_POINTER;
  return to_c(sdq::fwht(x, rows, n, signs, inverse != 0, threads));
}

float sdq_half_to_float(uint16_t h) { return sdq::detail::half_to_float(h); }

}  // extern "C"
