// Binding of LinearPlan (linear_plan.h): built once per layer from NumPy views of its tensors
// (checked here, kept alive by the Python object), then called with raw data pointers, the
// cheapest call pybind11 allows, so a layer call costs about one Python-to-C++ crossing.
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "sdq/gemv.h"
#include "sdq/linear_plan.h"
#include "sdq/lut_gemm.h"
#include "sdq/trit5.h"

namespace sdq::bind {
namespace {

class PyLinearPlan {
 public:
  PyLinearPlan(int64_t in_features, int64_t block_size, double osr, const py::object& sign_obj,
               const py::object& nonzero_obj, const py::object& scale_obj,
               const py::object& mean_obj, const py::object& signs_obj,
               const py::object& down_full_obj, const py::object& down_last_obj,
               const std::string& gemm, const py::object& trits_obj,
               const py::object& trit_signs_obj, const py::object& lut_codes_obj) {
    const BlockLayout L = make_layout(in_features, block_size, osr);
    const int64_t nb = L.num_blocks(), words = L.words_per_row();
    LinearPlanDesc d;
    d.layout = L;
    d.gemm = parse_gemm(gemm);
    const bool ternary = !nonzero_obj.is_none() || !trits_obj.is_none();
    const Levels levels = ternary ? Levels::ternary : Levels::binary;
    auto scale = keep(require_array<uint16_t>(scale_obj, "scale", 2));
    const int64_t out = scale.shape(0);
    d.out = out;
    d.levels = levels;
    if (!sign_obj.is_none() || (!ternary && lut_codes_obj.is_none())) {
      auto sign = keep(require_array<uint32_t>(sign_obj, "sign", 2));
      require_shape(sign, "sign", {out, words});
      d.sign = sign.data();
    }
    if (levels == Levels::ternary && !nonzero_obj.is_none()) {
      auto nonzero = keep(require_array<uint32_t>(nonzero_obj, "nonzero", 2));
      require_shape(nonzero, "nonzero", {out, words});
      d.nonzero = nonzero.data();
    }
    if (levels == Levels::binary && !lut_codes_obj.is_none()) {
      auto lut = keep(require_array<uint8_t>(lut_codes_obj, "lut_codes", 1));
      require_shape(lut, "lut_codes", {lut_packed_bytes(L, out)});
      d.lut_codes = lut.data();
    }
    if (levels == Levels::ternary && !trits_obj.is_none()) {
      auto trits = keep(require_array<uint8_t>(trits_obj, "trits", 3));
      require_shape(trits, "trits", {trit5_tiles(out), trit5_total_groups(L) / 2, kTrit5TileRows});
      d.trits = trits.data();
      auto trit_signs = keep(require_array<uint32_t>(trit_signs_obj, "trit_signs", 2));
      require_shape(trit_signs, "trit_signs", {trit5_tiles(out), trit5_total_groups(L)});
      d.trit_signs = trit_signs.data();
    }
    require_shape(scale, "scale", {d.out, nb});
    d.scale = scale.data();
    auto mean = keep(require_array<uint16_t>(mean_obj, "mean", 2));
    require_shape(mean, "mean", {d.out, nb});
    d.mean = mean.data();
    // The transform constants are copied by create: no need to keep them.
    d.hadamard = !signs_obj.is_none();
    py::array_t<float> signs, down_full, down_last;
    if (d.hadamard) {
      signs = require_array<float>(signs_obj, "signs", 1);
      require_shape(signs, "signs", {block_size});
      d.signs = signs.data();
    }
    down_full = require_array<float>(down_full_obj, "down_full", 2);
    require_shape(down_full, "down_full", {L.padded(0), L.m(0)});
    d.down_full = down_full.data();
    down_last = require_array<float>(down_last_obj, "down_last", 2);
    require_shape(down_last, "down_last", {L.padded(nb - 1), L.m(nb - 1)});
    d.down_last = down_last.data();
    check_status(LinearPlan::create(d, &plan_), "LinearPlan");
  }

  // y_ptr: float32 [batch, out]; x_ptr: float32 [batch, in_features]; both contiguous.
  void run_ptr(uintptr_t x_ptr, int64_t batch, uintptr_t y_ptr, int threads) const {
    Status s;
    {
      py::gil_scoped_release release;
      s = plan_->run(reinterpret_cast<const float*>(x_ptr), batch, reinterpret_cast<float*>(y_ptr),
                     threads);
    }
    check_status(s, "LinearPlan.run");
  }

  py::array_t<float> run(const py::object& x_obj, int threads) const {
    auto x = require_array<float>(x_obj, "x", 2);
    require_shape(x, "x", {x.shape(0), plan_->layout().in_features});
    py::array_t<float> y({x.shape(0), plan_->out()});
    run_ptr(reinterpret_cast<uintptr_t>(x.data()), x.shape(0),
            reinterpret_cast<uintptr_t>(y.mutable_data()), threads);
    return y;
  }

  const LinearPlan& plan() const { return *plan_; }

 private:
  static PlanGemm parse_gemm(const std::string& name) {
    if (name == "auto") return PlanGemm::automatic;
    if (name == "addonly") return PlanGemm::addonly;
    if (name == "lut_binary") return PlanGemm::lut_binary;
    if (name == "trit5") return PlanGemm::trit5;
    if (name == "amx_binary") return PlanGemm::amx_binary;
    if (name == "amx_ternary") return PlanGemm::amx_ternary;
    throw py::value_error("gemm must be 'auto', 'addonly', 'lut_binary', 'amx_binary', 'trit5' or "
                          "'amx_ternary', got '" + name + "'");
  }

  template <typename T>
  py::array_t<T> keep(py::array_t<T> a) {
    arrays_.push_back(a);
    return a;
  }

  std::unique_ptr<LinearPlan> plan_;
  std::vector<py::object> arrays_;  // the arrays whose memory the plan reads
};

// The two kernels of the torch ops' CPU implementations (sdq/ops.py) on raw data pointers: the
// op checks dtypes, contiguity and shapes (cheap tensor attributes) and allocates the outputs, so
// a call skips the NumPy round trip of activation_transform / addonly_gemm (bind_gemv.cpp).
void activation_transform_ptr(uintptr_t x, int64_t batch, int64_t in_features,
                              int64_t block_size, double osr, uintptr_t signs,
                              uintptr_t down_full, uintptr_t down_last, uintptr_t xt,
                              uintptr_t xsum, int threads) {
  const BlockLayout L = make_layout(in_features, block_size, osr);
  Status s;
  {
    py::gil_scoped_release release;
    s = activation_transform(L, signs != 0, reinterpret_cast<const float*>(signs),
                             reinterpret_cast<const float*>(down_full),
                             reinterpret_cast<const float*>(down_last),
                             reinterpret_cast<const float*>(x), batch,
                             reinterpret_cast<float*>(xt), reinterpret_cast<float*>(xsum),
                             threads);
  }
  check_status(s, "activation_transform_ptr");
}

void addonly_gemm_ptr(uintptr_t sign, uintptr_t nonzero, uintptr_t scale, uintptr_t mean,
                      uintptr_t xt, uintptr_t xsum, uintptr_t y, int64_t in_features,
                      int64_t block_size, double osr, int64_t out, int64_t batch, int threads) {
  const BlockLayout L = make_layout(in_features, block_size, osr);
  Status s;
  {
    py::gil_scoped_release release;
    s = addonly_gemm(L, nonzero ? Levels::ternary : Levels::binary,
                     reinterpret_cast<const word_t*>(sign), reinterpret_cast<const word_t*>(nonzero),
                     reinterpret_cast<const uint16_t*>(scale),
                     reinterpret_cast<const uint16_t*>(mean), out,
                     reinterpret_cast<const float*>(xt), reinterpret_cast<const float*>(xsum),
                     batch, reinterpret_cast<float*>(y), threads);
  }
  check_status(s, "addonly_gemm_ptr");
}

// The int8-table GEMMs (lut_gemm.h, trit5.h) on raw pointers, for the ops sdq::lut_gemm_binary
// and sdq::trit5_gemm (sdq/ops.py), which check what these cannot.
void lut_gemm_binary_ptr(uintptr_t lut_codes, uintptr_t scale, uintptr_t mean, uintptr_t xt,
                         uintptr_t xsum, uintptr_t y, int64_t in_features, int64_t block_size,
                         double osr, int64_t out, int64_t batch, int threads) {
  const BlockLayout L = make_layout(in_features, block_size, osr);
  Status s;
  {
    py::gil_scoped_release release;
    s = lut_gemm_binary(L, reinterpret_cast<const uint8_t*>(lut_codes),
                        reinterpret_cast<const uint16_t*>(scale),
                        reinterpret_cast<const uint16_t*>(mean), out,
                        reinterpret_cast<const float*>(xt), reinterpret_cast<const float*>(xsum),
                        batch, reinterpret_cast<float*>(y), threads);
  }
  check_status(s, "lut_gemm_binary_ptr");
}

void trit5_gemm_ptr(uintptr_t trits, uintptr_t trit_signs, uintptr_t scale, uintptr_t mean,
                    uintptr_t xt, uintptr_t xsum, uintptr_t y, int64_t in_features,
                    int64_t block_size, double osr, int64_t out, int64_t batch, int threads) {
  const BlockLayout L = make_layout(in_features, block_size, osr);
  Status s;
  {
    py::gil_scoped_release release;
    s = trit5_gemm(L, reinterpret_cast<const uint8_t*>(trits),
                   reinterpret_cast<const uint32_t*>(trit_signs),
                   reinterpret_cast<const uint16_t*>(scale),
                   reinterpret_cast<const uint16_t*>(mean), out, reinterpret_cast<const float*>(xt),
                   reinterpret_cast<const float*>(xsum), batch, reinterpret_cast<float*>(y),
                   threads);
  }
  check_status(s, "trit5_gemm_ptr");
}

}  // namespace

void bind_plan(py::module_& m) {
  py::class_<PyLinearPlan>(m, "LinearPlan",
                           "A prepared add-only layer: activation transform + GEMM in one call.\n"
                           "Built from NumPy views of the layer's tensors (kept alive): sign /\n"
                           "nonzero uint32 bitplanes [out, words] (nonzero None: binary) and/or\n"
                           "binary lut_codes uint8 (lut_pack_binary) / ternary trits uint8,\n"
                           "trit_signs uint32 (trit5.h); scale /\n"
                           "mean uint16 fp16 bit patterns [out, num_blocks], signs float32\n"
                           "[block_size] or None, down_full / down_last float32 down-samplers.\n"
                           "Plans with equal transform constants share the transform: a call\n"
                           "whose x (batch and contents, wherever it lives) equals the last\n"
                           "one transformed on this thread reuses it.\n"
                           "gemm: 'auto' (int8 tables: 'lut_binary' given lut_codes, 'trit5' given\n"
                           "trits; else 'addonly'; where the CPU has AMX, calls of >= 6 tokens\n"
                           "(binary) or >= 8 (ternary) run 'amx_binary' / 'amx_ternary'), or\n"
                           "one named; 'addonly' is the exact one.")
      .def(py::init<int64_t, int64_t, double, const py::object&, const py::object&,
                    const py::object&, const py::object&, const py::object&, const py::object&,
                    const py::object&, const std::string&, const py::object&,
                    const py::object&, const py::object&>(),
           py::arg("in_features"), py::arg("block_size"), py::arg("osr"), py::arg("sign"),
           py::arg("nonzero"), py::arg("scale"), py::arg("mean"), py::arg("signs"),
           py::arg("down_full"), py::arg("down_last"), py::arg("gemm") = "auto",
           py::arg("trits") = py::none(), py::arg("trit_signs") = py::none(),
           py::arg("lut_codes") = py::none())
      .def("run_ptr", &PyLinearPlan::run_ptr, py::arg("x_ptr"), py::arg("batch"),
           py::arg("y_ptr"), py::arg("threads"),
           "y = layer(x) through raw data pointers (float32, contiguous, x [batch, in],\n"
           "y [batch, out]); the caller guarantees the sizes.")
      .def("run", &PyLinearPlan::run, py::arg("x"), py::arg("threads") = 0,
           "y = layer(x): x float32 [batch, in] -> y float32 [batch, out].")
      .def("shares_transform_with",
           [](const PyLinearPlan& a, const PyLinearPlan& b) {
             return a.plan().shares_transform_with(b.plan());
           })
      .def_property_readonly("in_features",
                             [](const PyLinearPlan& p) { return p.plan().layout().in_features; })
      .def_property_readonly("out_features", [](const PyLinearPlan& p) { return p.plan().out(); })
      .def_property_readonly("gemm", [](const PyLinearPlan& p) {
        return std::string(p.plan().gemm_name());
      }, "The GEMM of a one-token call.")
      .def_property_readonly("kernel", [](const PyLinearPlan& p) {
        return std::string(p.plan().kernel_name());
      }, "The CPU variant of a one-token call.")
      .def("gemm_for", [](const PyLinearPlan& p, int64_t batch) {
        return std::string(p.plan().gemm_name(batch));
      }, py::arg("batch"), "The GEMM of a call of `batch` tokens.");
  m.def("activation_transform_ptr", &activation_transform_ptr, py::arg("x_ptr"),
        py::arg("batch"), py::arg("in_features"), py::arg("block_size"), py::arg("osr"),
        py::arg("signs_ptr"), py::arg("down_full_ptr"), py::arg("down_last_ptr"),
        py::arg("xt_ptr"), py::arg("xsum_ptr"), py::arg("threads"),
        "activation_transform on raw float32 pointers (signs_ptr 0: no Hadamard); the caller\n"
        "guarantees contiguous arrays of the right sizes.");
  m.def("addonly_gemm_ptr", &addonly_gemm_ptr, py::arg("sign_ptr"), py::arg("nonzero_ptr"),
        py::arg("scale_ptr"), py::arg("mean_ptr"), py::arg("xt_ptr"), py::arg("xsum_ptr"),
        py::arg("y_ptr"), py::arg("in_features"), py::arg("block_size"), py::arg("osr"),
        py::arg("out"), py::arg("batch"), py::arg("threads"),
        "addonly_gemm on raw pointers (nonzero_ptr 0: binary); the caller guarantees\n"
        "contiguous arrays of the right sizes and dtypes.");
  m.def("lut_gemm_binary_ptr", &lut_gemm_binary_ptr, py::arg("lut_codes_ptr"),
        py::arg("scale_ptr"), py::arg("mean_ptr"), py::arg("xt_ptr"), py::arg("xsum_ptr"),
        py::arg("y_ptr"), py::arg("in_features"), py::arg("block_size"), py::arg("osr"),
        py::arg("out"), py::arg("batch"), py::arg("threads"),
        "lut_gemm_binary on raw pointers; the caller guarantees sizes and dtypes.");
  m.def("trit5_gemm_ptr", &trit5_gemm_ptr, py::arg("trits_ptr"), py::arg("trit_signs_ptr"),
        py::arg("scale_ptr"), py::arg("mean_ptr"), py::arg("xt_ptr"), py::arg("xsum_ptr"),
        py::arg("y_ptr"), py::arg("in_features"), py::arg("block_size"), py::arg("osr"),
        py::arg("out"), py::arg("batch"), py::arg("threads"),
        "trit5_gemm on raw pointers; the caller guarantees sizes and dtypes.");
  m.def("linear_plan_transform_hits", &linear_plan_transform_hits,
        "How many LinearPlan calls on this thread reused the shared transform (diagnostics).");
}

}  // namespace sdq::bind
