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
#include <string>
#include <unordered_map>
#include <vector>

#include "tensorvigil/store/format.h"

namespace tensorvigil::store {

/// One committed tensor record.
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
  /// histogram is 2 KiB decoded): when `hists_elided`, `stats.hist`/`stats.exp_hist` are empty
  /// and RunReader::load_histograms() reads them back from the shard.
  TensorStats stats;
  bool hists_elided = false;
  /// True when the record carries the tensor's values (not stats-only, not dropped).
  bool has_value() const { return (flags & (kFlagStatsOnly | kFlagDropped)) == 0; }
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

/// Thread safety: read_value() may run concurrently with anything, including refresh(); the
/// accessors returning references (records(), commits(), names(), find(), select()) must not
/// overlap a refresh() (the Python binding holds the GIL for them).
class RunReader {
 public:
  /// Opens `run_dir` (a directory holding rank-NNNNN/ stream directories) and reads what is
  /// committed. `strict`: corruption raises DataLoss; otherwise the scan of that shard stops
  /// there and the problem is listed in problems().
  /// Throws NotFound when `run_dir` does not exist.
  explicit RunReader(const std::string& run_dir, bool strict = true);
  ~RunReader();
  RunReader(const RunReader&) = delete;
  RunReader& operator=(const RunReader&) = delete;

  /// Reads what was appended since the last call. Returns the number of newly committed steps.
  std::size_t refresh();

  std::vector<uint32_t> ranks() const;
  const std::vector<std::string>& names() const;
  /// Id of a tensor name, or -1.
  int64_t name_id(const std::string& name) const;
  /// Committed tensor records, in commit order per rank (ranks interleaved by refresh).
  const std::vector<RecordInfo>& records() const;
  /// Committed steps, in commit order per rank.
  const std::vector<StepInfo>& commits() const;
  /// The record of (name, step, rank) or nullptr. A step written twice (a restarted writer)
  /// resolves to the later record.
  const RecordInfo* find(uint32_t name_id, int64_t step, uint32_t rank) const;
  /// Indices into records() of the records matching `sel`, in records() order.
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
