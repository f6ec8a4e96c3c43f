// Binding of the encoder side of the core: modulator, FWHT, resampling, bitplanes, block layout.
#include <pybind11/stl.h>

#include <cmath>
#include <cstring>

#include "common.h"
#include "sdq/bitplane.h"
#include "sdq/encode.h"
#include "sdq/fwht.h"
#include "sdq/gram_beam.h"
#include "sdq/gram_codes.h"
#include "sdq/layout.h"
#include "sdq/modulator.h"
#include "sdq/resample.h"

namespace sdq::bind {
namespace {

// The per-row ternary thresholds tau (float32 [rows]) that ternary levels require; an empty array
// for binary levels, which do not read them.
py::array_t<float> ternary_thresholds(const py::object& tau_obj, Levels levels, int64_t rows) {
  if (levels != Levels::ternary) return py::array_t<float>();
  if (tau_obj.is_none()) throw py::value_error("tau is required for ternary levels");
  auto tau = require_array<float>(tau_obj, "tau", 1);
  require_shape(tau, "tau", {rows});
  return tau;
}

py::array_t<int8_t> modulate(const py::object& z_obj, const py::object& tau_obj, int order,
                             const std::string& levels_name, int threads) {
  auto z = require_array<float>(z_obj, "z", 2);
  const Levels levels = parse_levels(levels_name);
  if (order != 1 && order != 2)
    throw py::value_error("order must be 1 or 2, got " + std::to_string(order));
  const int64_t rows = z.shape(0), m = z.shape(1);
  const py::array_t<float> tau = ternary_thresholds(tau_obj, levels, rows);
  const float* tau_ptr = levels == Levels::ternary ? tau.data() : nullptr;
  py::array_t<int8_t> codes({rows, m});
  Status st;
  {
    py::gil_scoped_release release;
    st = sigma_delta_modulate(z.data(), rows, m, m, tau_ptr, order, levels, codes.mutable_data(),
                              threads);
  }
  check_status(st, "sigma_delta_modulate");
  return codes;
}

void fwht_inplace(const py::object& x_obj, const py::object& signs_obj, bool inverse,
                  int threads) {
  auto x = require_writable<float>(x_obj, "x", 2);
  const int64_t rows = x.shape(0), n = x.shape(1);
  if (!is_power_of_two(n))
    throw py::value_error("x.shape[1] must be a power of two, got " + std::to_string(n));
  const float* signs_ptr = nullptr;
  py::array_t<float> signs;
  if (!signs_obj.is_none()) {
    signs = require_array<float>(signs_obj, "signs", 1);
    require_shape(signs, "signs", {n});
    signs_ptr = signs.data();
  }
  Status st;
  {
    py::gil_scoped_release release;
    st = fwht(x.mutable_data(), rows, n, signs_ptr, inverse, threads);
  }
  check_status(st, "fwht");
}

py::array_t<float> resample(int64_t n_in, int64_t n_out) {
  if (n_in <= 0 || n_out <= 0)
    throw py::value_error("n_in and n_out must be positive, got " + std::to_string(n_in) + ", " +
                          std::to_string(n_out));
  py::array_t<float> out({n_out, n_in});
  Status st;
  {
    py::gil_scoped_release release;
    st = resample_matrix(n_in, n_out, out.mutable_data());
  }
  check_status(st, "resample_matrix");
  return out;
}

py::tuple pack(const py::object& codes_obj, const std::string& levels_name, int threads) {
  auto codes = require_array<int8_t>(codes_obj, "codes", 2);
  const Levels levels = parse_levels(levels_name);
  const int64_t rows = codes.shape(0), cols = codes.shape(1), words = words_for(cols);
  py::array_t<uint32_t> sign({rows, words});
  py::object nonzero = py::none();
  word_t* nz_ptr = nullptr;
  if (levels == Levels::ternary) {
    py::array_t<uint32_t> nz({rows, words});
    nz_ptr = nz.mutable_data();
    nonzero = nz;
  }
  Status st;
  {
    py::gil_scoped_release release;
    st = pack_bitplanes(codes.data(), rows, cols, levels, sign.mutable_data(), nz_ptr, threads);
  }
  if (st == Status::bad_code)
    throw py::value_error("codes must be in {-1, +1} for binary or {-1, 0, +1} for ternary");
  check_status(st, "pack_bitplanes");
  return py::make_tuple(sign, nonzero);
}

py::array_t<int8_t> unpack(const py::object& sign_obj, const py::object& nonzero_obj,
                           int64_t cols, int threads) {
  auto sign = require_array<uint32_t>(sign_obj, "sign", 2);
  const int64_t rows = sign.shape(0);
  if (cols < 0 || words_for(cols) != sign.shape(1))
    throw py::value_error("cols=" + std::to_string(cols) + " does not match sign.shape[1]=" +
                          std::to_string(sign.shape(1)) + " words");
  const Levels levels = nonzero_obj.is_none() ? Levels::binary : Levels::ternary;
  py::array_t<uint32_t> nonzero;
  if (levels == Levels::ternary) {
    nonzero = require_array<uint32_t>(nonzero_obj, "nonzero", 2);
    require_shape(nonzero, "nonzero", {rows, sign.shape(1)});
  }
  py::array_t<int8_t> codes({rows, cols});
  Status st;
  {
    py::gil_scoped_release release;
    st = unpack_bitplanes(sign.data(), levels == Levels::ternary ? nonzero.data() : nullptr, rows,
                          cols, levels, codes.mutable_data(), threads);
  }
  check_status(st, "unpack_bitplanes");
  return codes;
}

py::dict layout(int64_t in_features, int64_t block_size, double osr) {
  const BlockLayout L = make_layout(in_features, block_size, osr);
  std::vector<int64_t> width, padded, m, offset;
  for (int64_t b = 0; b < L.num_blocks(); ++b) {
    width.push_back(L.width(b));
    padded.push_back(L.padded(b));
    m.push_back(L.m(b));
    offset.push_back(L.code_offset(b));
  }
  py::dict d;
  d["num_blocks"] = L.num_blocks();
  d["width"] = width;
  d["padded"] = padded;
  d["m"] = m;
  d["code_offset"] = offset;
  d["total_code_cols"] = L.total_code_cols();
  d["words_per_row"] = L.words_per_row();
  return d;
}

// The whole data-free encoder over rows [row_begin, row_end) of W (encode.h). The outputs cover
// the whole matrix; rows outside the range are left zero.
py::tuple encode(const py::object& W_obj, const py::object& signs_obj, const std::string& levels,
                 double osr, int64_t block_size, int order, bool hadamard, double sd_scale,
                 double p_scale, double p_cut, int64_t row_begin, int64_t row_end, int threads) {
  auto W = require_array<float>(W_obj, "W", 2);
  const int64_t out = W.shape(0);
  EncodeParams p;
  p.layout = make_layout(W.shape(1), block_size, osr);
  p.levels = parse_levels(levels);
  p.order = order;
  p.hadamard = hadamard;
  p.sd_scale = sd_scale;
  p.p_scale = p_scale;
  p.p_cut = p_cut;
  if (!(sd_scale > 0.0 && std::isfinite(sd_scale)))
    throw py::value_error("sd_scale must be positive and finite, got " + std::to_string(sd_scale));
  if (!(p_scale >= 0.0 && p_scale <= 1.0 && p_cut >= 0.0 && p_cut <= 1.0))
    throw py::value_error("p_scale and p_cut must be in [0, 1], got " + std::to_string(p_scale) +
                          ", " + std::to_string(p_cut));
  if (row_end < 0) row_end = out;
  if (row_begin < 0 || row_begin > row_end || row_end > out)
    throw py::value_error("rows [" + std::to_string(row_begin) + ", " + std::to_string(row_end) +
                          ") are not inside [0, " + std::to_string(out) + ")");
  py::array_t<float> signs;
  if (hadamard) {
    if (signs_obj.is_none()) throw py::value_error("signs are required when hadamard is true");
    signs = require_array<float>(signs_obj, "signs", 1);
    require_shape(signs, "signs", {block_size});
  }
  const int64_t words = p.layout.words_per_row(), nb = p.layout.num_blocks();
  auto zeros = [](py::array a) {
    std::memset(a.mutable_data(), 0, static_cast<size_t>(a.nbytes()));
    return a;
  };
  py::array_t<uint32_t> sign = zeros(py::array_t<uint32_t>({out, words}));
  py::object nonzero = py::none();
  word_t* nz_ptr = nullptr;
  if (p.levels == Levels::ternary) {
    py::array_t<uint32_t> nz = zeros(py::array_t<uint32_t>({out, words}));
    nz_ptr = nz.mutable_data();
    nonzero = nz;
  }
  py::array_t<uint16_t> scale = zeros(py::array_t<uint16_t>({out, nb}));
  py::array_t<uint16_t> mean = zeros(py::array_t<uint16_t>({out, nb}));
  Status st;
  {
    py::gil_scoped_release release;
    st = encode_rows(p, hadamard ? signs.data() : nullptr, W.data(), row_begin, row_end,
                     sign.mutable_data(), nz_ptr, scale.mutable_data(), mean.mutable_data(),
                     threads);
  }
  if (st == Status::bad_value)  // the parameters were checked above: the data is at fault
    throw py::value_error(
        "weights too large for the fp16 scale and mean (|value| must stay below 65504 after "
        "rotation and resampling), or not finite");
  check_status(st, "encode_rows");
  return py::make_tuple(sign, nonzero, scale, mean);
}

// Rows z [groups * n, m] and the upper factors hinv [groups, m, m] they are rounded against
// (rows g*n .. use hinv[g]): what both Gram rounding loops take, checked once.
struct GroupedRows {
  py::array_t<float> z, hinv;
  int64_t groups, n, m;
};

GroupedRows grouped_rows(const py::object& z_obj, const py::object& hinv_obj) {
  auto z = require_array<float>(z_obj, "z", 2);
  auto hinv = require_array<float>(hinv_obj, "hinv", 3);
  const int64_t groups = hinv.shape(0), m = hinv.shape(1);
  require_shape(hinv, "hinv", {groups, m, m});
  if (groups == 0 || z.shape(0) % groups != 0)
    throw py::value_error("z.shape[0] must be a multiple of hinv.shape[0] (rows per factor), got " +
                          std::to_string(z.shape(0)) + " and " + std::to_string(groups));
  require_shape(z, "z", {z.shape(0), m});
  return {z, hinv, groups, z.shape(0) / groups, m};
}

py::array_t<float> gram_select(const py::object& z_obj, const py::object& hinv_obj,
                               const py::object& tau_obj, const std::string& levels_name,
                               int threads) {
  const GroupedRows r = grouped_rows(z_obj, hinv_obj);
  const Levels levels = parse_levels(levels_name);
  const int64_t rows = r.groups * r.n;
  const py::array_t<float> tau = ternary_thresholds(tau_obj, levels, rows);
  const float* tau_ptr = levels == Levels::ternary ? tau.data() : nullptr;
  py::array_t<float> codes({rows, r.m});
  Status st;
  {
    py::gil_scoped_release release;
    st = gram_select_codes(r.z.data(), r.groups, r.n, r.m, r.hinv.data(), tau_ptr, levels,
                           codes.mutable_data(), threads);
  }
  check_status(st, "gram_select_codes");
  return codes;
}

py::tuple gram_beam(const py::object& z_obj, const py::object& hinv_obj, int beam,
                    const std::string& levels_name, int threads) {
  const GroupedRows r = grouped_rows(z_obj, hinv_obj);
  const Levels levels = parse_levels(levels_name);
  if (beam < 1 || beam > kMaxBeam)
    throw py::value_error("beam must be in 1.." + std::to_string(kMaxBeam) + ", got " +
                          std::to_string(beam));
  const int64_t rows = r.groups * r.n;
  py::array_t<float> codes({static_cast<int64_t>(beam), rows, r.m});
  py::array_t<float> cost({static_cast<int64_t>(beam), rows});
  Status st;
  {
    py::gil_scoped_release release;
    st = gram_beam_codes(r.z.data(), r.groups, r.n, r.m, r.hinv.data(), levels, beam,
                         codes.mutable_data(), cost.mutable_data(), threads);
  }
  check_status(st, "gram_beam_codes");
  return py::make_tuple(codes, cost);
}

void gram_refine(const py::object& q_obj, const py::object& h_obj, const py::object& G_obj,
                 const py::object& active_obj, const std::string& levels_name, int threads) {
  auto q = require_writable<float>(q_obj, "q", 2);
  auto h = require_writable<float>(h_obj, "h", 2);
  auto G = require_array<float>(G_obj, "G", 2);
  const Levels levels = parse_levels(levels_name);
  const int64_t n = q.shape(0), m = q.shape(1);
  require_shape(h, "h", {n, m});
  require_shape(G, "G", {m, m});
  const uint8_t* active_ptr = nullptr;
  py::array_t<uint8_t> active;
  if (!active_obj.is_none()) {
    active = require_array<uint8_t>(active_obj, "active", 1);
    require_shape(active, "active", {n});
    active_ptr = active.data();
  }
  Status st;
  {
    py::gil_scoped_release release;
    st = gram_refine_pass(q.mutable_data(), h.mutable_data(), n, m, G.data(), active_ptr, levels,
                          threads);
  }
  check_status(st, "gram_refine_pass");
}

}  // namespace

void bind_core(py::module_& m) {
  m.attr("MAX_OSR") = kMaxOsr;
  m.def("sigma_delta_modulate", &modulate, py::arg("z"), py::arg("tau") = py::none(),
        py::arg("order") = 1, py::arg("levels") = "ternary", py::arg("threads") = 0,
        "Modulate each row of z (float32 [rows, m], normalised) to codes int8 [rows, m].\n"
        "tau: float32 [rows] ternary thresholds (required for ternary). threads<=0: all cores.");
  m.def("gram_select_codes", &gram_select, py::arg("z"), py::arg("hinv"),
        py::arg("tau") = py::none(), py::arg("levels") = "ternary", py::arg("threads") = 0,
        "Sequential rounding (gram_codes.h) of z (float32 [groups * n, m]) against the upper\n"
        "factors hinv (float32 [groups, m, m]; rows g*n.. use hinv[g]) -> codes float32 [groups*n, m].\n"
        "tau: float32 [groups * n] ternary thresholds (required for ternary). threads<=0: all cores.");
  m.def("gram_beam_codes", &gram_beam, py::arg("z"), py::arg("hinv"), py::arg("beam"),
        py::arg("levels") = "ternary", py::arg("threads") = 0,
        "Beam search (gram_beam.h) over the sequential rounding of z (float32 [groups * n, m])\n"
        "against hinv (float32 [groups, m, m]) -> (codes float32 [beam, groups*n, m] best first,\n"
        "cost float32 [beam, groups*n]: each chain's damped weighted error). threads<=0: all cores.");
  m.def("gram_refine_pass", &gram_refine, py::arg("q"), py::arg("h"), py::arg("G"),
        py::arg("active") = py::none(), py::arg("levels") = "ternary", py::arg("threads") = 0,
        "One coordinate-descent pass (gram_codes.h) over codes q (float32 [n, m], in place) with\n"
        "residual h (float32 [n, m], consumed) and G (float32 [m, m]); active: uint8 [n] or None.");
  m.def("fwht", &fwht_inplace, py::arg("x"), py::arg("signs") = py::none(),
        py::arg("inverse") = false, py::arg("threads") = 0,
        "In place on float32 [rows, n], n a power of two: x <- H diag(signs) x / sqrt(n)\n"
        "(inverse: x <- diag(signs) H x / sqrt(n)).");
  m.def("resample_matrix", &resample, py::arg("n_in"), py::arg("n_out"),
        "float32 [n_out, n_in] matrix R with R @ x == scipy.signal.resample(x, n_out).");
  m.def("pack_bitplanes", &pack, py::arg("codes"), py::arg("levels"), py::arg("threads") = 0,
        "int8 codes [rows, cols] -> (sign uint32 [rows, words], nonzero uint32 or None).");
  m.def("unpack_bitplanes", &unpack, py::arg("sign"), py::arg("nonzero"), py::arg("cols"),
        py::arg("threads") = 0, "Inverse of pack_bitplanes (ternary iff nonzero is not None).");
  m.def("encode_rows", &encode, py::arg("W"), py::arg("signs"), py::arg("levels"), py::arg("osr"),
        py::arg("block_size") = 128, py::arg("order") = 1, py::arg("hadamard") = true,
        py::arg("sd_scale") = 0.95, py::arg("p_scale") = 0.93, py::arg("p_cut") = 0.55,
        py::arg("row_begin") = 0, py::arg("row_end") = -1, py::arg("threads") = 0,
        "Data-free SDQ of rows [row_begin, row_end) of W (float32 [out, in]; row_end -1: out):\n"
        "rotate, up-sample, normalise, modulate, pack (encode.h). signs: float32 [block_size]\n"
        "(ignored without hadamard). Returns (sign uint32 [out, words], nonzero uint32 or None,\n"
        "scale uint16 [out, blocks], mean uint16 [out, blocks]) over the whole matrix, fp16\n"
        "bits; rows outside the range are zero.");
  m.def("layout", &layout, py::arg("in_features"), py::arg("block_size"), py::arg("osr"),
        "Block geometry of a layer: widths, padded widths, samples m and code offsets per block.");
}

}  // namespace sdq::bind
