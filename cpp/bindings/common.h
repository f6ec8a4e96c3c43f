// Shared helpers of the pybind11 binding: argument checks that raise TypeError/ValueError naming
// the argument, and the Status -> exception translation. Validation lives here, not in the core.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "sdq/layout.h"
#include "sdq/levels.h"
#include "sdq/status.h"

namespace sdq::bind {

namespace py = pybind11;

// Unless s is ok, raise "<what>: <status text>[: <detail>]" as
//   ValueError   for argument errors (is_argument_error: the caller can fix them),
//   MemoryError  for out_of_memory,
//   RuntimeError otherwise (internal_error, cuda_error, not_built).
// `detail` defaults to the text of the exception the core caught (out_of_memory, internal_error).
inline void check_status(Status s, const char* what, const std::string& detail = {}) {
  if (s == Status::ok) return;
  std::string msg = std::string(what) + ": " + status_string(s);
  std::string more = detail;
  if (more.empty() && (s == Status::out_of_memory || s == Status::internal_error))
    more = last_exception_text();
  if (!more.empty()) msg += ": " + more;
  if (is_argument_error(s)) throw py::value_error(msg);
  if (s == Status::out_of_memory) {
    // pybind11 has no MemoryError class that keeps a message; set the Python error directly.
    PyErr_SetString(PyExc_MemoryError, msg.c_str());
    throw py::error_already_set();
  }
  throw std::runtime_error(msg);
}

// Require a C-contiguous NumPy array of dtype T with `ndim` dimensions; TypeError/ValueError otherwise.
template <typename T>
py::array_t<T> require_array(const py::handle& obj, const char* name, int ndim) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(std::string(name) + " must be a numpy array (use tensor.numpy() for torch)");
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!arr.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(name) + " must have dtype " +
                         std::string(py::str(py::dtype::of<T>())) + ", got " +
                         std::string(py::str(arr.dtype())));
  if (arr.ndim() != ndim)
    throw py::value_error(std::string(name) + " must be " + std::to_string(ndim) + "-D, got " +
                          std::to_string(arr.ndim()) + "-D");
  if (!(arr.flags() & py::array::c_style))
    throw py::value_error(std::string(name) + " must be C-contiguous");
  return py::reinterpret_borrow<py::array_t<T>>(arr);
}

template <typename T>
py::array_t<T> require_writable(const py::handle& obj, const char* name, int ndim) {
  auto arr = require_array<T>(obj, name, ndim);
  if (!arr.writeable()) throw py::value_error(std::string(name) + " must be writable");
  return arr;
}

inline Levels parse_levels(const std::string& levels) {
  if (levels == "binary") return Levels::binary;
  if (levels == "ternary") return Levels::ternary;
  throw py::value_error("levels must be 'binary' or 'ternary', got '" + levels + "'");
}

// The block layout of a layer, or ValueError naming what is wrong with its arguments.
inline BlockLayout make_layout(int64_t in_features, int64_t block_size, double osr) {
  if (in_features <= 0)
    throw py::value_error("in_features must be positive, got " + std::to_string(in_features));
  if (!is_power_of_two(block_size))
    throw py::value_error("block_size must be a power of two, got " + std::to_string(block_size));
  if (!(osr > 0.0 && osr <= kMaxOsr))
    throw py::value_error("osr must be in (0, " + std::to_string(kMaxOsr) + "], got " +
                          std::to_string(osr));
  const BlockLayout L{in_features, block_size, osr};
  if (!L.valid())
    throw py::value_error("osr " + std::to_string(osr) + " leaves a block with no samples");
  return L;
}

inline void require_shape(const py::array& a, const char* name, std::vector<int64_t> shape) {
  bool same = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t i = 0; same && i < shape.size(); ++i) same = a.shape(i) == shape[i];
  if (!same) {
    std::string want = "(";
    for (size_t i = 0; i < shape.size(); ++i) want += (i ? ", " : "") + std::to_string(shape[i]);
    std::string got = "(";
    for (py::ssize_t i = 0; i < a.ndim(); ++i) got += (i ? ", " : "") + std::to_string(a.shape(i));
    throw py::value_error(std::string(name) + " must have shape " + want + "), got " + got + ")");
  }
}

// ValueError unless a row count is >= 0.
inline void require_rows(int64_t out) {
  if (out < 0) throw py::value_error("out must be >= 0, got " + std::to_string(out));
}

// packed uint8 [lut_packed_bytes(L, out)]: binary codes in lut_pack_binary's tiles (sdq/lut_gemm.h),
// named in the errors (bind_lut.cpp).
py::array_t<uint8_t> require_lut_codes(const py::object& packed_obj, const BlockLayout& L,
                                       int64_t out);

// What every CPU GEMM binding reads besides the codes: scale, mean uint16 [out, num_blocks]
// (fp16 bit patterns), xt float32 [batch, total_code_cols], xsum float32 [batch, num_blocks];
// each checked and named in the error. batch is xt's first dimension.
struct GemmInputs {
  py::array_t<uint16_t> scale, mean;
  py::array_t<float> xt, xsum;
  int64_t batch;
};

inline GemmInputs require_gemm_inputs(const py::object& scale_obj, const py::object& mean_obj,
                                      const py::object& xt_obj, const py::object& xsum_obj,
                                      const BlockLayout& L, int64_t out) {
  const int64_t nb = L.num_blocks();
  GemmInputs in;
  in.scale = require_array<uint16_t>(scale_obj, "scale", 2);
  require_shape(in.scale, "scale", {out, nb});
  in.mean = require_array<uint16_t>(mean_obj, "mean", 2);
  require_shape(in.mean, "mean", {out, nb});
  in.xt = require_array<float>(xt_obj, "xt", 2);
  in.batch = in.xt.shape(0);
  require_shape(in.xt, "xt", {in.batch, L.total_code_cols()});
  in.xsum = require_array<float>(xsum_obj, "xsum", 2);
  require_shape(in.xsum, "xsum", {in.batch, nb});
  return in;
}

// trits uint8 [tiles, groups / 2, 32] and trit_signs uint32 [tiles, groups] of a trit5 layer of
// `out` rows (sdq/trit5.h), named in the errors (bind_trit5.cpp).
std::pair<py::array_t<uint8_t>, py::array_t<uint32_t>> require_trit5(const py::object& trits_obj,
                                                                     const py::object& signs_obj,
                                                                     const BlockLayout& L,
                                                                     int64_t out);

}  // namespace sdq::bind
