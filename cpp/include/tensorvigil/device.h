#pragma once
/// \file device.h
/// Optional CUDA backend: whether it was built and a device is present.
namespace tensorvigil {
/// True when the library was built with TV_ENABLE_CUDA and a CUDA device is visible.
bool cuda_available();
/// True when the library was built with TV_ENABLE_CUDA.
bool cuda_built();
}  // namespace tensorvigil
