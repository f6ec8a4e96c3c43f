// The activation transform's projection (project.h): the portable variant and the run-time choice.
#include "project.h"

#include <algorithm>

namespace sdq::detail {

void project_portable(const float* __restrict down, int64_t padded, int64_t m,
                      const float* __restrict v, int64_t tokens, float* __restrict out,
                      int64_t out_stride) {
  for (int64_t t = 0; t < tokens; ++t) std::fill(out + t * out_stride, out + t * out_stride + m, 0.0f);
  for (int64_t i = 0; i < padded; ++i) {
    const float* __restrict d = down + i * m;
    for (int64_t t = 0; t < tokens; ++t) {
      const float vi = v[t * padded + i];
      float* __restrict o = out + t * out_stride;
      for (int64_t j = 0; j < m; ++j) o[j] += d[j] * vi;
    }
  }
}

namespace {

bool cpu_has(ProjectKernel k) noexcept {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (k == ProjectKernel::avx2) return avx2;
  if (k == ProjectKernel::avx512) return avx2 && __builtin_cpu_supports("avx512f");
#endif
  return k == ProjectKernel::portable;
}

}  // namespace

ProjectFn project_kernel(ProjectKernel kernel) noexcept {
  if (kernel == ProjectKernel::automatic) {
    static const ProjectKernel best = cpu_has(ProjectKernel::avx512) ? ProjectKernel::avx512
                                      : cpu_has(ProjectKernel::avx2) ? ProjectKernel::avx2
                                                                     : ProjectKernel::portable;
    kernel = best;
  }
  if (!cpu_has(kernel)) return nullptr;
  switch (kernel) {
    case ProjectKernel::avx512: return project_avx512;
    case ProjectKernel::avx2: return project_avx2;
    default: return project_portable;
  }
}

}  // namespace sdq::detail
