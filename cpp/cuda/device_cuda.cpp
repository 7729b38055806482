// CUDA device detection (TV_ENABLE_CUDA=ON).
#include <cuda_runtime_api.h>

#include "tensorvigil/device.h"

namespace tensorvigil {
bool cuda_available() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}
bool cuda_built() { return true; }
}  // namespace tensorvigil
