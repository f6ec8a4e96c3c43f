// Binding of the binary int8 look-up kernels (sdq/lut_gemm.h): checks every argument, naming it
// in the error, then releases the GIL around the core.
#include <string>

#include "common.h"
#include "sdq/lut_gemm.h"

namespace sdq::bind {
namespace {

LutKernel parse_lut_kernel(const std::string& name) {
  if (name == "auto") return LutKernel::automatic;
  if (name == "portable") return LutKernel::portable;
  if (name == "avx2") return LutKernel::avx2;
  if (name == "avx512") return LutKernel::avx512;
  if (name == "avx512-vnni") return LutKernel::avx512_vnni;
  if (name == "neon") return LutKernel::neon;
  throw py::value_error("kernel must be 'auto', 'portable', 'avx2', 'avx512', 'avx512-vnni' or 'neon', got '" +
                        name + "'");
}

py::array_t<uint8_t> lut_pack_binary_py(const py::object& sign_obj, int64_t in_features,
                                        int64_t block_size, double osr, int threads) {
  const BlockLayout L = make_layout(in_features, block_size, osr);
  auto sign = require_array<uint32_t>(sign_obj, "sign", 2);
  const int64_t out = sign.shape(0);
  require_shape(sign, "sign", {out, L.words_per_row()});
  py::array_t<uint8_t> packed(lut_packed_bytes(L, out));
  Status s;
  {
    py::gil_scoped_release release;
    s = lut_pack_binary(L, sign.data(), out, packed.mutable_data(), threads);
  }
  check_status(s, "lut_pack_binary");
  return packed;
}

py::array_t<float> lut_gemm_binary_py(const py::object& packed_obj, const py::object& scale_obj,
                                      const py::object& mean_obj, const py::object& xt_obj,
                                      const py::object& xsum_obj, int64_t in_features,
                                      int64_t block_size, double osr, int64_t out, int threads,
                                      const std::string& kernel_name) {
  const BlockLayout L = make_layout(in_features, block_size, osr);
  const LutKernel kernel = parse_lut_kernel(kernel_name);
  if (!lut_kernel_supported(kernel))
    throw py::value_error("kernel '" + kernel_name + "' is not supported by this CPU");
  require_rows(out);
  auto packed = require_lut_codes(packed_obj, L, out);
  auto [scale, mean, xt, xsum, batch] = require_gemm_inputs(scale_obj, mean_obj, xt_obj, xsum_obj, L, out);
  py::array_t<float> y({batch, out});
  Status s;
  {
    py::gil_scoped_release release;
    s = lut_gemm_binary(L, packed.data(), scale.data(), mean.data(), out, xt.data(), xsum.data(),
                        batch, y.mutable_data(), threads, kernel);
  }
  check_status(s, "lut_gemm_binary");
  return y;
}

}  // namespace

// common.h
py::array_t<uint8_t> require_lut_codes(const py::object& packed_obj, const BlockLayout& L,
                                       int64_t out) {
  auto packed = require_array<uint8_t>(packed_obj, "packed", 1);
  require_shape(packed, "packed", {lut_packed_bytes(L, out)});
  return packed;
}

void bind_lut(py::module_& m) {
  m.def("lut_pack_binary", &lut_pack_binary_py, py::arg("sign"), py::arg("in_features"),
        py::arg("block_size"), py::arg("osr"), py::arg("threads") = 0,
        "Re-lays binary sign bitplanes uint32 [out, words] for lut_gemm_binary (once per layer).\n"
        "Returns uint8 [lut_packed_bytes]: tiles of 32 rows, byte p * 32 + i of a tile = byte p\n"
        "of row i's bitplane (sdq/lut_gemm.h).");
  m.def("lut_gemm_binary", &lut_gemm_binary_py, py::arg("packed"), py::arg("scale"),
        py::arg("mean"), py::arg("xt"), py::arg("xsum"), py::arg("in_features"),
        py::arg("block_size"), py::arg("osr"), py::arg("out"), py::arg("threads") = 0,
        py::arg("kernel") = "auto",
        "y = sum_b S[r,b] <q_rb, xt_b> + MU[r,b] xsum_b for binary codes, with int8 look-up\n"
        "tables (one float scale per token and block; rounded, see sdq/lut_gemm.h).\n"
        "packed: from lut_pack_binary; scale / mean: uint16 fp16 bit patterns [out, num_blocks];\n"
        "xt, xsum: from activation_transform. kernel: 'auto', 'portable', 'avx2', 'avx512',\n'avx512-vnni'.\n"
        "Returns y: float32 [batch, out].");
  m.def("lut_kernel_name",
        [](const std::string& kernel) { return std::string(lut_kernel_name(parse_lut_kernel(kernel))); },
        py::arg("kernel") = "auto", "Name of a look-up kernel variant ('auto': the one this CPU gets).");
  m.def("lut_kernel_supported",
        [](const std::string& kernel) { return lut_kernel_supported(parse_lut_kernel(kernel)); },
        py::arg("name"), "Whether this CPU can run a look-up kernel variant.");
}

}  // namespace sdq::bind
