// Bindings of the store: StreamWriter and RunReader. The GIL is released around every call that
// copies, compresses, reads or waits.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <shared_mutex>
#include <string>
#include <vector>

#include "casters.h"
#include "tensorvigil/error.h"
#include "tensorvigil/store/run_reader.h"
#include "tensorvigil/store/stream_writer.h"

namespace py = pybind11;

// Holds the reader's lock shared for the rest of the scope and names the reader `r`.
#define SHARED(h)                                          \
  std::shared_lock<std::shared_mutex> shared_lock_((h).mu); \
  const RunReader& r = *(h).reader

namespace tensorvigil::py_bind {

using store::Codec;
using store::Mode;
using store::RecordInfo;
// Most raw bytes one payload byte can decode to: a zstd RLE block (3-byte header + 1 byte)
// stands for at most 128 KiB, so no zstd chunk expands by more than 32768x.
constexpr uint64_t kMaxDecodeRatio = 32768;
using store::RunReader;
using store::StreamWriter;
using store::WriterOptions;

namespace {

Mode mode_from_int(int m) {
  if (m < 0 || m > 3)
    throw_error(ErrorCode::kInvalidArgument,
                "[store] mode must be 0 (train), 1 (eval), 2 (predict) or 3 (global), got " +
                    std::to_string(m));
  return static_cast<Mode>(m);
}

StatsOptions stats_options(int hist_bins, std::optional<std::pair<double, double>> hist_range,
                           bool exp_hist) {
  StatsOptions o;
  o.hist_bins = hist_bins;
  o.exp_hist = exp_hist;
  if (hist_range) {
    o.hist_auto_range = false;
    o.hist_lo = hist_range->first;
    o.hist_hi = hist_range->second;
  }
  return o;
}

void check_stats_numel(const TensorStats& s, int64_t numel, const char* what) {
  if (s.numel != static_cast<uint64_t>(numel))
    throw_error(ErrorCode::kInvalidArgument,
                std::string("[stream_writer.") + what + "] stats describe " +
                    std::to_string(s.numel) + " elements but the tensor has " +
                    std::to_string(numel));
}

/// The Python-facing reader: refresh() (GIL released, it does file I/O) takes the lock
/// exclusively; every other method holds it shared, so no method sees the tables move.
struct ReaderHandle {
  std::unique_ptr<RunReader> reader;
  mutable std::shared_mutex mu;
};

/// Lazy readers: loads the records of `name_ids` (all tensors when empty) of `ranks` (all
/// when empty) unless they are loaded, then runs `f(reader)` with the lock held shared. A
/// refresh between the load and the query can defer new shards again, so the check is
/// repeated under the shared lock.
template <typename F>
auto with_loaded(const ReaderHandle& h, const std::vector<uint32_t>& name_ids,
                 const std::vector<uint32_t>& ranks, F&& f) {
  for (;;) {
    {
      SHARED(h);
      if (r.loaded(name_ids, ranks)) return f(r);
    }
    py::gil_scoped_release nogil;
    std::unique_lock<std::shared_mutex> lk(h.mu);
    h.reader->load(name_ids, ranks);
  }
}

/// The record of (name, step, rank), its tensor loaded first; nothing when there is none.
std::optional<RecordInfo> find_loaded(const ReaderHandle& h, const std::string& name, int64_t step,
                                      uint32_t rank) {
  int64_t id;
  {
    SHARED(h);
    id = r.name_id(name);
  }
  if (id < 0) return std::nullopt;
  return with_loaded(h, {static_cast<uint32_t>(id)}, {rank}, [&](const RunReader& r) {
    return r.find(static_cast<uint32_t>(id), step, rank);
  });
}

template <typename T>
py::array_t<T> column(std::size_t n) {
  return py::array_t<T>(static_cast<py::ssize_t>(n));
}

store::Selection selection(std::vector<uint32_t> name_ids, std::vector<uint32_t> ranks,
                           std::optional<int64_t> step_min, std::optional<int64_t> step_max,
                           int mode) {
  store::Selection sel;
  sel.name_ids = std::move(name_ids);
  sel.ranks = std::move(ranks);
  if (step_min) sel.step_min = *step_min;
  if (step_max) sel.step_max = *step_max;
  sel.mode = mode;
  return sel;
}

/// One numpy column: get(i) for every row i of idx.
template <typename T, typename F>
py::array_t<T> fill(const std::size_t* idx, std::size_t n, F get) {
  auto out = column<T>(n);
  T* p = out.mutable_data();
  for (std::size_t i = 0; i < n; ++i) p[i] = get(idx[i]);
  return out;
}

/// The statistics columns of rows `idx` (every column when `wanted` is empty). Requires the
/// reader's lock held shared.
py::dict row_columns(const RunReader& r, const std::size_t* idx, std::size_t n,
                     const std::vector<std::string>& wanted) {
  static const char* const kNames[] = {"name_id", "rank",   "step",  "mode", "mode_step",
                                       "has_value", "numel", "nan",   "posinf", "neginf",
                                       "zeros",   "min",    "max",   "mean", "var",
                                       "std",     "l1",     "l2",    "abs_max", "wall_time"};
  const store::RecordRow* rows = r.rows().data();
  const store::StatsTable& t = r.stats_table();
  const uint64_t *numel = t.numel.data(), *nan = t.nan.data(), *pinf = t.posinf.data(),
                 *ninf = t.neginf.data();
  const double *m2 = t.m2.data(), *mean = t.mean.data();
  auto finite = [=](std::size_t i) {
    return static_cast<double>(numel[i] - nan[i] - pinf[i] - ninf[i]);
  };
  // As TensorStats::var() (NaN without finite elements), std() and l2().
  auto var = [=](std::size_t i) {
    const double f = finite(i);
    return f > 0 ? m2[i] / f : std::numeric_limits<double>::quiet_NaN();
  };
  auto u64 = [&](const std::vector<uint64_t>& c) {
    const uint64_t* p = c.data();
    return fill<uint64_t>(idx, n, [p](std::size_t i) { return p[i]; });
  };
  auto f64 = [&](const std::vector<double>& c) {
    const double* p = c.data();
    return fill<double>(idx, n, [p](std::size_t i) { return p[i]; });
  };
  py::dict d;
  for (const char* name : kNames) {
    const std::string k = name;
    if (!wanted.empty() && std::find(wanted.begin(), wanted.end(), k) == wanted.end()) continue;
    py::object col;
    if (k == "name_id")
      col = fill<int32_t>(idx, n, [rows](std::size_t i) { return static_cast<int32_t>(rows[i].name_id); });
    else if (k == "rank")
      col = fill<uint32_t>(idx, n, [rows](std::size_t i) { return rows[i].rank; });
    else if (k == "step")
      col = fill<int64_t>(idx, n, [rows](std::size_t i) { return rows[i].step; });
    else if (k == "mode")
      col = fill<uint8_t>(idx, n, [rows](std::size_t i) { return static_cast<uint8_t>(rows[i].mode); });
    else if (k == "mode_step")
      col = fill<int64_t>(idx, n, [rows](std::size_t i) { return rows[i].mode_step; });
    else if (k == "has_value")
      col = fill<bool>(idx, n, [rows](std::size_t i) { return rows[i].has_value(); });
    else if (k == "numel") col = u64(t.numel);
    else if (k == "nan") col = u64(t.nan);
    else if (k == "posinf") col = u64(t.posinf);
    else if (k == "neginf") col = u64(t.neginf);
    else if (k == "zeros") col = u64(t.zeros);
    else if (k == "min") col = f64(t.min);
    else if (k == "max") col = f64(t.max);
    else if (k == "mean") col = f64(t.mean);
    else if (k == "var") col = fill<double>(idx, n, var);
    else if (k == "std")
      col = fill<double>(idx, n, [&](std::size_t i) { return std::sqrt(var(i)); });
    else if (k == "l1") col = f64(t.abs_sum);
    else if (k == "l2")
      col = fill<double>(idx, n, [&](std::size_t i) {
        return std::sqrt(m2[i] + finite(i) * mean[i] * mean[i]);
      });
    else if (k == "abs_max") col = f64(t.abs_max);
    else col = fill<double>(idx, n, [rows](std::size_t i) { return rows[i].wall_time; });
    d[name] = col;
  }
  for (const std::string& k : wanted)
    if (std::find_if(std::begin(kNames), std::end(kNames), [&](const char* x) { return k == x; }) ==
        std::end(kNames))
      throw_error(ErrorCode::kInvalidArgument, "[run_reader.row_columns] unknown column '" + k + "'");
  return d;
}

}  // namespace

void init_store(py::module_& m) {
  py::class_<StreamWriter>(m, "StreamWriter", R"doc(
Append-only writer of one rank's stream of shard files.

Statistics, compression and file I/O run on the writer's threads; ``write`` only copies the
array (with the GIL released) and returns.

Args:
    run_dir: Run directory (created if missing).
    rank: Rank whose stream this writer owns; one live writer per rank (file lock).
    codec: Default codec for floating-point tensors: "shuffle-zstd" (default), "zstd" or "raw".
    level: zstd level (negative is faster, larger).
    chunk_size: Raw bytes per independently compressed chunk.
    max_pending_bytes: Bound on memory held by writes not yet on disk.
    policy: "block" (wait for space, lose nothing) or "skip" (drop the payload, keep statistics).
    roll_bytes: Start a new shard after a step commit once the shard is this large.
    roll_seconds: ... or once it is this old.
    threads: Encoder threads.
    fsync: fsync shards when sealed and on close.
    tensor_index: Write a tensor index beside each sealed shard (FORMAT.md §3.8), so that a
        reader opens the run from its commits and names and reads one tensor's records alone.
)doc")
      .def(py::init([](const std::string& run_dir, uint32_t rank, const std::string& codec,
                       int level, uint32_t chunk_size, uint64_t max_pending_bytes,
                       const std::string& policy, uint64_t roll_bytes, double roll_seconds,
                       int threads, bool fsync, bool tensor_index) {
             WriterOptions o;
             o.codec = store::codec_from_name(codec);
             o.level = level;
             o.chunk_size = chunk_size;
             o.max_pending_bytes = max_pending_bytes;
             if (policy == "block")
               o.policy = store::PendingPolicy::kBlock;
             else if (policy == "skip")
               o.policy = store::PendingPolicy::kSkip;
             else
               throw_error(ErrorCode::kInvalidArgument,
                           "[stream_writer] policy must be 'block' or 'skip', got '" + policy + "'");
             o.roll_bytes = roll_bytes;
             o.roll_seconds = roll_seconds;
             o.threads = threads;
             o.fsync = fsync;
             o.tensor_index = tensor_index;
             py::gil_scoped_release nogil;
             return std::make_unique<StreamWriter>(run_dir, rank, o);
           }),
           py::arg("run_dir"), py::arg("rank") = 0, py::arg("codec") = "shuffle-zstd",
           py::arg("level") = 1, py::arg("chunk_size") = store::kDefaultChunkSize,
           py::arg("max_pending_bytes") = 512ull << 20, py::arg("policy") = "block",
           py::arg("roll_bytes") = 256ull << 20, py::arg("roll_seconds") = 30.0,
           py::arg("threads") = 2, py::arg("fsync") = true, py::arg("tensor_index") = true)
      .def(
          "write",
          [](StreamWriter& w, const std::string& name, int64_t step, const py::array& arr,
             int mode, std::optional<int64_t> mode_step, bool stats_only, int hist_bins,
             std::optional<std::pair<double, double>> hist_range, bool exp_hist,
             std::optional<std::string> codec, const std::string& dtype,
             std::optional<TensorStats> stats) {
            TensorView v = view_from_array(arr, dtype);
            if (stats) check_stats_numel(*stats, v.numel(), "write");
            StatsOptions so = stats_options(hist_bins, hist_range, exp_hist);
            std::optional<Codec> c;
            if (codec) c = store::codec_from_name(*codec);
            Mode md = mode_from_int(mode);
            py::gil_scoped_release nogil;
            w.write_tensor(name, step, md, mode_step.value_or(step), v, stats_only, so, c,
                           stats ? &*stats : nullptr);
          },
          py::arg("name"), py::arg("step"), py::arg("array"), py::arg("mode") = 0,
          py::arg("mode_step") = py::none(), py::arg("stats_only") = false,
          py::arg("hist_bins") = 0, py::arg("hist_range") = py::none(),
          py::arg("exp_hist") = false, py::arg("codec") = py::none(), py::arg("dtype") = "",
          py::arg("stats") = py::none(),
          R"doc(Enqueues one C-contiguous array as tensor ``name`` of ``step``.

The array is copied before the call returns (unless ``stats_only``), so the caller may reuse
it. ``dtype`` reinterprets same-sized elements (e.g. "bfloat16" for an int16 view).
``stats`` (a Stats of ``array.size`` elements, e.g. from ``Stats.from_parts``) is stored
instead of statistics computed here; ``hist_bins``, ``hist_range`` and ``exp_hist`` are then
ignored.)doc")
      .def(
          "write_stats",
          [](StreamWriter& w, const std::string& name, int64_t step,
             const std::vector<int64_t>& shape, const std::string& dtype,
             const TensorStats& stats, int mode, std::optional<int64_t> mode_step) {
            TensorView v;  // no data: a statistics-only record with given stats reads none
            v.dtype = dtype_from_name(dtype);
            v.shape = shape;
            int64_t numel = 1;
            for (int64_t d : shape) {
              if (d < 0)
                throw_error(ErrorCode::kInvalidArgument,
                            "[stream_writer.write_stats] negative dimension " + std::to_string(d));
              if (d != 0 && numel > std::numeric_limits<int64_t>::max() / d)
                throw_error(ErrorCode::kInvalidArgument,
                            "[stream_writer.write_stats] the shape has too many elements");
              numel *= d;
            }
            check_stats_numel(stats, numel, "write_stats");
            Mode md = mode_from_int(mode);
            py::gil_scoped_release nogil;
            w.write_tensor(name, step, md, mode_step.value_or(step), v, /*stats_only=*/true, {},
                           std::nullopt, &stats);
          },
          py::arg("name"), py::arg("step"), py::arg("shape"), py::arg("dtype"), py::arg("stats"),
          py::arg("mode") = 0, py::arg("mode_step") = py::none(),
          R"doc(Enqueues a statistics-only record of tensor ``name`` of ``step`` from its shape,
dtype name and statistics computed elsewhere; no values are needed.

Raises InvalidArgumentError when ``stats.numel`` is not the number of elements of ``shape``.)doc")
      .def(
          "commit",
          [](StreamWriter& w, int64_t step, int mode, std::optional<int64_t> mode_step) {
            Mode md = mode_from_int(mode);
            py::gil_scoped_release nogil;
            w.commit_step(step, md, mode_step.value_or(step));
          },
          py::arg("step"), py::arg("mode") = 0, py::arg("mode_step") = py::none(),
          "Marks ``step`` complete; readers see its tensors once this is on disk.")
      .def("flush", &StreamWriter::flush, py::arg("sync") = false,
           py::call_guard<py::gil_scoped_release>(),
           "Waits until everything submitted is written (and fsynced when ``sync``).")
      .def("close", &StreamWriter::close, py::call_guard<py::gil_scoped_release>(),
           "Flushes, seals the last shard, releases the lock. Idempotent.")
      .def_property_readonly("closed", &StreamWriter::closed)
      .def_property_readonly("path", &StreamWriter::path)
      .def("counters", [](const StreamWriter& w) {
        store::WriterCounters c = w.counters();
        py::dict d;
        d["tensors"] = c.tensors;
        d["commits"] = c.commits;
        d["dropped"] = c.dropped;
        d["raw_bytes"] = c.raw_bytes;
        d["stored_bytes"] = c.stored_bytes;
        d["file_bytes"] = c.file_bytes;
        d["shards"] = c.shards;
        d["pending_bytes"] = c.pending_bytes;
        d["peak_pending_bytes"] = c.peak_pending_bytes;
        d["pool_bytes"] = c.pool_bytes;
        return d;
      }, "Counters: tensors, commits, dropped, raw/stored/file bytes, shards, pending bytes.");

  py::class_<RecordInfo>(m, "Record", "Metadata and statistics of one stored tensor.")
      .def_readonly("rank", &RecordInfo::rank)
      .def_readonly("step", &RecordInfo::step)
      .def_readonly("mode_step", &RecordInfo::mode_step)
      .def_property_readonly("mode", [](const RecordInfo& r) { return static_cast<int>(r.mode); })
      .def_property_readonly("dtype", [](const RecordInfo& r) { return dtype_name(r.dtype); })
      .def_property_readonly("codec", [](const RecordInfo& r) { return store::codec_name(r.codec); })
      .def_property_readonly("shape", [](const RecordInfo& r) { return py::tuple(py::cast(r.shape)); })
      .def_readonly("nbytes", &RecordInfo::raw_nbytes)
      .def_readonly("stored_nbytes", &RecordInfo::payload_len)
      .def_readonly("wall_time", &RecordInfo::wall_time)
      .def_property_readonly("has_value", &RecordInfo::has_value)
      .def_property_readonly("dropped", [](const RecordInfo& r) { return (r.flags & store::kFlagDropped) != 0; })
      .def_readonly("stats", &RecordInfo::stats);

  py::class_<ReaderHandle>(m, "RunReader", R"doc(
Reader of a run directory (all ranks). Sees committed steps only; ``refresh`` picks up what
writers appended since. ``strict=False`` lists corruption in ``problems`` instead of raising.)doc")
      .def(py::init([](const std::string& run_dir, bool strict, bool lazy) {
             auto h = std::make_unique<ReaderHandle>();
             py::gil_scoped_release nogil;
             h->reader = std::make_unique<RunReader>(run_dir, strict, lazy);
             return h;
           }),
           py::arg("run_dir"), py::arg("strict") = true, py::arg("lazy") = true,
           "``lazy``: sealed shards with a tensor index are opened from its directory (commits "
           "and names) and a tensor's records are read when a query first asks for it.")
      .def(
          "refresh",
          [](ReaderHandle& h) {
            py::gil_scoped_release nogil;
            std::unique_lock<std::shared_mutex> lk(h.mu);
            return h.reader->refresh();
          },
          "Reads what was appended; returns the number of newly committed steps.")
      .def("ranks", [](const ReaderHandle& h) { SHARED(h); return r.ranks(); })
      .def("names", [](const ReaderHandle& h) { SHARED(h); return r.names(); })
      .def("name_id", [](const ReaderHandle& h, const std::string& n) { SHARED(h); return r.name_id(n); })
      .def("ended", [](const ReaderHandle& h, uint32_t rank) { SHARED(h); return r.ended(rank); })
      .def("writer_alive", [](const ReaderHandle& h, uint32_t rank) { SHARED(h); return r.writer_alive(rank); })
      .def_property_readonly("problems", [](const ReaderHandle& h) { SHARED(h); return r.problems(); })
      .def("num_records",
           [](const ReaderHandle& h) {
             return with_loaded(h, {}, {}, [](const RunReader& r) { return r.num_records(); });
           })
      .def("num_deferred_records", [](const ReaderHandle& h) { SHARED(h); return r.num_deferred_records(); },
           "Records of shards opened lazily that no query has loaded yet.")
      .def(
          "record",
          [](const ReaderHandle& h, const std::string& name, int64_t step, uint32_t rank) -> py::object {
            std::optional<RecordInfo> copy = find_loaded(h, name, step, rank);
            if (!copy) return py::none();
            if (copy->hists_elided) {
              py::gil_scoped_release nogil;
              h.reader->load_histograms(*copy);
            }
            return py::cast(*copy);
          },
          py::arg("name"), py::arg("step"), py::arg("rank") = 0,
          "The Record of (name, step, rank), or None.")
      .def(
          "read",
          [](const ReaderHandle& h, const std::string& name, int64_t step, uint32_t rank, int threads) {
            // Look up and copy under the lock, then read without it (and without the GIL):
            // refresh() may run meanwhile; read_value() is safe against it.
            std::optional<RecordInfo> copy = find_loaded(h, name, step, rank);
            if (!copy)
              throw_error(ErrorCode::kNotFound, "[run_reader.read] no tensor '" + name +
                                                    "' at step " + std::to_string(step) +
                                                    " of rank " + std::to_string(rank));
            const RunReader& r = *h.reader;
            if (!copy->has_value()) r.read_value(*copy, nullptr, threads);  // NotFound, with why
            // A forged index may declare any size: bound the allocation by what the payload
            // can decode to before allocating (FORMAT.md §8, "value size").
            const uint64_t decodable =
                copy->codec == store::Codec::kRaw ? copy->payload_len
                                                  : copy->payload_len * kMaxDecodeRatio;
            if (copy->raw_nbytes > decodable)
              throw_error(ErrorCode::kDataLoss,
                          "[run_reader.read] tensor '" + name + "' at step " +
                              std::to_string(step) + " declares " +
                              std::to_string(copy->raw_nbytes) + " bytes, more than its " +
                              std::to_string(copy->payload_len) +
                              "-byte payload can hold: the index is corrupt");
            std::vector<py::ssize_t> shape(copy->shape.begin(), copy->shape.end());
            py::array out(numpy_dtype(copy->dtype), shape);
            void* dst = out.mutable_data();
            {
              py::gil_scoped_release nogil;
              r.read_value(*copy, dst, threads);
            }
            return out;
          },
          py::arg("name"), py::arg("step"), py::arg("rank") = 0, py::arg("threads") = 2,
          "Decodes the values of (name, step, rank) into a new numpy array.")
      .def(
          "value_location",
          [](const ReaderHandle& h, const std::string& name, int64_t step, uint32_t rank) -> py::object {
            std::optional<RecordInfo> rec = find_loaded(h, name, step, rank);
            if (!rec) return py::none();
            SHARED(h);
            return py::make_tuple(r.shard_path(rec->shard), rec->frame_offset,
                                  rec->payload_offset + rec->payload_len);
          },
          py::arg("name"), py::arg("step"), py::arg("rank") = 0,
          "(shard path, frame offset, end offset) of the frame holding (name, step, rank), or "
          "None. Reading the value reads exactly these bytes.")
      .def(
          "commits",
          [](const ReaderHandle& h, std::size_t start) {
            SHARED(h);
            const auto& cs = r.commits();
            const std::size_t first = std::min(start, cs.size());
            const std::size_t n = cs.size() - first;
            auto rank = column<uint32_t>(n);
            auto step = column<int64_t>(n);
            auto mode_step = column<int64_t>(n);
            auto mode = column<uint8_t>(n);
            auto wall = column<double>(n);
            auto ntens = column<uint32_t>(n);
            uint32_t* pr = rank.mutable_data();
            int64_t* ps = step.mutable_data();
            int64_t* pms = mode_step.mutable_data();
            uint8_t* pm = mode.mutable_data();
            double* pw = wall.mutable_data();
            uint32_t* pn = ntens.mutable_data();
            for (std::size_t i = 0; i < n; ++i) {
              const store::StepInfo& c = cs[first + i];
              pr[i] = c.rank;
              ps[i] = c.step;
              pms[i] = c.mode_step;
              pm[i] = static_cast<uint8_t>(c.mode);
              pw[i] = c.wall_time;
              pn[i] = c.num_tensors;
            }
            py::dict d;
            d["rank"] = rank;
            d["step"] = step;
            d["mode_step"] = mode_step;
            d["mode"] = mode;
            d["wall_time"] = wall;
            d["num_tensors"] = ntens;
            return d;
          },
          py::arg("start") = 0,
          "Committed steps as columns: rank, step, mode_step, mode, wall_time, num_tensors "
          "(commits from number ``start`` on, in the order the reader saw them).")
      .def(
          "stats_columns",
          [](const ReaderHandle& h, std::vector<uint32_t> name_ids, std::vector<uint32_t> ranks,
             std::optional<int64_t> step_min, std::optional<int64_t> step_max, int mode) {
            store::Selection sel = selection(std::move(name_ids), std::move(ranks), step_min,
                                             step_max, mode);
            return with_loaded(h, sel.name_ids, sel.ranks, [&](const RunReader& r) {
              std::vector<std::size_t> idx = r.select(sel);
              return row_columns(r, idx.data(), idx.size(), {});
            });
          },
          py::arg("name_ids") = std::vector<uint32_t>{}, py::arg("ranks") = std::vector<uint32_t>{},
          py::arg("step_min") = py::none(), py::arg("step_max") = py::none(), py::arg("mode") = -1,
          "Statistics of the selected records as numpy columns (one row per record).")
      .def(
          "select_rows",
          [](const ReaderHandle& h, std::vector<uint32_t> name_ids, std::vector<uint32_t> ranks,
             std::optional<int64_t> step_min, std::optional<int64_t> step_max, int mode) {
            store::Selection sel = selection(std::move(name_ids), std::move(ranks), step_min,
                                             step_max, mode);
            std::vector<std::size_t> idx =
                with_loaded(h, sel.name_ids, sel.ranks, [&](const RunReader& r) { return r.select(sel); });
            auto out = column<uint64_t>(idx.size());
            std::copy(idx.begin(), idx.end(), out.mutable_data());
            return out;
          },
          py::arg("name_ids") = std::vector<uint32_t>{}, py::arg("ranks") = std::vector<uint32_t>{},
          py::arg("step_min") = py::none(), py::arg("step_max") = py::none(), py::arg("mode") = -1,
          R"doc(Row numbers (in the reader's record table) of the selected records, in table order.

They stay valid across ``refresh`` (rows are only appended, or replaced by a rewrite of the same
tensor, step and rank); ``row_columns`` reads their columns.)doc")
      .def(
          "row_columns",
          [](const ReaderHandle& h, py::array_t<uint64_t, py::array::c_style | py::array::forcecast> rows,
             std::vector<std::string> columns) {
            SHARED(h);
            const uint64_t* p = rows.data();
            const std::size_t n = static_cast<std::size_t>(rows.size());
            const std::size_t total = r.num_records();  // loaded rows (select_rows loaded them)
            for (std::size_t i = 0; i < n; ++i)
              if (p[i] >= total)
                throw_error(ErrorCode::kInvalidArgument,
                            "[run_reader.row_columns] row " + std::to_string(p[i]) +
                                " is out of range (" + std::to_string(total) + " records)");
            static_assert(sizeof(uint64_t) == sizeof(std::size_t));
            return row_columns(r, reinterpret_cast<const std::size_t*>(p), n, columns);
          },
          py::arg("rows"), py::arg("columns") = std::vector<std::string>{},
          "Columns (all when ``columns`` is empty) of the given rows, as ``stats_columns``.");
}

}  // namespace tensorvigil::py_bind
