#pragma once
/// \file stats/reduce_cuda.h
/// Fused statistics of many CUDA tensors in one kernel launch (two when a histogram is asked
/// for), on the caller's stream, without synchronising the device.
///
/// Declared in every build. Without TV_ENABLE_CUDA (cpp/cuda/no_cuda.cpp) every function throws
/// Error(kUnsupported) and cuda_available() is false.
///
/// Semantics match compute_stats() on the same values: counts and min/max/abs_max are exact;
/// moments accumulate in double (per-thread sums of deviations from a per-chunk shift, Chan
/// merges across chunks in a fixed order, so results are deterministic); histograms use the
/// same bin edges and edge rule (numpy.histogram), the exponent histogram the same buckets.
#include <cstdint>
#include <memory>
#include <vector>

#include "tensorvigil/stats/reduce.h"
#include "tensorvigil/stats/stats.h"
#include "tensorvigil/tensor_view.h"

namespace tensorvigil {

namespace internal {
struct CudaStatsJob;
}  // namespace internal

/// Dtypes the CUDA kernels accept: float64, float32, float16, bfloat16, float8_e4m3fn,
/// float8_e5m2.
bool cuda_stats_supports(DType dtype);

/// Per-tensor request of compute_stats_cuda_async(): a CUDA view and its histogram.
struct CudaStatsRequest {
  TensorView view;     ///< C-contiguous, device memory (view.device == kCuda).
  int hist_bins = 0;   ///< 0: none; else 1..kMaxHistBins.
  bool hist_auto_range = true;
  double hist_lo = 0.0, hist_hi = 0.0;  ///< Used when !hist_auto_range (lo < hi, finite).
};

/// Statistics being computed on a CUDA stream. Movable, not copyable. Destroying it without
/// calling result() is fine: the pooled buffers return to the pool once the work completes.
class CudaPendingStats {
 public:
  CudaPendingStats();
  explicit CudaPendingStats(std::shared_ptr<internal::CudaStatsJob> job);
  ~CudaPendingStats();
  CudaPendingStats(CudaPendingStats&&) noexcept;
  CudaPendingStats& operator=(CudaPendingStats&&) noexcept;

  /// True when the results have reached host memory (cudaEventQuery; never blocks).
  bool ready() const;
  /// Waits for this job's event only (never the whole device), then returns one record per
  /// request, in order. Idempotent: later calls return the same records. Does not touch
  /// Python; call it without the GIL. Throws Error(kIo) naming the CUDA error if the kernels
  /// failed.
  const std::vector<TensorStats>& result();

 private:
  std::shared_ptr<internal::CudaStatsJob> job_;
};

/// Enqueues the statistics of every request on `stream` (a cudaStream_t as an integer; 0 is
/// the legacy default stream, 1 and 2 the legacy and per-thread default streams of the CUDA
/// array interface) and returns at once: descriptors upload, one statistics launch, an
/// optional histogram launch and one copy of the final records into pinned host memory are
/// all ordered on `stream`, followed by an event. Every view must be on the same device, and
/// its memory must stay valid until the work on `stream` has run (stream order suffices for
/// allocators that are stream-ordered, such as PyTorch's). `exp_hist` fills the exponent
/// histogram of every tensor.
/// Throws Error(kInvalidArgument) for a host view, an unsupported dtype, mixed devices or a
/// bad histogram option; Error(kUnsupported) without CUDA.
CudaPendingStats compute_stats_cuda_async(const std::vector<CudaStatsRequest>& requests,
                                          bool exp_hist, uintptr_t stream);

/// Convenience: one options record for every view, then result(). Blocks the calling thread
/// until this job's event (never the device).
std::vector<TensorStats> compute_stats_cuda(const std::vector<TensorView>& views,
                                            const StatsOptions& options = {},
                                            uintptr_t stream = 0);

}  // namespace tensorvigil
