// Internal: the trit5 GEMM's tables built by its caller (trit5_gemm.cpp). A plan builds them
// inside its transform, block by block as each block's codes land in xt, and keeps them with the
// transform (linear_plan.cpp); kept apart from trit5_gemm.h so that a caller needs nothing else
// of the kernel's.
#pragma once
#include <cstdint>

#include "sdq/layout.h"
#include "sdq/status.h"

namespace sdq::detail {

// Builds block b of one token's tables [groups, stride] and steps [nb] from its xt row.
using Trit5TableFn = void (*)(const BlockLayout& L, const float* xt, int64_t stride, int64_t b,
                              int8_t* tables, float* step);

// Tokens whose tables are built together.
constexpr int64_t kTrit5TokenChunk = 16;

// The tables as trit5_gemm_tiled's kernel for this CPU reads them. token_bytes: bytes of one
// token's tables (their nb steps per token are kept apart).
struct Trit5TableForm {
  Trit5TableFn build;
  int64_t stride, token_bytes;
};
Trit5TableForm trit5_table_form(const BlockLayout& L) noexcept;

// trit5_gemm_tiled with the tables already built in trit5_table_form(L) (tables [batch,
// token_bytes], step [batch, nb]); scale_tiles required on x86; batch <= kTrit5TokenChunk.
Status trit5_gemm_prebuilt(const BlockLayout& L, const uint8_t* trits, const uint32_t* trit_signs,
                           const uint16_t* scale, const uint16_t* mean,
                           const uint16_t* scale_tiles, int64_t out, const int8_t* tables,
                           const float* step, const float* xsum, int64_t batch, float* y,
                           int threads) noexcept;

}  // namespace sdq::detail
