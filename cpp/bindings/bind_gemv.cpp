// Placeholder until the CPU add-only kernels land.
#include <pybind11/pybind11.h>
namespace sdq::bind {
void bind_gemv(pybind11::module_&) {}
}  // namespace sdq::bind
