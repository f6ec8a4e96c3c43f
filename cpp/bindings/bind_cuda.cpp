// Placeholder until the CUDA kernels land.
#include <pybind11/pybind11.h>
namespace sdq::bind {
void bind_cuda(pybind11::module_& m) { m.def("has_cuda", [] { return false; }); }
}  // namespace sdq::bind
