// Internal: the AMX tile configuration both AMX users share (amx_gemm.cpp, project_amx.cpp).
#pragma once
#include <cstdint>

namespace sdq::detail {

// ldtilecfg's 64-byte operand, palette 1: tiles 0-7 each 16 rows of 64 bytes (1 KB), the shape
// of every int8 and bf16 operand and of every int32 / float32 sum tile these kernels use.
struct alignas(64) AmxTileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  AmxTileConfig() {
    for (int i = 0; i < 8; ++i) {
      colsb[i] = 64;
      rows[i] = 16;
    }
  }
};

}  // namespace sdq::detail
