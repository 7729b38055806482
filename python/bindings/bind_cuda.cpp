// CUDA bindings: fused statistics of device tensors and the asynchronous GPU capture. Present in
// every build; without CUDA the core throws Unsupported (UnsupportedError in Python). Tensors
// arrive as (data pointer, dtype name, shape, device index) tuples: tensorvigil.cuda converts
// torch tensors, __cuda_array_interface__ and DLPack objects, so no framework is linked here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "tensorvigil/cuda_capture.h"
#include "tensorvigil/error.h"
#include "tensorvigil/stats/reduce_cuda.h"
#include "tensorvigil/store/stream_writer.h"

namespace py = pybind11;

namespace tensorvigil::py_bind {

namespace {

using TensorSpec = std::tuple<uintptr_t, std::string, std::vector<int64_t>, int>;
using ItemSpec =
    std::tuple<std::string, uintptr_t, std::string, std::vector<int64_t>, int, bool, int>;

TensorView cuda_view(uintptr_t ptr, const std::string& dtype, const std::vector<int64_t>& shape,
                     int device) {
  TensorView v;
  v.data = reinterpret_cast<const void*>(ptr);
  v.dtype = dtype_from_name(dtype);
  v.shape = shape;
  v.device = DeviceType::kCuda;
  v.device_index = device;
  return v;
}

store::Mode cuda_mode(int m) {
  if (m < 0 || m > 3)
    throw_error(ErrorCode::kInvalidArgument,
                "[gpu_capture] mode must be 0 (train), 1 (eval), 2 (predict) or 3 (global), got " +
                    std::to_string(m));
  return static_cast<store::Mode>(m);
}

}  // namespace

void init_cuda(py::module_& m) {
  py::class_<CudaPendingStats>(m, "CudaPendingStats", R"doc(
Statistics being computed on a CUDA stream (returned by ``cuda_compute_stats``).

``ready()`` polls the job's event; ``result()`` waits on that event only (never the whole
device) with the GIL released and returns one Stats per tensor.)doc")
      .def("ready", &CudaPendingStats::ready, "True when the results reached host memory.")
      .def(
          "result",
          [](CudaPendingStats& p) {
            std::vector<TensorStats> out;
            {
              py::gil_scoped_release nogil;
              out = p.result();
            }
            return out;
          },
          "Waits for this job and returns a list of Stats, in input order.");

  m.def(
      "cuda_compute_stats",
      [](const std::vector<TensorSpec>& tensors, int hist_bins,
         std::optional<std::pair<double, double>> hist_range, bool exp_hist, uintptr_t stream) {
        std::vector<CudaStatsRequest> req(tensors.size());
        for (std::size_t i = 0; i < tensors.size(); ++i) {
          const auto& [ptr, dtype, shape, device] = tensors[i];
          req[i].view = cuda_view(ptr, dtype, shape, device);
          req[i].hist_bins = hist_bins;
          if (hist_range) {
            req[i].hist_auto_range = false;
            req[i].hist_lo = hist_range->first;
            req[i].hist_hi = hist_range->second;
          }
        }
        py::gil_scoped_release nogil;
        return compute_stats_cuda_async(req, exp_hist, stream);
      },
      py::arg("tensors"), py::arg("hist_bins") = 0, py::arg("hist_range") = py::none(),
      py::arg("exp_hist") = false, py::arg("stream") = 0, R"doc(
Enqueues the statistics of CUDA tensors on ``stream`` (one fused launch) and returns at once.

Args:
    tensors: ``(data_ptr, dtype, shape, device)`` tuples of C-contiguous device tensors, all on
        one device (dtype: float64, float32, float16, bfloat16, float8_e4m3fn, float8_e5m2).
    hist_bins: Fixed-bin histogram size (0: none).
    hist_range: ``(lo, hi)``, or None for each tensor's finite ``[min, max]``.
    exp_hist: Also fill the exponent histograms.
    stream: ``cudaStream_t`` as an int (0 default, 1 legacy, 2 per-thread default).

Returns:
    CudaPendingStats.)doc");

  py::class_<GpuCapture>(m, "GpuCapture", R"doc(
Asynchronous capture of CUDA tensors into a StreamWriter (see tensorvigil.cuda.GpuCapture).

Args:
    writer: The StreamWriter to write into; kept alive by this object, never closed by it.
    staging_bytes: Bound on the pinned host staging ring for raw payloads.)doc")
      .def(py::init<store::StreamWriter&, uint64_t>(), py::arg("writer"),
           py::arg("staging_bytes") = 256ull << 20, py::keep_alive<1, 2>())
      .def(
          "submit",
          [](GpuCapture& c, int64_t step, int mode, int64_t mode_step,
             const std::vector<ItemSpec>& items, bool exp_hist, uintptr_t stream) {
            std::vector<GpuCaptureItem> v(items.size());
            for (std::size_t i = 0; i < items.size(); ++i) {
              const auto& [name, ptr, dtype, shape, device, stats_only, bins] = items[i];
              v[i].name = name;
              v[i].view = cuda_view(ptr, dtype, shape, device);
              v[i].stats_only = stats_only;
              v[i].hist_bins = bins;
            }
            store::Mode md = cuda_mode(mode);
            py::gil_scoped_release nogil;
            c.submit(step, md, mode_step, v, exp_hist, stream);
          },
          py::arg("step"), py::arg("mode"), py::arg("mode_step"), py::arg("items"),
          py::arg("exp_hist") = false, py::arg("stream") = 0,
          "One fused statistics launch for ``items`` ``(name, data_ptr, dtype, shape, device, "
          "stats_only, hist_bins)`` and asynchronous copies of their payloads; never "
          "synchronises the device.")
      .def(
          "commit",
          [](GpuCapture& c, int64_t step, int mode, int64_t mode_step) {
            store::Mode md = cuda_mode(mode);
            py::gil_scoped_release nogil;
            c.commit(step, md, mode_step);
          },
          py::arg("step"), py::arg("mode"), py::arg("mode_step"),
          "Commits ``step`` after every item submitted before; non-blocking.")
      .def("flush", &GpuCapture::flush, py::call_guard<py::gil_scoped_release>(),
           "Waits until everything submitted is handed to the writer, then flushes it.")
      .def("close", &GpuCapture::close, py::call_guard<py::gil_scoped_release>(),
           "Flushes and stops the capture thread; does not close the writer. Idempotent.")
      .def(
          "counters",
          [](const GpuCapture& c) {
            GpuCaptureCounters k = c.counters();
            py::dict d;
            d["submits"] = k.submits;
            d["tensors"] = k.tensors;
            d["copied_bytes"] = k.copied_bytes;
            d["dropped"] = k.dropped;
            d["staging_bytes"] = k.staging_bytes;
            d["pending_bytes"] = k.pending_bytes;
            d["peak_pending_bytes"] = k.peak_pending_bytes;
            return d;
          },
          "Counters: submits, tensors, copied_bytes, dropped, staging/pending/peak bytes.");
}

}  // namespace tensorvigil::py_bind
