#pragma once
/// \file tensor_view.h
/// Non-owning view of a contiguous tensor in host (or, with CUDA, device) memory.
#include <cstdint>
#include <vector>

#include "tensorvigil/dtype.h"

namespace tensorvigil {

enum class DeviceType : uint8_t { kCpu = 0, kCuda = 1 };

/// A C-contiguous tensor. The view does not own `data`; the caller keeps it alive for the
/// duration of any call that receives the view.
struct TensorView {
  const void* data = nullptr;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;  ///< Empty for a 0-d (scalar) tensor.
  DeviceType device = DeviceType::kCpu;
  int device_index = 0;

  /// Number of elements (1 for 0-d, 0 if any dimension is 0).
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  std::size_t nbytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype); }
};

}  // namespace tensorvigil
