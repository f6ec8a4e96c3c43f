// Binding of the trit5 ternary storage and its int8 look-up kernel (sdq/trit5.h): checks every
// argument, naming it in the error, then releases the GIL around the core.
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "common.h"
#include "sdq/trit5.h"

namespace sdq::bind {
namespace {

Trit5Kernel parse_trit5_kernel(const std::string& name) {
  if (name == "auto") return Trit5Kernel::automatic;
  if (name == "portable") return Trit5Kernel::portable;
  if (name == "avx2") return Trit5Kernel::avx2;
  if (name == "avx512") return Trit5Kernel::avx512;
  if (name == "neon") return Trit5Kernel::neon;
  throw py::value_error("kernel must be 'auto', 'portable', 'avx2', 'avx512' or 'neon', got '" + name + "'");
}

py::tuple trit5_pack_py(const py::object& sign_obj, const py::object& nonzero_obj,
                        int64_t in_features, int64_t block_size, double osr, int threads) {
  const BlockLayout L = make_layout(in_features, block_size, osr);
  auto sign = require_array<uint32_t>(sign_obj, "sign", 2);
  const int64_t out = sign.shape(0);
  require_shape(sign, "sign", {out, L.words_per_row()});
  auto nonzero = require_array<uint32_t>(nonzero_obj, "nonzero", 2);
  require_shape(nonzero, "nonzero", {out, L.words_per_row()});
  const int64_t tiles = trit5_tiles(out), groups = trit5_total_groups(L);
  py::array_t<uint8_t> trits({tiles, groups / 2, kTrit5TileRows});
  py::array_t<uint32_t> trit_signs({tiles, groups});
  Status s;
  {
    py::gil_scoped_release release;
    s = trit5_pack(L, sign.data(), nonzero.data(), out, trits.mutable_data(),
                   trit_signs.mutable_data(), threads);
  }
  check_status(s, "trit5_pack",
               s == Status::bad_code ? "a sign bit without its nonzero bit, or a padding column "
                                       "that is not zero"
                                     : "");
  return py::make_tuple(trits, trit_signs);
}

// trits / trit_signs of `out` rows, checked against the layout.
}  // namespace

// common.h
std::pair<py::array_t<uint8_t>, py::array_t<uint32_t>> require_trit5(const py::object& trits_obj,
                                                                     const py::object& signs_obj,
                                                                     const BlockLayout& L,
                                                                     int64_t out) {
  const int64_t tiles = trit5_tiles(out), groups = trit5_total_groups(L);
  auto trits = require_array<uint8_t>(trits_obj, "trits", 3);
  require_shape(trits, "trits", {tiles, groups / 2, kTrit5TileRows});
  auto signs = require_array<uint32_t>(signs_obj, "trit_signs", 2);
  require_shape(signs, "trit_signs", {tiles, groups});
  return {trits, signs};
}

namespace {

py::tuple trit5_unpack_py(const py::object& trits_obj, const py::object& signs_obj, int64_t out,
                          int64_t in_features, int64_t block_size, double osr, int threads) {
  const BlockLayout L = make_layout(in_features, block_size, osr);
  require_rows(out);
  auto [trits, signs] = require_trit5(trits_obj, signs_obj, L, out);
  py::array_t<uint32_t> sign({out, L.words_per_row()});
  py::array_t<uint32_t> nonzero({out, L.words_per_row()});
  Status s;
  {
    py::gil_scoped_release release;
    s = trit5_unpack(L, trits.data(), signs.data(), out, sign.mutable_data(),
                     nonzero.mutable_data(), threads);
  }
  check_status(s, "trit5_unpack",
               s == Status::bad_code ? "not a canonical trit5 encoding (a pattern above 13, a sign "
                                       "on an all-zero group, or a code in the padding)"
                                     : "");
  return py::make_tuple(sign, nonzero);
}

py::array_t<float> trit5_gemm_py(const py::object& trits_obj, const py::object& signs_obj,
                                 const py::object& scale_obj, const py::object& mean_obj,
                                 const py::object& xt_obj, const py::object& xsum_obj,
                                 int64_t in_features, int64_t block_size, double osr, int64_t out,
                                 int threads, const std::string& kernel_name) {
  const BlockLayout L = make_layout(in_features, block_size, osr);
  require_rows(out);
  const Trit5Kernel kernel = parse_trit5_kernel(kernel_name);
  if (!trit5_kernel_supported(kernel))
    throw py::value_error("kernel '" + kernel_name + "' is not supported by this CPU");
  auto [trits, signs] = require_trit5(trits_obj, signs_obj, L, out);
  auto [scale, mean, xt, xsum, batch] = require_gemm_inputs(scale_obj, mean_obj, xt_obj, xsum_obj, L, out);
  py::array_t<float> y({batch, out});
  Status s;
  {
    py::gil_scoped_release release;
    s = trit5_gemm(L, trits.data(), signs.data(), scale.data(), mean.data(), out, xt.data(),
                   xsum.data(), batch, y.mutable_data(), threads, kernel);
  }
  check_status(s, "trit5_gemm");
  return y;
}

py::dict trit5_shape_py(int64_t out, int64_t in_features, int64_t block_size, double osr) {
  const BlockLayout L = make_layout(in_features, block_size, osr);
  require_rows(out);
  std::vector<int64_t> groups, padded, offset;
  for (int64_t b = 0; b < L.num_blocks(); ++b) {
    groups.push_back(trit5_groups(L, b));
    padded.push_back(trit5_padded_groups(L, b));
    offset.push_back(trit5_group_offset(L, b));
  }
  const int64_t tiles = trit5_tiles(out), total = trit5_total_groups(L);
  py::dict d;
  d["tiles"] = tiles;
  d["total_groups"] = total;
  d["groups"] = groups;
  d["padded_groups"] = padded;
  d["group_offset"] = offset;
  d["trits_shape"] = py::make_tuple(tiles, total / 2, kTrit5TileRows);
  d["trit_signs_shape"] = py::make_tuple(tiles, total);
  d["bits_per_weight"] = out > 0 ? trit5_bits_per_weight(L, out) : 0.0;
  return d;
}

}  // namespace

void bind_trit5(py::module_& m) {
  m.def("trit5_pack", &trit5_pack_py, py::arg("sign"), py::arg("nonzero"), py::arg("in_features"),
        py::arg("block_size"), py::arg("osr"), py::arg("threads") = 0,
        "Ternary bitplanes (uint32 [out, words]) -> trit5 at 1.67 bits per trit.\n"
        "Returns (trits: uint8 [tiles, total_groups / 2, 32], trit_signs: uint32\n"
        "[tiles, total_groups]); layout in cpp/include/sdq/trit5.h.");
  m.def("trit5_unpack", &trit5_unpack_py, py::arg("trits"), py::arg("trit_signs"), py::arg("out"),
        py::arg("in_features"), py::arg("block_size"), py::arg("osr"), py::arg("threads") = 0,
        "trit5 -> (sign, nonzero) uint32 bitplanes [out, words]; the exact inverse of trit5_pack.\n"
        "ValueError unless the encoding is canonical.");
  m.def("trit5_gemm", &trit5_gemm_py, py::arg("trits"), py::arg("trit_signs"), py::arg("scale"),
        py::arg("mean"), py::arg("xt"), py::arg("xsum"), py::arg("in_features"),
        py::arg("block_size"), py::arg("osr"), py::arg("out"), py::arg("threads") = 0,
        py::arg("kernel") = "auto",
        "y = sum_b S[r,b] <q_rb, xt_b> + MU[r,b] xsum_b on trit5 codes, the activations rounded\n"
        "to int8 tables (one step per token and block). scale / mean: uint16 fp16 bit patterns\n"
        "[out, num_blocks]; xt, xsum: from activation_transform. kernel: 'auto', 'portable',\n"
        "'avx2', 'avx512'. Returns y: float32 [batch, out].");
  m.def("trit5_kernel_name",
        [](const std::string& kernel) { return std::string(trit5_kernel_name(parse_trit5_kernel(kernel))); },
        py::arg("kernel") = "auto", "Name of a trit5 kernel variant ('auto': the one chosen here).");
  m.def("trit5_kernel_supported",
        [](const std::string& kernel) { return trit5_kernel_supported(parse_trit5_kernel(kernel)); },
        py::arg("kernel"), "Whether this CPU can run a trit5 kernel variant.");
  m.def("trit5_shape", &trit5_shape_py, py::arg("out"), py::arg("in_features"),
        py::arg("block_size"), py::arg("osr"),
        "trit5 geometry: tiles, total_groups, per-block groups / padded_groups / group_offset,\n"
        "trits_shape, trit_signs_shape, bits_per_weight.");
}

}  // namespace sdq::bind
