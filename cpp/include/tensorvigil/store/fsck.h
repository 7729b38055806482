#pragma once
/// \file store/fsck.h
/// Offline checking and repair of one shard file (docs/FORMAT.md §4-§6, §11;
/// docs/RELIABILITY.md). `check_shard` scans every frame from the shard header on, verifying
/// every checksum the format defines (and, optionally, decoding every value), and compares a
/// sealed shard's index with what the scan found. `write_sealed_copy` writes the repair: the
/// verbatim bytes of the shard up to a frame boundary, followed by a freshly built INDEX frame
/// and footer. Neither function modifies the shard it reads; the caller renames the copy.
#include <cstdint>
#include <string>
#include <vector>

namespace tensorvigil::store {

/// One problem found in a shard: where and what.
struct ShardProblem {
  uint64_t offset = 0;  ///< Absolute offset of the frame (or structure) at fault.
  std::string message;  ///< Names the check that failed.
};

/// What a scan of one shard found.
struct ShardCheck {
  std::string path;
  uint64_t file_size = 0;
  bool has_header = false;  ///< The file holds at least the 32-byte shard header.
  bool header_ok = false;   ///< Header magic, checksum, version, rank and seq are correct.
  /// Index state: "sealed" (valid footer, index matches the scan), "absent" (no footer and no
  /// INDEX frame: unsealed), "footer_damaged" (INDEX frame reached by the scan but the footer is
  /// invalid), "index_corrupt" (valid footer, but the index fails its checks or differs from
  /// the frames on disk), or "none" when there is no valid shard header.
  std::string index_state = "none";
  /// Why the scan stopped: "index" (reached the INDEX frame), "eof", "zero_tail", "torn_tail"
  /// (an incomplete frame at the end), "corrupt" (an invalid frame: see problems), "header".
  std::string scan_end = "header";
  uint64_t scan_stop = 0;       ///< Offset where the scan stopped.
  uint64_t index_offset = 0;    ///< Offset of the INDEX frame, when the scan reached one.
  uint32_t frames = 0;          ///< Valid TENSOR, COMMIT and END frames before scan_stop.
  uint32_t tensors = 0;         ///< Of which TENSOR frames.
  uint32_t commits = 0;         ///< Of which COMMIT frames.
  bool ended = false;           ///< An END frame was found.
  /// End of the last COMMIT or END frame before scan_stop: a repaired shard keeps exactly the
  /// bytes before this offset (32 when there is none).
  uint64_t commit_end = 0;
  uint32_t commit_frames = 0;   ///< Frames before commit_end.
  uint32_t uncommitted = 0;     ///< TENSOR frames before commit_end that no COMMIT matched.
  uint32_t after_commit = 0;    ///< Valid frames after commit_end (dropped by a repair).
  uint64_t values_checked = 0;  ///< Payloads decoded and verified (verify_values).
  std::vector<int64_t> committed_steps;  ///< Steps of COMMIT frames before commit_end.
  /// Corruption: invalid frames, checksum mismatches, bad payloads, index disagreement. A torn
  /// or zero-filled tail is not a problem (it is what a crash leaves).
  std::vector<ShardProblem> problems;
};

/// Scans the shard at `path`. `rank` and `seq` are the numbers in its path (the header must
/// repeat them; pass -1 to skip that check). With `verify_values`, every TENSOR payload is read
/// and decoded (payload and chunk CRCs, codec), which costs a full read of the file.
/// Never throws DataLoss (corruption is reported in `problems`); throws Io on OS errors.
ShardCheck check_shard(const std::string& path, int64_t rank, int64_t seq, bool verify_values);

/// Writes `out_path` (created, must not exist): bytes [0, upto) of the shard at `path`, then an
/// INDEX frame listing every frame in [32, upto), then the footer; fsyncs it. `upto` must be a
/// frame boundary of valid frames as found by check_shard (its `commit_end`); every frame is
/// re-read and re-verified while copying. Returns the size of the new file.
/// Throws InvalidArgument when `upto` is not such a boundary, Io on OS errors.
uint64_t write_sealed_copy(const std::string& path, uint64_t upto, const std::string& out_path);

}  // namespace tensorvigil::store
