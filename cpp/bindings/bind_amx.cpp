// Binding of the AMX GEMMs (sdq/amx_gemm.h): checks every argument, naming it in the
// error, then releases the GIL around the core.
#include <string>

#include "common.h"
#include "sdq/amx_gemm.h"

namespace sdq::bind {
namespace {

py::array_t<float> amx_gemm_binary_py(const py::object& packed_obj, const py::object& scale_obj,
                                      const py::object& mean_obj, const py::object& xt_obj,
                                      const py::object& xsum_obj, int64_t in_features,
                                      int64_t block_size, double osr, int64_t out, int threads) {
  const BlockLayout L = make_layout(in_features, block_size, osr);
  if (!amx_gemm_supported()) throw py::value_error("amx_gemm_binary: this CPU or OS has no AMX");
  require_rows(out);
  auto packed = require_lut_codes(packed_obj, L, out);
  auto [scale, mean, xt, xsum, batch] = require_gemm_inputs(scale_obj, mean_obj, xt_obj, xsum_obj, L, out);
  py::array_t<float> y({batch, out});
  Status s;
  {
    py::gil_scoped_release release;
    s = amx_gemm_binary(L, packed.data(), scale.data(), mean.data(), out, xt.data(), xsum.data(),
                        batch, y.mutable_data(), threads);
  }
  check_status(s, "amx_gemm_binary");
  return y;
}

py::array_t<float> amx_gemm_ternary_py(const py::object& trits_obj, const py::object& signs_obj,
                                       const py::object& scale_obj, const py::object& mean_obj,
                                       const py::object& xt_obj, const py::object& xsum_obj,
                                       int64_t in_features, int64_t block_size, double osr,
                                       int64_t out, int threads) {
  const BlockLayout L = make_layout(in_features, block_size, osr);
  if (!amx_gemm_supported()) throw py::value_error("amx_gemm_ternary: this CPU or OS has no AMX");
  require_rows(out);
  auto [trits, signs] = require_trit5(trits_obj, signs_obj, L, out);
  auto [scale, mean, xt, xsum, batch] = require_gemm_inputs(scale_obj, mean_obj, xt_obj, xsum_obj, L, out);
  py::array_t<float> y({batch, out});
  Status s;
  {
    py::gil_scoped_release release;
    s = amx_gemm_ternary(L, trits.data(), signs.data(), scale.data(), mean.data(), out,
                         xt.data(), xsum.data(), batch, y.mutable_data(), threads);
  }
  check_status(s, "amx_gemm_ternary");
  return y;
}

}  // namespace

void bind_amx(py::module_& m) {
  m.def("amx_gemm_binary", &amx_gemm_binary_py, py::arg("packed"), py::arg("scale"),
        py::arg("mean"), py::arg("xt"), py::arg("xsum"), py::arg("in_features"),
        py::arg("block_size"), py::arg("osr"), py::arg("out"), py::arg("threads") = 0,
        "y = sum_b S[r,b] <q_rb, xt_b> + MU[r,b] xsum_b for binary codes on Intel AMX: the\n"
        "activations rounded to int8 per token and block (sdq/amx_gemm.h), int8 tile products.\n"
        "Same arguments as lut_gemm_binary (packed: from lut_pack_binary). Raises ValueError\n"
        "where amx_gemm_supported() is False. Returns y: float32 [batch, out].");
  m.def("amx_gemm_ternary", &amx_gemm_ternary_py, py::arg("trits"), py::arg("trit_signs"),
        py::arg("scale"), py::arg("mean"), py::arg("xt"), py::arg("xsum"),
        py::arg("in_features"), py::arg("block_size"), py::arg("osr"), py::arg("out"),
        py::arg("threads") = 0,
        "amx_gemm_binary for ternary codes in trit5 form (trits uint8 [tiles, groups / 2, 32],\n"
        "trit_signs uint32 [tiles, groups]: trit5_pack). Returns y: float32 [batch, out].");
  m.def("amx_gemm_supported", &amx_gemm_supported,
        "Whether this CPU and OS can run amx_gemm_binary (AMX-INT8, AVX-512 VBMI, tile state).");
}

}  // namespace sdq::bind
