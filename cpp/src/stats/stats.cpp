#include "tensorvigil/stats/stats.h"

#include <algorithm>
#include <string>

#include "tensorvigil/error.h"

namespace tensorvigil {

namespace {

// A record that saw no element carries no information, whatever its optional parts say.
bool is_identity(const TensorStats& s) {
  return s.numel == 0 && s.hist.empty() && s.exp_hist.empty();
}

// min/max are NaN when a side has no finite element: fmin/fmax treat NaN as missing.
double nan_min(double a, double b) { return std::fmin(a, b); }
double nan_max(double a, double b) { return std::fmax(a, b); }

}  // namespace

std::vector<double> TensorStats::hist_edges() const {
  std::vector<double> edges;
  if (hist.empty()) return edges;
  const std::size_t bins = hist.size();
  edges.resize(bins + 1);
  // numpy.linspace(lo, hi, bins + 1): i * step + lo, last edge exactly hi.
  const double delta = hist_hi - hist_lo;
  const double step = delta / static_cast<double>(bins);
  for (std::size_t i = 0; i < bins; ++i) {
    double y = static_cast<double>(i);
    y = step == 0.0 ? y / static_cast<double>(bins) * delta : y * step;
    edges[i] = y + hist_lo;
  }
  edges[bins] = hist_hi;
  return edges;
}

void TensorStats::merge(const TensorStats& other) {
  if (is_identity(other)) return;
  if (is_identity(*this)) {
    *this = other;
    return;
  }

  // Validate the optional parts before changing anything, so a failed merge leaves *this intact.
  const bool hist_a = !hist.empty(), hist_b = !other.hist.empty();
  if (hist_a && hist_b) {
    if (hist.size() != other.hist.size() || hist_lo != other.hist_lo || hist_hi != other.hist_hi)
      throw_error(ErrorCode::kInvalidArgument,
                  "[stats.merge] histograms differ: " + std::to_string(hist.size()) +
                      " bins over [" + std::to_string(hist_lo) + ", " + std::to_string(hist_hi) +
                      "] vs " + std::to_string(other.hist.size()) + " bins over [" +
                      std::to_string(other.hist_lo) + ", " + std::to_string(other.hist_hi) + "]");
  } else if (hist_a != hist_b) {
    const TensorStats& without = hist_a ? other : *this;
    if (without.numel != 0)
      throw_error(ErrorCode::kInvalidArgument,
                  "[stats.merge] one record has a histogram and the other does not");
  }
  const bool exp_a = !exp_hist.empty(), exp_b = !other.exp_hist.empty();
  if (exp_a && exp_b && exp_hist.size() != other.exp_hist.size())
    throw_error(ErrorCode::kInvalidArgument, "[stats.merge] exponent histograms differ in size");
  if (exp_a != exp_b) {
    const TensorStats& without = exp_a ? other : *this;
    if (without.numel != 0)
      throw_error(ErrorCode::kInvalidArgument,
                  "[stats.merge] one record has an exponent histogram and the other does not");
  }

  // Chan et al.: combine (n, mean, M2) of two disjoint sets.
  const uint64_t na = finite(), nb = other.finite();
  if (nb != 0) {
    if (na == 0) {
      mean = other.mean;
      m2 = other.m2;
    } else {
      const double n = static_cast<double>(na + nb);
      const double fa = static_cast<double>(na) / n, fb = static_cast<double>(nb) / n;
      const double delta = other.mean - mean;
      // The weighted form only when the difference of huge means overflows.
      mean = std::isfinite(delta) ? mean + delta * fb : fa * mean + fb * other.mean;
      const double t = delta * std::sqrt(static_cast<double>(na) * fb);  // overflows late
      m2 = m2 + other.m2 + t * t;
    }
  }
  numel += other.numel;
  nan += other.nan;
  posinf += other.posinf;
  neginf += other.neginf;
  zeros += other.zeros;
  min = nan_min(min, other.min);
  max = nan_max(max, other.max);
  abs_sum += other.abs_sum;
  abs_max = std::max(abs_max, other.abs_max);

  if (hist_b) {
    if (!hist_a) {
      hist = other.hist;
      hist_lo = other.hist_lo;
      hist_hi = other.hist_hi;
      hist_below = other.hist_below;
      hist_above = other.hist_above;
    } else {
      for (std::size_t i = 0; i < hist.size(); ++i) hist[i] += other.hist[i];
      hist_below += other.hist_below;
      hist_above += other.hist_above;
    }
  }
  if (exp_b) {
    if (!exp_a) {
      exp_hist = other.exp_hist;
    } else {
      for (std::size_t i = 0; i < exp_hist.size(); ++i) exp_hist[i] += other.exp_hist[i];
    }
  }
}

}  // namespace tensorvigil
