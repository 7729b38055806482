#pragma once
/// \file store/run_reader.h
/// Reader of a run directory: every rank's stream of shards (docs/FORMAT.md §3-6, §9).
///
/// Only committed steps are visible. The reader may be refreshed while writers append: it reads
/// sealed shards through their footer index (two small reads) and scans unsealed ones frame by
/// frame from where it stopped. An incomplete frame at the end of a shard (a torn tail left by a
/// crash, or a frame still being written) ends the scan without error; a complete frame with a
/// bad checksum is corruption.
#include <climits>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "tensorvigil/store/format.h"
#include "tensorvigil/store/tensor_index.h"

namespace tensorvigil::store {

/// One committed tensor record, materialized from the reader's compact record table (a copy:
/// it stays valid across RunReader::refresh()).
struct RecordInfo {
  uint32_t name_id = 0;
  uint32_t rank = 0;
  int64_t step = 0;
  int64_t mode_step = 0;
  Mode mode = Mode::kTrain;
  DType dtype = DType::kFloat32;
  Codec codec = Codec::kRaw;
  uint16_t flags = 0;
  std::vector<int64_t> shape;
  uint64_t raw_nbytes = 0;
  double wall_time = 0.0;
  uint32_t shard = 0;           ///< Index into the reader's shard table.
  uint64_t frame_offset = 0;    ///< File offset of the frame header.
  uint32_t meta_crc = 0;        ///< Checksum of the frame's meta (checked again on read).
  uint64_t payload_offset = 0;  ///< File offset of the payload container.
  uint64_t payload_len = 0;
  uint32_t payload_crc = 0;
  /// Statistics. Histograms are not kept in memory for every record (a 256-bucket exponent
  /// histogram is 2 KiB decoded): when `hists_elided`, `stats.hist`/`stats.exp_hist` (and the
  /// hist_lo/hist_hi/hist_below/hist_above fields) are empty and RunReader::load_histograms()
  /// reads them back from the shard.
  TensorStats stats;
  bool hists_elided = false;
  /// True when the record carries the tensor's values (not stats-only, not dropped).
  bool has_value() const { return (flags & (kFlagStatsOnly | kFlagDropped)) == 0; }
};

/// One entry of the reader's record table: fixed size and free of heap members, so a run of
/// millions of records is one contiguous array (88 bytes a record; the statistics are columns of
/// a StatsTable beside it). Shapes are interned (RunReader::shape()); histograms stay on disk
/// (RunReader::load_histograms()).
struct RecordRow {
  int64_t step = 0;
  int64_t mode_step = 0;
  double wall_time = 0.0;
  uint64_t raw_nbytes = 0;
  uint64_t frame_offset = 0;  ///< File offset of the frame header.
  uint64_t payload_len = 0;
  uint32_t name_id = 0;
  uint32_t rank = 0;
  uint32_t shard = 0;     ///< Index into the reader's shard table.
  uint32_t shape_id = 0;  ///< Index into the reader's shape table.
  uint32_t meta_len = 0;  ///< The payload starts at frame_offset + kFrameHeaderSize + meta_len.
  uint32_t meta_crc = 0;
  uint32_t payload_crc = 0;
  uint16_t flags = 0;
  Mode mode = Mode::kTrain;
  DType dtype = DType::kFloat32;
  Codec codec = Codec::kRaw;
  bool hists = false;  ///< The record has histograms (left on disk).

  bool has_value() const { return (flags & (kFlagStatsOnly | kFlagDropped)) == 0; }
};

/// The scalar statistics of every record of the table, one column per field (index = row), so
/// reading one statistic of a range of records reads only that column.
struct StatsTable {
  std::vector<uint64_t> numel, nan, posinf, neginf, zeros;
  std::vector<double> min, max, mean, m2, abs_sum, abs_max;

  std::size_t size() const { return numel.size(); }
  void reserve(std::size_t n);
  void push_back(const ScalarStats& s);
  void set(std::size_t i, const ScalarStats& s);
  ScalarStats get(std::size_t i) const;
};

/// One committed step of one rank.
struct StepInfo {
  uint32_t rank = 0;
  int64_t step = 0;
  int64_t mode_step = 0;
  Mode mode = Mode::kTrain;
  double wall_time = 0.0;
  uint32_t num_tensors = 0;
};

/// Filter for RunReader::select. Empty vectors select everything.
struct Selection {
  std::vector<uint32_t> name_ids;
  std::vector<uint32_t> ranks;
  int64_t step_min = INT64_MIN;
  int64_t step_max = INT64_MAX;  ///< Inclusive.
  int mode = -1;                 ///< -1: any mode, else a Mode value.
};

/// Thread safety: read_value() and load_histograms() may run concurrently with anything,
/// including refresh(); the other accessors (records(), row(), commits(), names(), find(),
/// select()) must not overlap a refresh() (the Python binding holds a shared lock for them).
class RunReader {
 public:
  /// Opens `run_dir` (a directory holding rank-NNNNN/ stream directories) and reads what is
  /// committed. `strict`: corruption raises DataLoss; otherwise the scan of that shard stops
  /// there and the problem is listed in problems().
  /// `lazy`: sealed shards with a tensor index (FORMAT.md §3.8) contribute their commits and
  /// tensor names at once, and their records only when load() asks for them; every record
  /// accessor (rows(), find(), select(), ...) sees loaded records only. A damaged or stale
  /// tensor index is listed in problems() and the shard is read through its own index.
  /// Throws NotFound when `run_dir` does not exist.
  explicit RunReader(const std::string& run_dir, bool strict = true, bool lazy = false);
  ~RunReader();
  RunReader(const RunReader&) = delete;
  RunReader& operator=(const RunReader&) = delete;

  /// Reads what was appended since the last call. Returns the number of newly committed steps.
  std::size_t refresh();

  /// Lazy mode: true when every record of these tensors (all tensors when empty) of these
  /// ranks (all when empty) is loaded.
  bool loaded(const std::vector<uint32_t>& name_ids, const std::vector<uint32_t>& ranks = {}) const;
  /// Lazy mode: loads the records of these tensors (all when empty) of these ranks (all when
  /// empty) from the deferred shards. Must not overlap other calls but
  /// read_value()/load_histograms() (like refresh()).
  void load(const std::vector<uint32_t>& name_ids, const std::vector<uint32_t>& ranks = {});
  /// Records of deferred shards not loaded yet (0 unless lazy).
  std::size_t num_deferred_records() const;

  std::vector<uint32_t> ranks() const;
  const std::vector<std::string>& names() const;
  /// Id of a tensor name, or -1.
  int64_t name_id(const std::string& name) const;
  /// Number of committed tensor records.
  std::size_t num_records() const;
  /// Entry `i` of the record table (commit order per rank, ranks interleaved by refresh).
  const RecordRow& row(std::size_t i) const;
  /// The whole record table (row(i) without the bounds check).
  const std::vector<RecordRow>& rows() const;
  /// The statistics of the record table, row by row.
  const StatsTable& stats_table() const;
  /// Record `i` materialized (histograms elided).
  RecordInfo record(std::size_t i) const;
  /// Shape `id` of the shape table.
  const std::vector<int64_t>& shape(uint32_t id) const;

  /// The records as a range of materialized RecordInfo values (for iteration in tests and
  /// tools; hot paths use row()).
  class RecordRange {
   public:
    class iterator {
     public:
      iterator(const RunReader* r, std::size_t i) : r_(r), i_(i) {}
      RecordInfo operator*() const { return r_->record(i_); }
      iterator& operator++() {
        ++i_;
        return *this;
      }
      bool operator!=(const iterator& o) const { return i_ != o.i_; }

     private:
      const RunReader* r_;
      std::size_t i_;
    };
    explicit RecordRange(const RunReader* r) : r_(r) {}
    iterator begin() const { return iterator(r_, 0); }
    iterator end() const { return iterator(r_, r_->num_records()); }
    std::size_t size() const { return r_->num_records(); }

   private:
    const RunReader* r_;
  };
  /// Committed tensor records, in commit order per rank (ranks interleaved by refresh).
  RecordRange records() const { return RecordRange(this); }
  /// Committed steps, in commit order per rank.
  const std::vector<StepInfo>& commits() const;
  /// Index into the record table of (name, step, rank), or -1. A step written twice (a
  /// restarted writer) resolves to the later record.
  int64_t find_index(uint32_t name_id, int64_t step, uint32_t rank) const;
  /// The record of (name, step, rank), or nothing.
  std::optional<RecordInfo> find(uint32_t name_id, int64_t step, uint32_t rank) const;
  /// Indices into the record table of the records matching `sel`, in table order. A step
  /// range reads only the records of the matching commits (binary search), not the whole table.
  std::vector<std::size_t> select(const Selection& sel) const;
  /// True when the rank's writer closed its stream cleanly.
  bool ended(uint32_t rank) const;
  /// True when a live writer holds the rank's lock (local file systems).
  bool writer_alive(uint32_t rank) const;
  /// Problems met in non-strict mode (one line each, naming file and offset).
  const std::vector<std::string>& problems() const;
  /// Path of shard `i` of the shard table.
  const std::string& shard_path(uint32_t i) const;

  /// Fills `rec.stats.hist` / `exp_hist` from the shard when they were elided (re-reading and
  /// re-verifying the frame's meta). Thread-safe like read_value(). DataLoss when the meta no
  /// longer matches its checksum.
  void load_histograms(RecordInfo& rec) const;

  /// Decodes the values of `rec` (a copy is fine) into `dst` (exactly rec.raw_nbytes bytes),
  /// verifying every checksum. Thread-safe; does not touch Python. DataLoss on corruption, NotFound when the
  /// record holds no values (stats-only or dropped).
  void read_value(const RecordInfo& rec, void* dst, int threads = 1) const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace tensorvigil::store
