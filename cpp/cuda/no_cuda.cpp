// Built when TV_ENABLE_CUDA is OFF: the CUDA paths report themselves as unavailable and throw
// Unsupported with the way to get them.
#include "tensorvigil/cuda_capture.h"
#include "tensorvigil/device.h"
#include "tensorvigil/error.h"
#include "tensorvigil/stats/reduce_cuda.h"

namespace tensorvigil {

namespace {
[[noreturn]] void no_cuda(const char* op) {
  throw_error(ErrorCode::kUnsupported,
              std::string("[") + op +
                  "] tensorvigil was built without CUDA; reinstall with TV_ENABLE_CUDA=ON "
                  "(pip install with the environment variable TV_ENABLE_CUDA=ON and nvcc on the "
                  "PATH) to compute statistics of CUDA tensors on the GPU");
}
}  // namespace

namespace internal {
struct CudaStatsJob {};
}  // namespace internal

bool cuda_available() { return false; }
bool cuda_built() { return false; }
bool cuda_stats_supports(DType) { return false; }

CudaPendingStats::CudaPendingStats() = default;
CudaPendingStats::CudaPendingStats(std::shared_ptr<internal::CudaStatsJob> job)
    : job_(std::move(job)) {}
CudaPendingStats::~CudaPendingStats() = default;
CudaPendingStats::CudaPendingStats(CudaPendingStats&&) noexcept = default;
CudaPendingStats& CudaPendingStats::operator=(CudaPendingStats&&) noexcept = default;
bool CudaPendingStats::ready() const { return true; }
const std::vector<TensorStats>& CudaPendingStats::result() { no_cuda("compute_stats_cuda"); }

CudaPendingStats compute_stats_cuda_async(const std::vector<CudaStatsRequest>&, bool, uintptr_t) {
  no_cuda("compute_stats_cuda");
}
std::vector<TensorStats> compute_stats_cuda(const std::vector<TensorView>&, const StatsOptions&,
                                            uintptr_t) {
  no_cuda("compute_stats_cuda");
}

struct GpuCapture::Impl {};
GpuCapture::GpuCapture(store::StreamWriter&, uint64_t) { no_cuda("gpu_capture"); }
GpuCapture::~GpuCapture() = default;
void GpuCapture::submit(int64_t, store::Mode, int64_t, const std::vector<GpuCaptureItem>&, bool,
                        uintptr_t) {
  no_cuda("gpu_capture.submit");
}
void GpuCapture::commit(int64_t, store::Mode, int64_t) { no_cuda("gpu_capture.commit"); }
void GpuCapture::flush() { no_cuda("gpu_capture.flush"); }
void GpuCapture::close() {}
GpuCaptureCounters GpuCapture::counters() const { return {}; }

}  // namespace tensorvigil
