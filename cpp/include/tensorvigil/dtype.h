#pragma once
/// \file dtype.h
/// Element types. The numeric values are the on-disk codes of docs/FORMAT.md §7 and must never
/// change.
#include <cstddef>
#include <cstdint>
#include <string>

namespace tensorvigil {

enum class DType : uint8_t {
  kFloat64 = 1,
  kFloat32 = 2,
  kFloat16 = 3,
  kBFloat16 = 4,
  kFloat8E4M3 = 5,  ///< float8_e4m3fn (no infinities, NaN = S.1111.111).
  kFloat8E5M2 = 6,
  kInt8 = 7,
  kInt16 = 8,
  kInt32 = 9,
  kInt64 = 10,
  kUInt8 = 11,
  kBool = 12,
};

/// Bytes per element.
std::size_t dtype_size(DType dt);
/// Canonical name: "float64", "float32", "float16", "bfloat16", "float8_e4m3fn",
/// "float8_e5m2", "int8", "int16", "int32", "int64", "uint8", "bool".
const char* dtype_name(DType dt);
/// Inverse of dtype_name; also accepts short aliases (f32, bf16, ...).
/// Throws Error(kInvalidArgument) naming the unknown dtype.
DType dtype_from_name(const std::string& name);
/// Validates an on-disk code; throws Error(kDataLoss) when unknown.
DType dtype_from_code(uint8_t code);
bool dtype_is_float(DType dt);

/// Converts one IEEE half to float.
float half_to_float(uint16_t h);
/// Converts one bfloat16 to float.
inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
float fp8_e4m3_to_float(uint8_t v);
float fp8_e5m2_to_float(uint8_t v);

}  // namespace tensorvigil
