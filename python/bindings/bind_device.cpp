// Device queries: whether the optional CUDA backend was built and a device is visible.
#include <pybind11/pybind11.h>

#include "tensorvigil/device.h"

namespace py = pybind11;

namespace tensorvigil::py_bind {

void init_device(py::module_& m) {
  m.def("cuda_built", &cuda_built, "True when tensorvigil was built with TV_ENABLE_CUDA=ON.");
  m.def("cuda_available", &cuda_available,
        "True when the CUDA backend was built and a CUDA device is visible.");
}

}  // namespace tensorvigil::py_bind
