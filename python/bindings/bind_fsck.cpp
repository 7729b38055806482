// Bindings of the shard checker used by `tensorvigil fsck` (python/tensorvigil/store/fsck.py).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "tensorvigil/store/fsck.h"
#include "tensorvigil/store/tensor_index.h"

namespace py = pybind11;

namespace tensorvigil::py_bind {

void init_fsck(py::module_& m) {
  m.def(
      "fsck_check_shard",
      [](const std::string& path, int64_t rank, int64_t seq, bool verify_values) {
        store::ShardCheck c;
        {
          py::gil_scoped_release nogil;
          c = store::check_shard(path, rank, seq, verify_values);
        }
        py::list problems;
        for (const auto& p : c.problems) problems.append(py::make_tuple(p.offset, p.message));
        py::dict d;
        d["path"] = c.path;
        d["file_size"] = c.file_size;
        d["has_header"] = c.has_header;
        d["header_ok"] = c.header_ok;
        d["index_state"] = c.index_state;
        d["scan_end"] = c.scan_end;
        d["scan_stop"] = c.scan_stop;
        d["index_offset"] = c.index_offset;
        d["frames"] = c.frames;
        d["tensors"] = c.tensors;
        d["commits"] = c.commits;
        d["ended"] = c.ended;
        d["commit_end"] = c.commit_end;
        d["commit_frames"] = c.commit_frames;
        d["uncommitted"] = c.uncommitted;
        d["after_commit"] = c.after_commit;
        d["values_checked"] = c.values_checked;
        d["committed_steps"] = c.committed_steps;
        d["problems"] = problems;
        return d;
      },
      py::arg("path"), py::arg("rank") = -1, py::arg("seq") = -1, py::arg("verify_values") = true,
      R"doc(Scans one shard file and verifies every checksum (docs/RELIABILITY.md).

Args:
    path: Shard file.
    rank: Rank its path names (-1: do not check the header against it).
    seq: Seq its path names (-1: do not check).
    verify_values: Also read and decode every tensor payload.

Returns:
    A dict: ``index_state`` ("sealed", "absent", "footer_damaged", "index_corrupt" or "none"),
    ``scan_end``, frame counts, ``commit_end`` (the offset a repair keeps up to),
    ``committed_steps`` and ``problems`` (a list of ``(offset, message)``).

Raises:
    StoreIOError: the file cannot be read.
)doc");
  m.def(
      "fsck_write_sealed_copy",
      [](const std::string& path, uint64_t upto, const std::string& out_path) {
        py::gil_scoped_release nogil;
        return store::write_sealed_copy(path, upto, out_path);
      },
      py::arg("path"), py::arg("upto"), py::arg("out_path"),
      R"doc(Writes ``out_path``: bytes ``[0, upto)`` of the shard, a rebuilt index and a footer.

The source is not modified; ``out_path`` must not exist and is fsynced.

Args:
    path: Shard file.
    upto: A frame boundary found by :func:`fsck_check_shard` (its ``commit_end``).
    out_path: New file.

Returns:
    The size of the new file.

Raises:
    InvalidArgumentError: ``upto`` is not a boundary of valid frames.
    StoreIOError: on OS errors (``out_path`` exists, disk full ...).
)doc");
  m.def(
      "fsck_check_tensor_index",
      [](const std::string& shard_path, uint32_t rank, uint32_t seq) {
        store::TensorIndexCheck c;
        {
          py::gil_scoped_release nogil;
          c = store::check_tensor_index(shard_path, rank, seq);
        }
        return py::make_tuple(c.state, c.message);
      },
      py::arg("shard_path"), py::arg("rank"), py::arg("seq"),
      R"doc(Compares a shard's tensor index (``shard-N.tvt``) with what its INDEX frame gives.

Returns:
    ``(state, message)``: state is "ok", "absent", "corrupt", "stale" or "orphan" (the shard
    is not sealed).

Raises:
    DataCorruptionError: the shard's own index is corrupt.
)doc");
  m.def(
      "fsck_rewrite_tensor_index",
      [](const std::string& shard_path, uint32_t rank, uint32_t seq) {
        py::gil_scoped_release nogil;
        return store::rewrite_tensor_index(shard_path, rank, seq);
      },
      py::arg("shard_path"), py::arg("rank"), py::arg("seq"),
      "Rewrites a sealed shard's tensor index from its INDEX frame (atomically), or removes it "
      "when the shard is not sealed. Returns True when a file was written.");
}

}  // namespace tensorvigil::py_bind
