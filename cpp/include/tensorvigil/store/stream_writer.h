#pragma once
/// \file store/stream_writer.h
/// Append-only writer of one rank's stream of shard files (docs/FORMAT.md §3-5).
///
/// The calling (training) thread only copies the tensor into a pooled buffer and enqueues it;
/// statistics, compression, checksums and file I/O run on the writer's own threads. Frames are
/// written in the order they were submitted. Memory held by pending writes is bounded by
/// `max_pending_bytes`; when the bound is reached the `block` policy waits and the `skip` policy
/// drops the payload (statistics are still recorded, computed on the calling thread).
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tensorvigil/stats/reduce.h"
#include "tensorvigil/store/format.h"
#include "tensorvigil/tensor_view.h"

namespace tensorvigil::store {

enum class PendingPolicy : uint8_t { kBlock = 0, kSkip = 1 };

struct WriterOptions {
  Codec codec = Codec::kShuffleZstd;        ///< Default codec for floating-point tensors.
  Codec int_codec = Codec::kZstd;           ///< Default codec for integer and bool tensors.
  int level = 1;                            ///< zstd level (negative: faster, larger).
  uint32_t chunk_size = kDefaultChunkSize;  ///< Raw bytes per independently coded chunk.
  uint64_t max_pending_bytes = 512ull << 20;
  PendingPolicy policy = PendingPolicy::kBlock;
  uint64_t roll_bytes = 256ull << 20;  ///< Start a new shard after a commit past this size.
  double roll_seconds = 30.0;          ///< ... or when the open shard is older than this.
  int threads = 2;                     ///< Encoder threads (statistics + compression).
  bool fsync = true;                   ///< fsync each shard when it is sealed and on close.
  /// Write a tensor index (`shard-N.tvt`, FORMAT.md §3.8) beside each sealed shard, so readers
  /// can open a run and read one tensor without decoding every record.
  bool tensor_index = true;
};

/// Counters for monitoring and benchmarks (a consistent snapshot).
struct WriterCounters {
  uint64_t tensors = 0;          ///< Tensor frames written.
  uint64_t commits = 0;          ///< Step commits written.
  uint64_t dropped = 0;          ///< Payloads dropped by the skip policy.
  uint64_t raw_bytes = 0;        ///< Payload bytes before encoding.
  uint64_t stored_bytes = 0;     ///< Payload bytes after encoding.
  uint64_t file_bytes = 0;       ///< Bytes written to shard files (all frames, headers, index).
  uint64_t shards = 0;           ///< Shard files created.
  uint64_t pending_bytes = 0;    ///< Bytes reserved by writes not yet on disk.
  uint64_t peak_pending_bytes = 0;
  uint64_t pool_bytes = 0;       ///< Bytes held by the buffer pool (pending + cached).
};

class StreamWriter {
 public:
  /// Opens the stream of `rank` under `run_dir` (created if missing) and takes its lock
  /// (`rank-NNNNN/writer.lock`, flock). A previous, crashed writer's shards are kept; this one
  /// starts a new shard after them.
  /// Throws FailedPrecondition when another live writer holds the lock, Io on OS errors.
  StreamWriter(const std::string& run_dir, uint32_t rank, const WriterOptions& options = {});
  /// Closes (see close()); errors are swallowed here, call close() to see them.
  ~StreamWriter();
  StreamWriter(const StreamWriter&) = delete;
  StreamWriter& operator=(const StreamWriter&) = delete;

  /// Enqueues one tensor of step `step`. Copies `view` before returning unless `stats_only`
  /// (then the statistics are computed on the calling thread and nothing is copied).
  /// `stats` may carry statistics computed elsewhere (e.g. on a GPU); otherwise they are
  /// computed with `stats_options`. `codec` overrides the default for this tensor.
  /// Does not touch Python; safe to call without the GIL. Throws InvalidArgument for a bad
  /// name, negative step or CUDA view; FailedPrecondition after close; Io after a failed write.
  void write_tensor(const std::string& name, int64_t step, Mode mode, int64_t mode_step,
                    const TensorView& view, bool stats_only = false,
                    const StatsOptions& stats_options = {},
                    std::optional<Codec> codec = std::nullopt,
                    const TensorStats* stats = nullptr);

  /// Records tensor `name` of `step` whose payload never reached the writer (e.g. dropped from
  /// a full GPU staging pool under the skip policy): `stats` only, flagged as dropped and
  /// counted in `dropped`, like a payload the skip policy drops here. Same errors as
  /// write_tensor().
  void write_dropped(const std::string& name, int64_t step, Mode mode, int64_t mode_step,
                     DType dtype, const std::vector<int64_t>& shape, const TensorStats& stats);

  /// Marks `step` complete: readers see its tensors once this frame is on disk.
  void commit_step(int64_t step, Mode mode, int64_t mode_step);

  /// Waits until everything submitted so far is written (and fsynced when `sync`).
  void flush(bool sync = false);

  /// Flushes, writes the end-of-stream frame, seals the shard and releases the lock.
  /// Idempotent. Rethrows the first I/O error if one happened.
  void close();

  bool closed() const;
  /// The options this writer was opened with.
  const WriterOptions& options() const;
  WriterCounters counters() const;
  /// Path of the rank directory.
  const std::string& path() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace tensorvigil::store
