// Binding of the CPU add-only kernels (gemv.h): checks every argument, naming it in the error,
// then releases the GIL around the kernel.
#include <pybind11/stl.h>

#include <string>
#include <tuple>
#include <vector>

#include "common.h"
#include "sdq/amx_gemm.h"
#include "sdq/gemv.h"

namespace sdq::bind {
namespace {

AddonlyKernel parse_kernel(const std::string& name) {
  if (name == "auto") return AddonlyKernel::automatic;
  if (name == "portable") return AddonlyKernel::portable;
  if (name == "avx2") return AddonlyKernel::avx2;
  if (name == "avx512") return AddonlyKernel::avx512;
  if (name == "avx512-mask") return AddonlyKernel::avx512_mask;
  throw py::value_error("kernel must be 'auto', 'portable', 'avx2', 'avx512' or 'avx512-mask', got '" +
                        name + "'");
}

py::tuple activation_transform_py(const py::object& x_obj, int64_t block_size, double osr,
                                  const py::object& signs_obj, const py::object& down_full_obj,
                                  const py::object& down_last_obj, int threads,
                                  const std::string& projection) {
  if (projection != "float32" && projection != "bf16")
    throw py::value_error("projection must be 'float32' or 'bf16', got '" + projection + "'");
  if (projection == "bf16" && !activation_transform_bf16_supported())
    throw py::value_error("activation_transform: projection 'bf16' needs AMX-BF16, which this "
                          "CPU or OS has not");
  auto x = require_array<float>(x_obj, "x", 2);
  const BlockLayout L = make_layout(x.shape(1), block_size, osr);
  const int64_t nb = L.num_blocks(), batch = x.shape(0);
  const bool hadamard = !signs_obj.is_none();
  py::array_t<float> signs;
  if (hadamard) {
    signs = require_array<float>(signs_obj, "signs", 1);
    require_shape(signs, "signs", {block_size});
  }
  auto down_full = require_array<float>(down_full_obj, "down_full", 2);
  require_shape(down_full, "down_full", {L.padded(0), L.m(0)});
  auto down_last = require_array<float>(down_last_obj, "down_last", 2);
  require_shape(down_last, "down_last", {L.padded(nb - 1), L.m(nb - 1)});
  py::array_t<float> xt({batch, L.total_code_cols()});
  py::array_t<float> xsum({batch, nb});
  Status s;
  {
    py::gil_scoped_release release;
    const auto fn = projection == "bf16" ? &activation_transform_bf16 : &activation_transform;
    s = fn(L, hadamard, hadamard ? signs.data() : nullptr, down_full.data(), down_last.data(),
           x.data(), batch, xt.mutable_data(), xsum.mutable_data(), threads);
  }
  check_status(s, "activation_transform");
  return py::make_tuple(xt, xsum);
}

py::array_t<float> addonly_gemm_py(const py::object& sign_obj, const py::object& nonzero_obj,
                                   const py::object& scale_obj, const py::object& mean_obj,
                                   const py::object& xt_obj, const py::object& xsum_obj,
                                   int64_t in_features, int64_t block_size, double osr,
                                   int threads, const std::string& kernel_name) {
  const BlockLayout L = make_layout(in_features, block_size, osr);
  const AddonlyKernel kernel = parse_kernel(kernel_name);
  if (!addonly_kernel_supported(kernel))
    throw py::value_error("kernel '" + kernel_name + "' is not supported by this CPU");
  const int64_t words = L.words_per_row();
  auto sign = require_array<uint32_t>(sign_obj, "sign", 2);
  const int64_t out = sign.shape(0);
  require_shape(sign, "sign", {out, words});
  const bool ternary = !nonzero_obj.is_none();
  py::array_t<uint32_t> nonzero;
  if (ternary) {
    nonzero = require_array<uint32_t>(nonzero_obj, "nonzero", 2);
    require_shape(nonzero, "nonzero", {out, words});
  }
  auto [scale, mean, xt, xsum, batch] = require_gemm_inputs(scale_obj, mean_obj, xt_obj, xsum_obj, L, out);
  py::array_t<float> y({batch, out});
  Status s;
  {
    py::gil_scoped_release release;
    s = addonly_gemm_variant(kernel, L, ternary ? Levels::ternary : Levels::binary, sign.data(),
                             ternary ? nonzero.data() : nullptr, scale.data(), mean.data(), out,
                             xt.data(), xsum.data(), batch, y.mutable_data(), threads);
  }
  check_status(s, "addonly_gemm");
  return y;
}

std::vector<std::string> addonly_kernels_py() {
  std::vector<std::string> names;
  for (auto [k, name] : {std::pair{AddonlyKernel::portable, "portable"},
                         std::pair{AddonlyKernel::avx2, "avx2"},
                         std::pair{AddonlyKernel::avx512, "avx512"},
                         std::pair{AddonlyKernel::avx512_mask, "avx512-mask"}})
    if (addonly_kernel_supported(k)) names.emplace_back(name);
  return names;
}

}  // namespace

void bind_gemv(py::module_& m) {
  m.def("activation_transform", &activation_transform_py, py::arg("x"), py::arg("block_size"),
        py::arg("osr"), py::arg("signs"), py::arg("down_full"), py::arg("down_last"),
        py::arg("threads") = 0, py::arg("projection") = "float32",
        "Per-token transform of the add-only path.\n"
        "x: float32 [batch, in]; signs: float32 [block_size] of +-1 or None (no Hadamard);\n"
        "down_full / down_last: float32 down-samplers D [padded, m] of a full / the last block.\n"
        "projection: 'float32', or 'bf16' (on AMX: the form the AMX GEMMs' plans run).\n"
        "Returns (xt: float32 [batch, total_code_cols], xsum: float32 [batch, num_blocks]).");
  m.def("activation_transform_bf16_supported", &activation_transform_bf16_supported,
        "Whether activation_transform(..., projection='bf16') runs here (AMX-BF16).");
  m.def("addonly_gemm", &addonly_gemm_py, py::arg("sign"), py::arg("nonzero"), py::arg("scale"),
        py::arg("mean"), py::arg("xt"), py::arg("xsum"), py::arg("in_features"),
        py::arg("block_size"), py::arg("osr"), py::arg("threads") = 0, py::arg("kernel") = "auto",
        "y = sum_b S[r,b] <q_rb, xt_b> + MU[r,b] xsum_b without multiplying by a code.\n"
        "sign / nonzero: uint32 bitplanes [out, words] (nonzero None: binary codes);\n"
        "scale / mean: uint16 fp16 bit patterns [out, num_blocks]; xt, xsum: from\n"
        "activation_transform. kernel: 'auto', 'portable', 'avx2', 'avx512', 'avx512-mask'.\n"
        "Returns y: float32 [batch, out].");
  m.def("addonly_kernel_name", [] { return std::string(addonly_kernel_name()); },
        "The add-only kernel variant chosen for this CPU.");
  m.def("addonly_kernels", &addonly_kernels_py, "The kernel variants this CPU can run.");
}

}  // namespace sdq::bind
