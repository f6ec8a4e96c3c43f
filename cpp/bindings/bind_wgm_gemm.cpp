// Binding of the WGM add-only GEMM (wgm_gemm.h): checks every argument, naming it in the error,
// then releases the GIL around the kernel.
#include <string>

#include "common.h"
#include "sdq/wgm_gemm.h"

namespace sdq::bind {
namespace {

py::array_t<float> wgm_gemm_py(const py::object& x_obj, const py::object& sign_obj,
                               const py::object& index_obj, const py::object& scale_obj,
                               int64_t block, int threads) {
  auto x = require_array<float>(x_obj, "x", 2);
  const int64_t batch = x.shape(0), in = x.shape(1);
  if (in <= 0) throw py::value_error("x must have at least one column");
  if (block < 0) throw py::value_error("block must be >= 0, got " + std::to_string(block));
  auto sign = require_array<uint32_t>(sign_obj, "sign", 2);
  const int64_t out = sign.shape(0), words = words_for(in);
  require_shape(sign, "sign", {out, words});
  auto scale = require_array<uint16_t>(scale_obj, "scale", block > 0 ? 3 : 1);
  const int64_t groups = scale.shape(scale.ndim() - 1);
  if (groups < 1 || groups > kWgmMaxGroups)
    throw py::value_error("scale's last dimension (groups) must be in [1, " +
                          std::to_string(kWgmMaxGroups) + "], got " + std::to_string(groups));
  if (block > 0) require_shape(scale, "scale", {out, (in + block - 1) / block, groups});
  auto index = require_array<uint32_t>(index_obj, "index", 3);
  require_shape(index, "index", {wgm_index_bits(groups), out, words});
  py::array_t<float> y({batch, out});
  Status s;
  {
    py::gil_scoped_release release;
    s = wgm_gemm(sign.data(), index.size() ? index.data() : nullptr, scale.data(), groups, block,
                 out, in, x.data(), batch, y.mutable_data(), threads);
  }
  check_status(s, "wgm_gemm");
  return y;
}

}  // namespace

void bind_wgm_gemm(py::module_& m) {
  m.def("wgm_gemm", &wgm_gemm_py, py::arg("x"), py::arg("sign"), py::arg("index"),
        py::arg("scale"), py::arg("block") = 0, py::arg("threads") = 0,
        "y = x @ W_hat^T for a WGM (dynamic-grouping) weight, add-only per group.\n"
        "x: float32 [batch, in]; sign: uint32 [out, words]; index: uint32 [bits, out, words]\n"
        "(bits = ceil(log2 G)); scale: uint16 fp16 bit patterns, [G] (block 0: per matrix) or\n"
        "[out, ceil(in / block), G]. Returns y: float32 [batch, out].");
}

}  // namespace sdq::bind
