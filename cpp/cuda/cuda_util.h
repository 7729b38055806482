#pragma once
// Host helpers of the CUDA backend (not installed): error checks and a device guard.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "tensorvigil/error.h"

namespace tensorvigil::internal {

/// Throws Error(kIo) "[op] cudaXxx failed: <CUDA's message>" unless `e` is cudaSuccess.
inline void cuda_check(cudaError_t e, const char* op, const char* what) {
  if (e != cudaSuccess)
    throw Error(ErrorCode::kIo, std::string("[") + op + "] " + what + " failed: " +
                                    cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

/// Makes `device` current for the scope and restores the previous device.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device, const char* op) {
    cuda_check(cudaGetDevice(&prev_), op, "cudaGetDevice");
    if (prev_ != device) cuda_check(cudaSetDevice(device), op, "cudaSetDevice");
  }
  ~DeviceGuard() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

/// cudaStream_t of the CUDA array interface's integer: 1 legacy default, 2 per-thread default,
/// anything else the handle itself (0: the default stream).
inline cudaStream_t stream_from_int(uintptr_t s) {
  if (s == 1) return cudaStreamLegacy;
  if (s == 2) return cudaStreamPerThread;
  return reinterpret_cast<cudaStream_t>(s);
}

}  // namespace tensorvigil::internal
