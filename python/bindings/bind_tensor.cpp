#include <pybind11/numpy.h>

#include "casters.h"
#include "tensorvigil/error.h"

namespace tensorvigil::py_bind {

DType dtype_from_numpy(const py::dtype& dt) {
  // Builtin numeric types by kind and size (cheap struct reads); others (ml_dtypes) by name.
  const char kind = dt.kind();
  const py::ssize_t size = dt.itemsize();
  if (kind == 'f') {
    if (size == 8) return DType::kFloat64;
    if (size == 4) return DType::kFloat32;
    if (size == 2) return DType::kFloat16;
  } else if (kind == 'i') {
    if (size == 1) return DType::kInt8;
    if (size == 2) return DType::kInt16;
    if (size == 4) return DType::kInt32;
    if (size == 8) return DType::kInt64;
  } else if (kind == 'u' && size == 1) {
    return DType::kUInt8;
  } else if (kind == 'b' && size == 1) {
    return DType::kBool;
  }
  std::string name = py::str(dt.attr("name"));
  if (kind == 'f' || kind == 'i' || kind == 'u' || kind == 'b' || kind == 'V') {
    if (name == "float64") return DType::kFloat64;
    if (name == "float32") return DType::kFloat32;
    if (name == "float16") return DType::kFloat16;
    if (name == "bfloat16") return DType::kBFloat16;
    if (name == "float8_e4m3fn") return DType::kFloat8E4M3;
    if (name == "float8_e5m2") return DType::kFloat8E5M2;
    if (name == "int8") return DType::kInt8;
    if (name == "int16") return DType::kInt16;
    if (name == "int32") return DType::kInt32;
    if (name == "int64") return DType::kInt64;
    if (name == "uint8") return DType::kUInt8;
    if (name == "bool") return DType::kBool;
  }
  throw_error(ErrorCode::kInvalidArgument,
              "[tensor] unsupported dtype '" + name +
                  "'; supported: float64, float32, float16, bfloat16, float8_e4m3fn, "
                  "float8_e5m2, int8, int16, int32, int64, uint8, bool");
}

py::dtype numpy_dtype(DType dt) {
  switch (dt) {
    case DType::kBFloat16: case DType::kFloat8E4M3: case DType::kFloat8E5M2: {
      py::module_ ml = py::module_::import("ml_dtypes");
      return py::dtype::from_args(ml.attr(dtype_name(dt)));
    }
    default:
      return py::dtype(std::string(dtype_name(dt)));
  }
}

TensorView view_from_array(const py::array& arr, const std::string& dtype_override) {
  if (!(arr.flags() & py::array::c_style))
    throw_error(ErrorCode::kInvalidArgument,
                "[tensor] array is not C-contiguous; pass numpy.ascontiguousarray(x)");
  TensorView v;
  v.dtype = dtype_override.empty() ? dtype_from_numpy(arr.dtype()) : dtype_from_name(dtype_override);
  if (dtype_size(v.dtype) != static_cast<std::size_t>(arr.itemsize()))
    throw_error(ErrorCode::kInvalidArgument,
                "[tensor] dtype override '" + dtype_override + "' has " +
                    std::to_string(dtype_size(v.dtype)) + "-byte elements but the array has " +
                    std::to_string(arr.itemsize()));
  v.data = arr.data();
  v.shape.assign(arr.shape(), arr.shape() + arr.ndim());
  return v;
}

}  // namespace tensorvigil::py_bind
