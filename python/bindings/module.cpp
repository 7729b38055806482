// tensorvigil._core: calls one init function per area; nothing else lives here.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace tensorvigil::py_bind {
void init_errors(py::module_& m);
void init_device(py::module_& m);
void init_stats(py::module_& m);
void init_store(py::module_& m);
void init_cuda(py::module_& m);
void init_fsck(py::module_& m);
}  // namespace tensorvigil::py_bind

PYBIND11_MODULE(_core, m) {
  m.doc() = "tensorvigil native core: fused statistics and the tensor store.";
  m.attr("__version__") = TV_VERSION;
  tensorvigil::py_bind::init_errors(m);
  tensorvigil::py_bind::init_device(m);
  tensorvigil::py_bind::init_stats(m);
  tensorvigil::py_bind::init_store(m);
  tensorvigil::py_bind::init_cuda(m);
  tensorvigil::py_bind::init_fsck(m);
}
