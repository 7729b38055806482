#pragma once
// Shared conversions between Python objects and core types. Bindings only convert and forward.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "tensorvigil/dtype.h"
#include "tensorvigil/tensor_view.h"

namespace tensorvigil::py_bind {

namespace py = pybind11;

/// Maps a numpy dtype (including ml_dtypes' bfloat16/float8) to a DType.
/// Throws Error(kInvalidArgument) naming the dtype when unsupported.
DType dtype_from_numpy(const py::dtype& dt);
/// numpy dtype for a DType (bfloat16/float8 through ml_dtypes, imported lazily).
py::dtype numpy_dtype(DType dt);

/// View of a C-contiguous numpy array (or any buffer-protocol object numpy accepts).
/// `dtype_override` (a dtype name, "" for none) reinterprets same-sized elements, e.g. a
/// torch bfloat16 tensor passed as an int16 array. Requires the GIL; the returned view is
/// valid while `arr` lives.
/// Throws InvalidArgument for a non-contiguous array or an unsupported dtype.
TensorView view_from_array(const py::array& arr, const std::string& dtype_override = "");

}  // namespace tensorvigil::py_bind
