// Resampling matrix (resample.h). Column j of R is the resampled unit impulse e_j, in closed form:
//   R[n][j] = (1/n_in) * sum_k c_k g_k cos(2 pi k (n/n_out - j/n_in)),  k = 0 .. kmax
// where k runs over the rfft bins kept (those below the Nyquist bin of the shorter length, plus it),
// c_k is the inverse real FFT's weight (1 for the DC bin and for the output's own Nyquist bin, 2
// otherwise) and g_k is SciPy's Nyquist adjustment (0.5 when up-sampling an even length, 2 when
// down-sampling to an even length, applied to bin min(n_in, n_out)/2; 1 elsewhere). The imaginary
// part of an even output's Nyquist bin is dropped by the inverse real FFT, which the cosine form
// does by itself. The phase is reduced exactly in integers before the cosine (looked up in a
// table of the period's cosines when the period is small enough: the same values, far fewer
// cosines).
#include "sdq/resample.h"

#include <cmath>
#include <vector>

#include "guard.h"

namespace sdq {
namespace {

constexpr int64_t kMaxLength = int64_t{1} << 20;
constexpr int64_t kMaxTable = int64_t{1} << 22;  // 32 MiB of cosines at most

constexpr double kTwoPi = 6.283185307179586476925286766559;

// cos(2 pi p / period) for every phase p, so that an entry costs table look-ups, not cosines.
// Only for periods small enough to tabulate; the values are those entry() would compute itself.
std::vector<double> cos_table(int64_t period) {
  std::vector<double> t;
  if (period > kMaxTable) return t;
  t.resize(static_cast<size_t>(period));
  for (int64_t p = 0; p < period; ++p)
    t[p] = std::cos(kTwoPi * static_cast<double>(p) / static_cast<double>(period));
  return t;
}

double entry(int64_t n, int64_t j, int64_t n_in, int64_t n_out, const std::vector<double>& cos_of) {
  const int64_t common = n_in < n_out ? n_in : n_out;
  const int64_t kmax = common / 2;  // last bin copied (the Nyquist bin of `common` if even)
  const int64_t period = n_in * n_out;
  int64_t step = (n * n_in - j * n_out) % period;  // (n/n_out - j/n_in) * period, reduced
  if (step < 0) step += period;
  double acc = 0.0;
  int64_t phase = 0;  // k * step mod period, kept reduced by one subtraction per bin
  for (int64_t k = 0; k <= kmax; ++k) {
    double w = (k == 0 || (n_out % 2 == 0 && k == n_out / 2)) ? 1.0 : 2.0;
    if (common % 2 == 0 && k == common / 2 && n_in != n_out) w *= n_out < n_in ? 2.0 : 0.5;
    acc += w * (cos_of.empty()
                    ? std::cos(kTwoPi * static_cast<double>(phase) / static_cast<double>(period))
                    : cos_of[phase]);
    phase += step;
    if (phase >= period) phase -= period;
  }
  return acc / static_cast<double>(n_in);
}

Status resample_checked(int64_t n_in, int64_t n_out, float* out) {
  if (n_in <= 0 || n_out <= 0 || n_in > kMaxLength || n_out > kMaxLength) return Status::bad_size;
  if (!out) return Status::null_pointer;
  const std::vector<double> cos_of =
      n_in == n_out ? std::vector<double>() : cos_table(n_in * n_out);
  for (int64_t n = 0; n < n_out; ++n)
    for (int64_t j = 0; j < n_in; ++j)
      out[n * n_in + j] = static_cast<float>(n_in == n_out ? (n == j ? 1.0 : 0.0)
                                                           : entry(n, j, n_in, n_out, cos_of));
  return Status::ok;
}

}  // namespace

Status resample_matrix(int64_t n_in, int64_t n_out, float* out) noexcept {
  return detail::guarded([&] { return resample_checked(n_in, n_out, out); });
}

}  // namespace sdq
