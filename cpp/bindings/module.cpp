// sdq._core: the pybind11 module. Each area binds itself in its own file.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "sdq/threads.h"

namespace py = pybind11;

namespace sdq::bind {
void bind_core(py::module_& m);  // bind_core.cpp: modulator, FWHT, resampling, bitplanes, layout
void bind_gemv(py::module_& m);  // bind_gemv.cpp: CPU add-only kernels
void bind_cuda(py::module_& m);  // bind_cuda.cpp: CUDA kernels (stubs when built without nvcc)
void bind_wgm(py::module_& m);   // bind_wgm.cpp: WGM partition of sorted magnitudes
void bind_wgm_gemm(py::module_& m);  // bind_wgm_gemm.cpp: WGM (dynamic-grouping) add-only kernel
void bind_lut(py::module_& m);  // bind_lut.cpp: binary int8 look-up (T-MAC style) kernels
void bind_amx(py::module_& m);  // bind_amx.cpp: binary int8 GEMM on Intel AMX tiles
void bind_plan(py::module_& m);  // bind_plan.cpp: LinearPlan, a prepared layer call
void bind_trit5(py::module_& m);  // bind_trit5.cpp: ternary at 1.67 bits (trit5) and its kernel
}  // namespace sdq::bind

PYBIND11_MODULE(_core, m) {
  m.doc() = "sdq native core: Sigma-Delta encoder, FWHT, bitplanes and add-only kernels";
  sdq::bind::bind_core(m);
  sdq::bind::bind_gemv(m);
  sdq::bind::bind_cuda(m);
  sdq::bind::bind_wgm(m);
  sdq::bind::bind_wgm_gemm(m);
  sdq::bind::bind_lut(m);
  sdq::bind::bind_amx(m);
  sdq::bind::bind_plan(m);
  sdq::bind::bind_trit5(m);
  m.def("openmp_available", &sdq::openmp_available,
        "Whether this build has the OpenMP thread backend (sdq/threads.h).");
  m.def("thread_backend", [] {
    return sdq::thread_backend() == sdq::ThreadBackend::openmp ? "openmp" : "pool";
  }, "Where parallel work runs now: 'pool' (sdq's workers) or 'openmp' (the caller's team).");
  m.def("set_thread_backend", [](const std::string& name) {
    if (name != "pool" && name != "openmp")
      throw std::invalid_argument("thread backend must be one of 'pool', 'openmp'; got '" + name +
                                  "'");
    const auto b = name == "openmp" ? sdq::ThreadBackend::openmp : sdq::ThreadBackend::pool;
    if (sdq::set_thread_backend(b) != sdq::Status::ok)
      throw std::runtime_error("this build of sdq has no OpenMP thread backend");
  }, py::arg("name"), "Process-wide: 'pool' or 'openmp' (sdq/threads.h); a forked child "
     "goes back to 'pool'.");
}
