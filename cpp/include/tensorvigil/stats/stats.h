#pragma once
/// \file stats/stats.h
/// The statistics record computed in one fused pass per tensor, stored in every record of the
/// store (docs/FORMAT.md §7.2) and merged exactly across chunks, threads and ranks.
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace tensorvigil {

/// Number of buckets of the exponent histogram: bucket k counts finite non-zero x with
/// floor(log2|x|) == k - kExpHistBias, clamped to [0, kExpHistBuckets).
inline constexpr int kExpHistBuckets = 256;
inline constexpr int kExpHistBias = 127;
/// Largest fixed-bin histogram accepted.
inline constexpr int kMaxHistBins = 4096;

/// Statistics of one tensor (or of several merged). Moments and min/max cover finite values
/// only; NaN and ±Inf are counted separately. All dtypes accumulate in double: float32, float16
/// and bfloat16 elements are widened exactly before any sum, so mean/var/l1/l2 match a float64
/// reference of the same values to ~1e-15 relative (the mean relative to |mean| + std);
/// min/max/abs_max and the counts are exact.
struct TensorStats {
  uint64_t numel = 0;   ///< All elements, including NaN/Inf.
  uint64_t nan = 0;
  uint64_t posinf = 0;
  uint64_t neginf = 0;
  uint64_t zeros = 0;   ///< Elements equal to 0 (either sign).
  double min = std::numeric_limits<double>::quiet_NaN();  ///< NaN when no finite element.
  double max = std::numeric_limits<double>::quiet_NaN();
  double mean = 0.0;    ///< Mean of finite elements (0 when none).
  double m2 = 0.0;      ///< Sum of squared deviations from the mean (finite elements).
  double abs_sum = 0.0; ///< Sum of |x| over finite elements (L1 norm).
  double abs_max = 0.0; ///< Max |x| over finite elements (0 when none).

  // Optional fixed-bin histogram over [hist_lo, hist_hi]; empty when not asked for.
  // Bins follow numpy.histogram: half-open except the last, which includes hist_hi.
  // Finite values outside the range are counted in hist_below / hist_above.
  std::vector<uint64_t> hist;
  double hist_lo = 0.0;
  double hist_hi = 0.0;
  uint64_t hist_below = 0;
  uint64_t hist_above = 0;

  // Optional exponent histogram (kExpHistBuckets entries) or empty.
  std::vector<uint64_t> exp_hist;

  /// Finite elements: numel - nan - posinf - neginf.
  uint64_t finite() const { return numel - nan - posinf - neginf; }
  /// Population variance (ddof = 0) of finite elements; NaN when there are none.
  double var() const {
    uint64_t n = finite();
    return n ? m2 / static_cast<double>(n) : std::numeric_limits<double>::quiet_NaN();
  }
  double std() const { return std::sqrt(var()); }
  double sum() const { return mean * static_cast<double>(finite()); }
  double l1() const { return abs_sum; }
  /// L2 norm of finite elements: sqrt(M2 + n * mean^2).
  double l2() const {
    double n = static_cast<double>(finite());
    return std::sqrt(m2 + n * mean * mean);
  }

  /// The hist.size() + 1 bin edges, computed like numpy.linspace(hist_lo, hist_hi, bins + 1)
  /// (bin i holds edges[i] <= x < edges[i + 1]; the last bin also holds hist_hi). Empty when
  /// there is no histogram.
  std::vector<double> hist_edges() const;

  /// Merges `other` into this record (Chan et al. parallel update). Histograms merge when
  /// both have the same bins and range; merging mismatched histograms throws InvalidArgument.
  void merge(const TensorStats& other);
};

}  // namespace tensorvigil
