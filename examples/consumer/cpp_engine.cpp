// The installed package from C++: the C++ API headers (<sdq/...>) and the C ABI (<sdq_c.h>, whose
// extern "C" block makes it usable from C++ too) agree on a layer's packed geometry.
// Exit code 0 when they agree.
#include <cstdio>

#include <sdq/layout.h>
#include <sdq_c.h>

int main() {
  const sdq::BlockLayout L{200, 64, 2.5};  // blocks of 64, 64, 64 and a short 8
  sdq_config cfg;
  sdq_config_init(&cfg);
  cfg.block_size = L.block_size;
  cfg.osr = L.osr;
  sdq_layer* layer = nullptr;
  if (sdq_layer_create(&cfg, 16, L.in_features, nullptr, &layer) != SDQ_OK) return 2;
  sdq_layer_info info;
  sdq_layer_get_info(layer, &info);
  bool ok = info.num_blocks == L.num_blocks() && info.words_per_row == L.words_per_row() &&
            info.code_cols == L.total_code_cols() && info.samples_last == L.m(L.num_blocks() - 1);
  for (int64_t b = 0; b < L.num_blocks(); ++b) {
    int64_t offset = 0, samples = 0;
    sdq_layer_block(layer, b, &offset, &samples);
    ok = ok && offset == L.code_offset(b) && samples == L.m(b);
  }
  sdq_layer_destroy(layer);
  std::printf("%s C ABI and C++ layout agree (%lld words per row)\n", ok ? "PASS" : "FAIL",
              static_cast<long long>(L.words_per_row()));
  return ok ? 0 : 1;
}
