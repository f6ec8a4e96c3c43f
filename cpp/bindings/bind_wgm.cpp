// Binding of the WGM partition (sdq/wgm.h): wgm_partition and wgm_cost on NumPy arrays.
// Arguments are checked here so each error names the argument; the core re-checks the values
// while it runs (one pass, in parallel) and reports the first bad one, which becomes the message.
#include <cmath>
#include <sstream>

#include "common.h"
#include "sdq/wgm.h"

namespace sdq::bind {
namespace {

WgmMethod parse_method(const std::string& method) {
  if (method == "greedy") return WgmMethod::greedy;
  if (method == "windowed") return WgmMethod::windowed;
  if (method == "dp") return WgmMethod::dp;
  throw py::value_error("method must be 'greedy', 'windowed' or 'dp', got '" + method + "'");
}

py::array_t<float> require_values(const py::object& obj) {
  auto values = require_array<float>(obj, "values", 2);
  if (values.shape(0) == 0 || values.shape(1) == 0)
    throw py::value_error("values is empty: shape (" + std::to_string(values.shape(0)) + ", " +
                          std::to_string(values.shape(1)) + ")");
  return values;
}

void require_lambda(double lam) {
  if (!(std::isfinite(lam) && lam >= 0.0))
    throw py::value_error("lam must be finite and >= 0, got " + std::to_string(lam));
}

std::string at(const WgmIssue& i, const char* name) {
  return std::string(name) + "[" + std::to_string(i.row) + ", " + std::to_string(i.col) + "]";
}

// The core's report of a bad value or boundary, as a ValueError that says where and why.
[[noreturn]] void raise_issue(const WgmIssue& i, const float* values, const int64_t* b,
                              int64_t n, int64_t groups) {
  std::ostringstream msg;
  msg.precision(9);
  const float* v = values + i.row * n;
  switch (i.kind) {
    case WgmIssue::not_finite:
      msg << at(i, "values") << " is " << v[i.col] << ": values must be finite";
      break;
    case WgmIssue::negative:
      msg << at(i, "values") << " = " << v[i.col] << " is negative: values must be magnitudes";
      break;
    case WgmIssue::unsorted:
      msg << "values row " << i.row << " is not sorted ascending: " << at(i, "values") << " = "
          << v[i.col] << " < " << v[i.col - 1] << " before it";
      break;
    default:
      msg << "boundaries row " << i.row << " is not a partition of 0.." << n << " ("
          << at(i, "boundaries") << " = " << b[i.row * (groups + 1) + i.col]
          << "): need 0 = b_0 < b_1 < ... < b_k = n, then n repeated";
  }
  throw py::value_error(msg.str());
}

py::array_t<int64_t> partition(const py::object& values_obj, int64_t groups, int64_t window,
                               double lam, const std::string& method_name, int threads) {
  auto values = require_values(values_obj);
  const WgmMethod method = parse_method(method_name);
  if (groups < 1) throw py::value_error("groups must be >= 1, got " + std::to_string(groups));
  if (window < 1) throw py::value_error("window must be >= 1, got " + std::to_string(window));
  require_lambda(lam);
  const int64_t rows = values.shape(0), n = values.shape(1);
  if (method == WgmMethod::dp && n > kWgmDpMaxN)
    throw py::value_error("method 'dp' is O(groups * n^2), an oracle for n <= " +
                          std::to_string(kWgmDpMaxN) + "; got n = " + std::to_string(n));
  py::array_t<int64_t> boundaries({rows, groups + 1});
  WgmIssue issue;
  Status st;
  {
    py::gil_scoped_release release;
    st = wgm_partition(values.data(), rows, n, groups, method, window, lam,
                       boundaries.mutable_data(), threads, &issue);
  }
  if (issue.kind != WgmIssue::none) raise_issue(issue, values.data(), nullptr, n, groups);
  check_status(st, "wgm_partition");
  return boundaries;
}

py::array_t<double> cost(const py::object& values_obj, const py::object& boundaries_obj,
                         double lam) {
  auto values = require_values(values_obj);
  auto boundaries = require_array<int64_t>(boundaries_obj, "boundaries", 2);
  require_lambda(lam);
  const int64_t rows = values.shape(0), n = values.shape(1);
  if (boundaries.shape(0) != rows || boundaries.shape(1) < 2)
    throw py::value_error("boundaries must have shape (" + std::to_string(rows) +
                          ", groups + 1) with groups >= 1, got (" +
                          std::to_string(boundaries.shape(0)) + ", " +
                          std::to_string(boundaries.shape(1)) + ")");
  const int64_t groups = boundaries.shape(1) - 1;
  py::array_t<double> out(rows);
  WgmIssue issue;
  Status st;
  {
    py::gil_scoped_release release;
    st = wgm_cost(values.data(), rows, n, boundaries.data(), groups, lam, out.mutable_data(), 0,
                  &issue);
  }
  if (issue.kind != WgmIssue::none)
    raise_issue(issue, values.data(), boundaries.data(), n, groups);
  check_status(st, "wgm_cost");
  return out;
}

}  // namespace

void bind_wgm(py::module_& m) {
  m.def("wgm_partition", &partition, py::arg("values"), py::arg("groups"),
        py::arg("window") = kWgmDefaultWindow, py::arg("lam") = kWgmDefaultLambda,
        py::arg("method") = "windowed", py::arg("threads") = 0,
        "Partition each row of values (float32 [rows, n], rows sorted ascending, >= 0, finite)\n"
        "into `groups` contiguous groups minimising sum(|g| Var(g) + lam / |g|).\n"
        "method: 'greedy' (merge from singletons), 'windowed' (merge from windows of `window`\n"
        "values; from singletons when ceil(n / window) < groups), 'dp' (exact, n <= 4096).\n"
        "Returns int64 [rows, groups + 1] boundaries 0 = b_0 < ... < b_G = n (group g is\n"
        "values[b_g:b_{g+1}]); a row with n < groups has n singletons, then n repeated.\n"
        "Rows are split across `threads` (<= 0: all cores); the GIL is released.");
  m.def("wgm_cost", &cost, py::arg("values"), py::arg("boundaries"),
        py::arg("lam") = kWgmDefaultLambda,
        "float64 [rows]: sum over groups of |g| Var(g) + lam / |g| for the given boundaries\n"
        "(int64 [rows, groups + 1], laid out as wgm_partition returns them).");
}

}  // namespace sdq::bind
