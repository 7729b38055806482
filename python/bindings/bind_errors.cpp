// The one place where core errors become Python exceptions. The Python classes live in
// tensorvigil/errors.py (each inherits TensorVigilError and a builtin); this file raises them.
#include <pybind11/pybind11.h>

#include "tensorvigil/error.h"

namespace py = pybind11;

namespace tensorvigil::py_bind {

void init_errors(py::module_& m) {
  py::enum_<ErrorCode>(m, "ErrorCode", "Categories of core errors (see docs/FORMAT.md).")
      .value("InvalidArgument", ErrorCode::kInvalidArgument)
      .value("NotFound", ErrorCode::kNotFound)
      .value("DataLoss", ErrorCode::kDataLoss)
      .value("Io", ErrorCode::kIo)
      .value("Unsupported", ErrorCode::kUnsupported)
      .value("FailedPrecondition", ErrorCode::kFailedPrecondition);

  m.def(
      "_raise_error",
      [](int code, const std::string& message) {
        throw Error(static_cast<ErrorCode>(code), message);
      },
      py::arg("code"), py::arg("message"),
      "Raises the Python exception of a core error code (tests the translator).");

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const Error& e) {
      py::module_ errors = py::module_::import("tensorvigil.errors");
      py::object cls = errors.attr("_class_for_code")(static_cast<int>(e.code()));
      PyErr_SetString(cls.ptr(), e.what());
    }
  });
}

}  // namespace tensorvigil::py_bind
