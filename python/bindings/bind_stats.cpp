// Statistics bindings: the Stats record and the fused reductions. Converts and forwards only;
// the GIL is released while the core computes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "casters.h"
#include "tensorvigil/error.h"
#include "tensorvigil/stats/reduce.h"
#include "tensorvigil/stats/stats.h"

namespace tensorvigil::py_bind {

namespace {

py::object u64_array(const std::vector<uint64_t>& v) {
  if (v.empty()) return py::none();
  py::array_t<uint64_t> a(static_cast<py::ssize_t>(v.size()));
  std::copy(v.begin(), v.end(), a.mutable_data());
  return py::object(std::move(a));
}

py::object edges_array(const TensorStats& s) {
  if (s.hist.empty()) return py::none();
  std::vector<double> e = s.hist_edges();
  py::array_t<double> a(static_cast<py::ssize_t>(e.size()));
  std::copy(e.begin(), e.end(), a.mutable_data());
  return py::object(std::move(a));
}

StatsOptions make_options(int hist_bins, const py::object& hist_range, bool exp_hist,
                          int num_threads) {
  StatsOptions o;
  o.hist_bins = hist_bins;
  o.exp_hist = exp_hist;
  o.num_threads = num_threads;
  if (!hist_range.is_none()) {
    auto seq = hist_range.cast<py::sequence>();
    if (py::len(seq) != 2)
      throw_error(ErrorCode::kInvalidArgument,
                  "[compute_stats] hist_range must be a (lo, hi) pair");
    o.hist_auto_range = false;
    o.hist_lo = seq[0].cast<double>();
    o.hist_hi = seq[1].cast<double>();
    if (hist_bins > 0 &&
        !(o.hist_lo < o.hist_hi && std::isfinite(o.hist_lo) && std::isfinite(o.hist_hi)))
      throw_error(ErrorCode::kInvalidArgument,
                  "[compute_stats] hist_range must be finite with lo < hi, got (" +
                      std::to_string(o.hist_lo) + ", " + std::to_string(o.hist_hi) + ")");
  }
  if (num_threads < 0)
    throw_error(ErrorCode::kInvalidArgument, "[compute_stats] num_threads must be >= 0");
  return o;
}

// Accepts only numpy arrays (tensorvigil.stats converts everything else); keeps `arr` alive
// in `keep` so the view stays valid after the GIL is released.
TensorView to_view(const py::handle& obj, const std::string& dtype, std::vector<py::array>& keep) {
  if (!py::isinstance<py::array>(obj))
    throw_error(ErrorCode::kInvalidArgument,
                std::string("[compute_stats] expected a numpy array, got ") +
                    std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
  py::array arr = py::reinterpret_borrow<py::array>(obj);
  TensorView v = view_from_array(arr, dtype);
  keep.push_back(arr);
  return v;
}

std::string repr(const TensorStats& s) {
  char buf[512];
  std::snprintf(buf, sizeof(buf),
                "Stats(numel=%llu, nan=%llu, posinf=%llu, neginf=%llu, zeros=%llu, min=%.6g, "
                "max=%.6g, mean=%.6g, std=%.6g, l1=%.6g, l2=%.6g, abs_max=%.6g",
                static_cast<unsigned long long>(s.numel), static_cast<unsigned long long>(s.nan),
                static_cast<unsigned long long>(s.posinf),
                static_cast<unsigned long long>(s.neginf), static_cast<unsigned long long>(s.zeros),
                s.min, s.max, s.mean, s.std(), s.l1(), s.l2(), s.abs_max);
  std::string r = buf;
  if (!s.hist.empty()) {
    std::snprintf(buf, sizeof(buf), ", hist=%zu bins over [%.6g, %.6g]", s.hist.size(), s.hist_lo,
                  s.hist_hi);
    r += buf;
  }
  if (!s.exp_hist.empty()) r += ", exp_hist=yes";
  return r + ")";
}

uint64_t count_arg(int64_t v, const char* what) {
  if (v < 0)
    throw_error(ErrorCode::kInvalidArgument,
                std::string("[Stats.from_parts] ") + what + " must be >= 0, got " +
                    std::to_string(v));
  return static_cast<uint64_t>(v);
}

std::vector<uint64_t> counts_arg(const py::object& obj, const char* what) {
  std::vector<uint64_t> out;
  if (obj.is_none()) return out;
  auto a = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(obj);
  if (!a || a.ndim() != 1)
    throw_error(ErrorCode::kInvalidArgument,
                std::string("[Stats.from_parts] ") + what + " must be a 1-d sequence of counts");
  out.reserve(static_cast<std::size_t>(a.size()));
  for (py::ssize_t i = 0; i < a.size(); ++i) out.push_back(count_arg(a.at(i), what));
  return out;
}

uint64_t total(const std::vector<uint64_t>& v) {
  uint64_t t = 0;
  for (uint64_t c : v) t += c;
  return t;
}

// A record from parts computed elsewhere (e.g. on an accelerator), checked for consistency so
// the store never holds statistics that could not describe any tensor.
TensorStats stats_from_parts(int64_t numel, int64_t nan, int64_t posinf, int64_t neginf,
                             int64_t zeros, double min, double max, double mean, double m2,
                             double abs_sum, double abs_max, const py::object& hist,
                             const py::object& hist_lo, const py::object& hist_hi,
                             int64_t hist_below, int64_t hist_above, const py::object& exp_hist) {
  auto fail = [](const std::string& msg) {
    throw_error(ErrorCode::kInvalidArgument, "[Stats.from_parts] " + msg);
  };
  TensorStats s;
  s.numel = count_arg(numel, "numel");
  s.nan = count_arg(nan, "nan");
  s.posinf = count_arg(posinf, "posinf");
  s.neginf = count_arg(neginf, "neginf");
  s.zeros = count_arg(zeros, "zeros");
  if (s.nan > s.numel || s.posinf > s.numel - s.nan || s.neginf > s.numel - s.nan - s.posinf)
    fail("nan + posinf + neginf (" + std::to_string(s.nan) + " + " + std::to_string(s.posinf) +
         " + " + std::to_string(s.neginf) + ") exceeds numel " + std::to_string(s.numel));
  const uint64_t fin = s.finite();
  if (s.zeros > fin)
    fail("zeros (" + std::to_string(s.zeros) + ") exceeds the finite elements (" +
         std::to_string(fin) + ")");
  if (fin > 0) {
    if (!std::isfinite(min) || !std::isfinite(max) || !(min <= max))
      fail("min and max must be finite with min <= max when there are finite elements, got " +
           std::to_string(min) + ", " + std::to_string(max));
    if (!std::isfinite(mean)) fail("mean must be finite when there are finite elements");
    if (!std::isfinite(m2) || m2 < 0) fail("m2 must be finite and >= 0");
    if (!std::isfinite(abs_sum) || abs_sum < 0) fail("abs_sum must be finite and >= 0");
    if (!std::isfinite(abs_max) || abs_max < 0) fail("abs_max must be finite and >= 0");
  } else {
    if (!std::isnan(min) || !std::isnan(max))
      fail("min and max must be NaN when there is no finite element");
    if (mean != 0 || m2 != 0 || abs_sum != 0 || abs_max != 0)
      fail("mean, m2, abs_sum and abs_max must be 0 when there is no finite element");
  }
  s.min = min;
  s.max = max;
  s.mean = mean;
  s.m2 = m2;
  s.abs_sum = abs_sum;
  s.abs_max = abs_max;
  s.hist = counts_arg(hist, "hist");
  s.hist_below = count_arg(hist_below, "hist_below");
  s.hist_above = count_arg(hist_above, "hist_above");
  if (!s.hist.empty()) {
    if (s.hist.size() > static_cast<std::size_t>(kMaxHistBins))
      fail("hist has " + std::to_string(s.hist.size()) + " bins; at most " +
           std::to_string(kMaxHistBins));
    if (hist_lo.is_none() || hist_hi.is_none()) fail("hist needs hist_lo and hist_hi");
    s.hist_lo = hist_lo.cast<double>();
    s.hist_hi = hist_hi.cast<double>();
    if (!(std::isfinite(s.hist_lo) && std::isfinite(s.hist_hi) && s.hist_lo < s.hist_hi))
      fail("the histogram range must be finite with hist_lo < hist_hi, got [" +
           std::to_string(s.hist_lo) + ", " + std::to_string(s.hist_hi) + "]");
    if (total(s.hist) + s.hist_below + s.hist_above != fin)
      fail("hist counts + hist_below + hist_above (" +
           std::to_string(total(s.hist) + s.hist_below + s.hist_above) +
           ") must equal the finite elements (" + std::to_string(fin) + ")");
  } else if (!hist.is_none()) {
    fail("hist must have at least one bin (pass None for no histogram)");
  } else if (!hist_lo.is_none() || !hist_hi.is_none() || s.hist_below || s.hist_above) {
    fail("hist_lo, hist_hi, hist_below and hist_above need a hist");
  }
  s.exp_hist = counts_arg(exp_hist, "exp_hist");
  if (!exp_hist.is_none()) {
    if (s.exp_hist.size() != static_cast<std::size_t>(kExpHistBuckets))
      fail("exp_hist must have " + std::to_string(kExpHistBuckets) + " entries, got " +
           std::to_string(s.exp_hist.size()));
    if (total(s.exp_hist) != fin - s.zeros)
      fail("exp_hist counts (" + std::to_string(total(s.exp_hist)) +
           ") must equal the finite non-zero elements (" + std::to_string(fin - s.zeros) + ")");
  }
  return s;
}

}  // namespace

void init_stats(py::module_& m) {
  py::class_<TensorStats>(m, "Stats", R"doc(
Statistics of one tensor (or of several merged), from one fused pass.

Moments, ``min`` and ``max`` cover finite elements only; NaN and +/-Inf are counted
separately. Everything is accumulated in double precision. Records merge exactly with
:meth:`merge` (Chan's parallel update), across chunks, steps or ranks.
)doc")
      .def(py::init<>(), "An empty record (identity for :meth:`merge`).")
      .def_readonly("numel", &TensorStats::numel, "Number of elements, NaN/Inf included.")
      .def_readonly("nan", &TensorStats::nan, "Number of NaN elements.")
      .def_readonly("posinf", &TensorStats::posinf, "Number of +Inf elements.")
      .def_readonly("neginf", &TensorStats::neginf, "Number of -Inf elements.")
      .def_readonly("zeros", &TensorStats::zeros, "Number of elements equal to zero (either sign).")
      .def_readonly("min", &TensorStats::min, "Smallest finite element (NaN when there is none).")
      .def_readonly("max", &TensorStats::max, "Largest finite element (NaN when there is none).")
      .def_readonly("mean", &TensorStats::mean, "Mean of the finite elements (0 when none).")
      .def_readonly("m2", &TensorStats::m2,
                    "Sum of squared deviations from the mean (finite elements).")
      .def_property_readonly("var", &TensorStats::var,
                             "Population variance (ddof=0) of the finite elements; NaN when none.")
      .def_property_readonly("std", &TensorStats::std, "Population standard deviation.")
      .def_property_readonly("sum", &TensorStats::sum, "Sum of the finite elements.")
      .def_property_readonly("l1", &TensorStats::l1, "L1 norm (sum of |x|) of finite elements.")
      .def_property_readonly("l2", &TensorStats::l2, "L2 norm of the finite elements.")
      .def_readonly("abs_max", &TensorStats::abs_max, "Largest |x| over finite elements.")
      .def_property_readonly("finite", &TensorStats::finite, "Number of finite elements.")
      .def_property_readonly(
          "hist", [](const TensorStats& s) { return u64_array(s.hist); },
          "Fixed-bin histogram counts (numpy uint64, ``bins`` entries) or None.")
      .def_property_readonly("hist_edges", &edges_array,
                             "The ``bins + 1`` bin edges (numpy float64, as numpy.histogram) or "
                             "None.")
      .def_readonly("hist_below", &TensorStats::hist_below,
                    "Finite elements below the histogram range.")
      .def_readonly("hist_above", &TensorStats::hist_above,
                    "Finite elements above the histogram range.")
      .def_property_readonly(
          "exp_hist", [](const TensorStats& s) { return u64_array(s.exp_hist); },
          "Exponent histogram (numpy uint64, 256 entries) or None: entry k counts finite "
          "non-zero x with floor(log2|x|) == k - 127, clamped to [0, 255].")
      .def(
          "merge",
          [](const TensorStats& self, const TensorStats& other) {
            TensorStats out = self;
            out.merge(other);
            return out;
          },
          py::arg("other"), R"doc(
Returns the statistics of the union of both records' elements.

Args:
    other: Statistics of a disjoint set of elements.

Returns:
    A new Stats; neither input changes.

Raises:
    InvalidArgumentError: When both have histograms with different bins or ranges.

Example:
    >>> a = tv.compute_stats(x[:100]); b = tv.compute_stats(x[100:])
    >>> a.merge(b).mean  # == tv.compute_stats(x).mean
)doc")
      .def(
          "to_dict",
          [](const TensorStats& s) {
            py::dict d;
            d["numel"] = s.numel;
            d["nan"] = s.nan;
            d["posinf"] = s.posinf;
            d["neginf"] = s.neginf;
            d["zeros"] = s.zeros;
            d["min"] = s.min;
            d["max"] = s.max;
            d["mean"] = s.mean;
            d["var"] = s.var();
            d["std"] = s.std();
            d["sum"] = s.sum();
            d["l1"] = s.l1();
            d["l2"] = s.l2();
            d["abs_max"] = s.abs_max;
            d["finite"] = s.finite();
            if (!s.hist.empty()) {
              d["hist"] = s.hist;
              d["hist_edges"] = s.hist_edges();
              d["hist_below"] = s.hist_below;
              d["hist_above"] = s.hist_above;
            }
            if (!s.exp_hist.empty()) d["exp_hist"] = s.exp_hist;
            return d;
          },
          R"doc(
Returns the statistics as a plain dict of Python numbers (and lists for histograms).

Returns:
    dict with numel, nan, posinf, neginf, zeros, min, max, mean, var, std, sum, l1, l2,
    abs_max, finite, and hist/hist_edges/hist_below/hist_above/exp_hist when present.
)doc")
      .def_static("from_parts", &stats_from_parts, py::arg("numel"), py::arg("nan"),
                  py::arg("posinf"), py::arg("neginf"), py::arg("zeros"), py::arg("min"),
                  py::arg("max"), py::arg("mean"), py::arg("m2"), py::arg("abs_sum"),
                  py::arg("abs_max"), py::arg("hist") = py::none(),
                  py::arg("hist_lo") = py::none(), py::arg("hist_hi") = py::none(),
                  py::arg("hist_below") = 0, py::arg("hist_above") = 0,
                  py::arg("exp_hist") = py::none(), R"doc(
A record from statistics computed elsewhere (e.g. on an accelerator), checked for consistency.

Pass it to ``StoreWriter.write(..., stats=...)`` to store it instead of statistics computed
from the values. The fields mean what the attributes of the same names mean.

Args:
    numel, nan, posinf, neginf, zeros: Element counts (>= 0; nan + posinf + neginf <= numel,
        zeros <= the finite elements).
    min, max, mean, m2, abs_sum, abs_max: Over the finite elements; with none, min and max
        must be NaN and the others 0.
    hist: Fixed-bin histogram counts (1 to 4096 bins) or None.
    hist_lo, hist_hi: The histogram's range (finite, lo < hi); required with ``hist``.
    hist_below, hist_above: Finite elements outside the range; the histogram counts plus
        these must equal the finite elements.
    exp_hist: Exponent histogram (256 counts summing to the finite non-zero elements) or None.

Returns:
    Stats.

Raises:
    InvalidArgumentError: A negative or inconsistent count, a non-finite moment with finite
        elements, or a histogram without a valid range.

Example:
    >>> s = tv.Stats.from_parts(4, 0, 0, 0, 1, -1.0, 2.0, 0.5, 5.0, 4.0, 2.0)
)doc")
      .def("__repr__", &repr);

  m.def(
      "compute_stats",
      [](const py::handle& arr, int hist_bins, const py::object& hist_range, bool exp_hist,
         const py::object& dtype, int num_threads) {
        StatsOptions o = make_options(hist_bins, hist_range, exp_hist, num_threads);
        std::vector<py::array> keep;
        TensorView v = to_view(arr, dtype.is_none() ? "" : dtype.cast<std::string>(), keep);
        py::gil_scoped_release release;
        return compute_stats(v, o);
      },
      py::arg("arr"), py::arg("hist_bins") = 0, py::arg("hist_range") = py::none(),
      py::arg("exp_hist") = false, py::arg("dtype") = py::none(), py::arg("num_threads") = 0,
      R"doc(
Statistics of a C-contiguous numpy array in one fused pass (GIL released).

Args:
    arr: C-contiguous numpy array of a supported dtype.
    hist_bins: Fixed-bin histogram size (0: none, at most 4096).
    hist_range: (lo, hi) of the histogram; None: [min, max] of the finite values.
    exp_hist: Also fill the exponent (log2) histogram.
    dtype: Reinterpret the elements as this dtype name (same item size), e.g. "bfloat16"
        for a torch bfloat16 tensor viewed as int16.
    num_threads: 0: the library default (get_num_threads()), 1: the calling thread only.

Returns:
    Stats.

Raises:
    InvalidArgumentError: Unsupported dtype, non-contiguous array, bad histogram options.
)doc");

  m.def(
      "compute_stats_many",
      [](const py::sequence& arrs, int hist_bins, const py::object& hist_range, bool exp_hist,
         const py::object& dtypes, int num_threads) {
        StatsOptions o = make_options(hist_bins, hist_range, exp_hist, num_threads);
        const std::size_t n = py::len(arrs);
        std::vector<std::string> names(n);
        if (!dtypes.is_none()) {
          auto seq = dtypes.cast<py::sequence>();
          if (py::len(seq) != n)
            throw_error(ErrorCode::kInvalidArgument,
                        "[compute_stats_many] dtypes must have one entry per array");
          for (std::size_t i = 0; i < n; ++i)
            names[i] = seq[i].is_none() ? "" : seq[i].cast<std::string>();
        }
        std::vector<py::array> keep;
        std::vector<TensorView> views;
        views.reserve(n);
        for (std::size_t i = 0; i < n; ++i) views.push_back(to_view(arrs[i], names[i], keep));
        py::gil_scoped_release release;
        return compute_stats_many(views, o);
      },
      py::arg("arrs"), py::arg("hist_bins") = 0, py::arg("hist_range") = py::none(),
      py::arg("exp_hist") = false, py::arg("dtypes") = py::none(), py::arg("num_threads") = 0,
      R"doc(
Statistics of many numpy arrays; threads work across and within arrays (GIL released).

Args:
    arrs: Sequence of C-contiguous numpy arrays.
    hist_bins: Fixed-bin histogram size for every array (0: none).
    hist_range: (lo, hi) shared by every array; None: each array's own [min, max].
    exp_hist: Also fill the exponent histograms.
    dtypes: None, or one dtype override (or None) per array.
    num_threads: 0: the library default, 1: the calling thread only.

Returns:
    list[Stats] in the order of ``arrs``.
)doc");

  m.def("get_num_threads", &get_num_threads,
        "Default number of threads of the reductions (initially min(hardware threads, 8)).");
  m.def("set_num_threads", &set_num_threads, py::arg("n"),
        R"doc(
Sets the default number of threads of the reductions.

Args:
    n: Threads to use (the caller included); 0 restores the default.
)doc");
}

}  // namespace tensorvigil::py_bind
