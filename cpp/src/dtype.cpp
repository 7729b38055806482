#include "tensorvigil/dtype.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "tensorvigil/error.h"

namespace tensorvigil {

namespace {
struct DTypeInfo {
  DType dt;
  const char* name;
  std::size_t size;
  const char* aliases[3];
};
constexpr DTypeInfo kInfo[] = {
    {DType::kFloat64, "float64", 8, {"f64", "double", "f8"}},
    {DType::kFloat32, "float32", 4, {"f32", "float", "f4"}},
    {DType::kFloat16, "float16", 2, {"f16", "half", "f2"}},
    {DType::kBFloat16, "bfloat16", 2, {"bf16", nullptr, nullptr}},
    {DType::kFloat8E4M3, "float8_e4m3fn", 1, {"fp8_e4m3", "float8_e4m3", "e4m3"}},
    {DType::kFloat8E5M2, "float8_e5m2", 1, {"fp8_e5m2", "e5m2", nullptr}},
    {DType::kInt8, "int8", 1, {"i1", "i8", nullptr}},
    {DType::kInt16, "int16", 2, {"i2", "i16", nullptr}},
    {DType::kInt32, "int32", 4, {"i4", "i32", nullptr}},
    {DType::kInt64, "int64", 8, {"i8_", "i64", nullptr}},
    {DType::kUInt8, "uint8", 1, {"u1", "u8", nullptr}},
    {DType::kBool, "bool", 1, {"b1", "bool_", nullptr}},
};

const DTypeInfo* find(DType dt) {
  for (const auto& i : kInfo)
    if (i.dt == dt) return &i;
  return nullptr;
}
}  // namespace

std::size_t dtype_size(DType dt) {
  const DTypeInfo* i = find(dt);
  if (!i) throw_error(ErrorCode::kInvalidArgument, "[dtype] invalid dtype code");
  return i->size;
}

const char* dtype_name(DType dt) {
  const DTypeInfo* i = find(dt);
  return i ? i->name : "invalid";
}

DType dtype_from_name(const std::string& name) {
  for (const auto& i : kInfo) {
    if (name == i.name) return i.dt;
    for (const char* a : i.aliases)
      if (a && name == a) return i.dt;
  }
  std::string known;
  for (const auto& i : kInfo) known += std::string(known.empty() ? "" : ", ") + i.name;
  throw_error(ErrorCode::kInvalidArgument,
              "[dtype] unknown dtype '" + name + "'; supported: " + known);
}

DType dtype_from_code(uint8_t code) {
  for (const auto& i : kInfo)
    if (static_cast<uint8_t>(i.dt) == code) return i.dt;
  throw_error(ErrorCode::kDataLoss, "[dtype] unknown on-disk dtype code " + std::to_string(code));
}

bool dtype_is_float(DType dt) {
  switch (dt) {
    case DType::kFloat64: case DType::kFloat32: case DType::kFloat16: case DType::kBFloat16:
    case DType::kFloat8E4M3: case DType::kFloat8E5M2:
      return true;
    default:
      return false;
  }
}

float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      float f = std::ldexp(static_cast<float>(man), -24);
      std::memcpy(&bits, &f, 4);
      bits |= sign;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

float fp8_e4m3_to_float(uint8_t v) {
  // float8_e4m3fn: bias 7, no infinities, S.1111.111 is NaN.
  int sign = v & 0x80 ? -1 : 1;
  int exp = (v >> 3) & 0xf;
  int man = v & 0x7;
  if (exp == 0xf && man == 0x7) return std::numeric_limits<float>::quiet_NaN();
  if (exp == 0) return sign * std::ldexp(static_cast<float>(man), -9);
  return sign * std::ldexp(1.0f + man / 8.0f, exp - 7);
}

float fp8_e5m2_to_float(uint8_t v) {
  return half_to_float(static_cast<uint16_t>(v) << 8);
}

}  // namespace tensorvigil
