#pragma once
/// \file cuda_capture.h
/// Asynchronous capture of CUDA tensors into a StreamWriter: statistics on the device (one
/// fused launch per submit), raw payloads copied device-to-host into a bounded, reused pinned
/// staging ring on a side stream, and a native thread that hands both to the writer in
/// submission order. The training thread never synchronises the device.
///
/// Declared in every build; without TV_ENABLE_CUDA the constructor throws Error(kUnsupported).
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tensorvigil/store/format.h"
#include "tensorvigil/store/stream_writer.h"
#include "tensorvigil/tensor_view.h"

namespace tensorvigil {

/// One tensor of GpuCapture::submit().
struct GpuCaptureItem {
  std::string name;
  TensorView view;          ///< C-contiguous CUDA view (see compute_stats_cuda_async).
  bool stats_only = false;  ///< true: statistics only, nothing is copied to the host.
  int hist_bins = 0;        ///< Auto-range fixed-bin histogram (0: none).
};

/// Counters of a GpuCapture (a consistent snapshot).
struct GpuCaptureCounters {
  uint64_t submits = 0;         ///< submit() calls.
  uint64_t tensors = 0;         ///< Tensors handed to the writer.
  uint64_t copied_bytes = 0;    ///< Payload bytes copied device-to-host.
  uint64_t dropped = 0;         ///< Payloads dropped because staging was full (skip policy).
  uint64_t staging_bytes = 0;   ///< Pinned staging allocated (at most the bound, see ctor).
  uint64_t pending_bytes = 0;   ///< Staging bytes in use by copies not yet written.
  uint64_t peak_pending_bytes = 0;
};

class GpuCapture {
 public:
  /// Captures into `writer`, which must outlive this object (close() does not close it).
  /// `staging_bytes` bounds the pinned staging ring (allocated on the first payload); when
  /// it is full the writer's policy applies: block waits for space, skip drops the payload,
  /// keeps the statistics and counts the drop in the writer's `dropped` counter. A single
  /// payload larger than the ring waits for the ring to drain and uses a one-off pinned
  /// buffer (block) or is dropped (skip).
  /// Throws Error(kInvalidArgument) when staging_bytes is 0, Error(kUnsupported) without CUDA.
  GpuCapture(store::StreamWriter& writer, uint64_t staging_bytes);
  /// Waits for pending work and stops the thread; errors are swallowed (call close()).
  ~GpuCapture();
  GpuCapture(const GpuCapture&) = delete;
  GpuCapture& operator=(const GpuCapture&) = delete;

  /// One fused statistics launch for all items on `stream` (as compute_stats_cuda_async); for
  /// items that are not stats_only, an asynchronous device-to-host copy on a side stream that
  /// waits for `stream`'s work so far; `stream` then waits (on the GPU) for those copies, so
  /// later in-place updates cannot race them. Returns without synchronising the device; may
  /// block only for staging space (block policy). Rethrows the first error of the capture
  /// thread. Does not touch Python.
  void submit(int64_t step, store::Mode mode, int64_t mode_step,
              const std::vector<GpuCaptureItem>& items, bool exp_hist, uintptr_t stream);
  /// Commits `step` in the writer after every item submitted before this call. Non-blocking.
  void commit(int64_t step, store::Mode mode, int64_t mode_step);
  /// Waits until everything submitted so far has been handed to the writer, then flushes it.
  void flush();
  /// flush(), then stops the capture thread and frees the staging. Idempotent.
  void close();
  GpuCaptureCounters counters() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace tensorvigil
