#pragma once
/// \file store/tensor_index.h
/// The tensor index of a sealed shard (docs/FORMAT.md §3.8, format 1.1): a file beside the
/// shard, `shard-NNNNNNNN.tvt`, holding the shard's committed records grouped by tensor, with
/// their statistics, and its commits. A reader opens a run from the indexes' small directories
/// (commits and names) and reads one tensor's records without decoding anyone else's.
///
/// The file is optional and redundant: it is built from the shard's INDEX frame with exactly
/// the visibility rules of a reader (§9.4), bound to that shard by size and index checksum, and
/// covered by CRC-32C. A missing, stale or damaged tensor index is never an error; readers fall
/// back to the shard's own index.
#include <cstdint>
#include <string>
#include <vector>

#include "tensorvigil/store/format.h"

namespace tensorvigil::store {

inline constexpr char kTensorIndexMagic[8] = {'T', 'V', 'T', 'I', 'N', 'D', 'E', 'X'};
inline constexpr std::size_t kTensorIndexHeaderSize = 72;
inline constexpr std::size_t kTensorIndexCommitSize = 32;
inline constexpr std::size_t kTensorIndexRecordSize = 168;
inline constexpr uint32_t kTensorIndexEnded = 1u;  ///< Header flag: the shard holds an END frame.

/// Scalar statistics of one record (TensorStats without histograms).
struct ScalarStats {
  uint64_t numel = 0, nan = 0, posinf = 0, neginf = 0, zeros = 0;
  double min = 0.0, max = 0.0, mean = 0.0, m2 = 0.0, abs_sum = 0.0, abs_max = 0.0;
  /// As a TensorStats (no histograms).
  TensorStats to_stats() const;
  /// The scalar part of a decoded meta's statistics.
  static ScalarStats of(const TensorMetaView::Stats& s) {
    return ScalarStats{s.numel, s.nan, s.posinf, s.neginf, s.zeros, s.min, s.max, s.mean, s.m2, s.abs_sum, s.abs_max};
  }
};

/// One committed record of a shard, as the tensor index stores it.
struct TableRecord {
  int64_t step = 0;
  int64_t mode_step = 0;
  double wall_time = 0.0;
  uint64_t raw_nbytes = 0;
  uint64_t frame_offset = 0;
  uint64_t payload_len = 0;
  uint32_t meta_len = 0;
  uint32_t meta_crc = 0;
  uint32_t payload_crc = 0;
  uint32_t shape = 0;   ///< Index into TensorTable::shapes.
  uint32_t commit = 0;  ///< Index into TensorTable::commits: the commit that made it visible.
  uint16_t flags = 0;
  Mode mode = Mode::kTrain;
  DType dtype = DType::kFloat32;
  Codec codec = Codec::kRaw;
  bool hists = false;  ///< The frame's statistics carry histograms (left in the shard).
  ScalarStats stats;
};

/// One COMMIT frame of the shard, in file order.
struct TableCommit {
  int64_t step = 0;
  int64_t mode_step = 0;
  double wall_time = 0.0;
  uint32_t num_tensors = 0;  ///< Records this commit made visible (counted, not copied).
  Mode mode = Mode::kTrain;
};

/// The decoded content of a tensor index (or what a shard's INDEX frame gives).
struct TensorTable {
  uint32_t rank = 0;
  uint32_t seq = 0;
  uint64_t shard_size = 0;
  uint32_t index_crc = 0;  ///< meta_crc of the shard's INDEX frame.
  uint32_t num_frames = 0;  ///< Entries of the shard's index (its footer's num_frames).
  bool ended = false;
  std::vector<TableCommit> commits;
  std::vector<std::vector<int64_t>> shapes;
  std::vector<std::string> names;
  /// records[k]: the committed records of names[k], in the order a reader applies them.
  std::vector<std::vector<TableRecord>> records;
};

/// The record of a decoded TENSOR frame at `offset` (shape and commit left 0). DataLoss, naming
/// `where`, when the frame should carry a payload and has none.
TableRecord table_record(const TensorMetaView& v, const FrameHeader& h, uint64_t offset,
                         const std::string& where);

/// Builds the table of a sealed shard from its INDEX frame's meta (`index_meta`, `len` bytes,
/// whose checksum is `index_crc`), applying §9.4: only committed TENSOR frames, in commit
/// order. DataLoss on any inconsistency of the index.
TensorTable build_tensor_table(uint32_t rank, uint32_t seq, uint64_t shard_size,
                               uint32_t index_crc, const uint8_t* index_meta, std::size_t len,
                               const std::string& where);

/// The tensor index file's bytes for `t`.
std::vector<uint8_t> encode_tensor_index(const TensorTable& t);

/// Where one tensor's records lie in a tensor index file.
struct TensorIndexBlock {
  std::string name;
  uint64_t offset = 0;  ///< Absolute file offset of the first record.
  uint32_t count = 0;
  uint32_t crc = 0;     ///< CRC-32C of the count * kTensorIndexRecordSize bytes.
};

/// Header and directory of a tensor index: everything but the records.
struct TensorIndexDir {
  uint32_t rank = 0, seq = 0;
  uint64_t shard_size = 0;
  uint32_t index_crc = 0;
  uint32_t num_frames = 0;
  bool ended = false;
  uint64_t file_size = 0;
  std::vector<TableCommit> commits;
  std::vector<std::vector<int64_t>> shapes;
  std::vector<uint64_t> shape_numel;  ///< Elements of each shape.
  std::vector<TensorIndexBlock> blocks;
};

/// Checks and decodes the 72-byte header; returns the directory length and sets `dir_crc`.
/// DataLoss when it is not a valid tensor index header or the sizes cannot fit `file_size`.
uint64_t decode_tensor_index_header(const uint8_t* p, uint64_t file_size, const std::string& where,
                                    TensorIndexDir* dir, uint32_t* dir_crc);
/// Decodes the directory (`n` bytes after the header, checksum already verified) into `dir`.
/// DataLoss on any inconsistency.
void decode_tensor_index_dir(const uint8_t* p, std::size_t n, const std::string& where,
                             TensorIndexDir* dir);
/// Decodes and validates `count` records at `p` (count * kTensorIndexRecordSize bytes) into
/// `out[0..count)` against the directory `dir` (mode, dtype, codec, flags, shape and commit
/// indexes, counts, frame bounds). DataLoss on the first bad one.
void decode_tensor_index_records(const uint8_t* p, uint32_t count, const TensorIndexDir& dir,
                                 const std::string& where, TableRecord* out);

/// Reads a whole tensor index file into a table (fsck and tests). DataLoss on corruption,
/// NotFound when there is no such file.
TensorTable read_tensor_index(const std::string& path);

/// Writes `bytes` to `path` atomically (temp file, rename; no fsync: a torn file fails its
/// checksums and is ignored). Returns false, leaving nothing behind, when it cannot.
bool write_tensor_index_file(const std::string& path, const std::vector<uint8_t>& bytes);

/// Where a shard's INDEX frame is, from its footer (§9.2 steps 1-3, not yet the meta).
struct ShardIndexAt {
  enum State {
    kUnsealed,       ///< No valid footer: scan the shard.
    kFound,          ///< offset, len, num_frames and header are set.
    kFooterOutside,  ///< A valid footer pointing outside the file (DataLoss for a reader).
    kBadHeader,      ///< The footer is fine but the INDEX frame header is not (DataLoss).
  } state = kUnsealed;
  uint64_t offset = 0;      ///< Offset of the INDEX frame.
  uint64_t len = 0;         ///< Its total size.
  uint32_t num_frames = 0;  ///< The footer's frame count (not checked against the index yet).
  FrameHeader header;       ///< The INDEX frame's header.
};

/// Reads the footer and the INDEX frame header of the shard open as `fd` (`size` bytes) and
/// says what it found. Throws Io, naming `path`, when a read fails.
ShardIndexAt locate_shard_index(int fd, uint64_t size, const std::string& path);

/// Reads the INDEX frame meta of the sealed shard at `path` (footer, then index frame, checked
/// as §9.2 does): sets `meta`, its checksum `crc` and the shard's `size`. Returns false when the
/// shard is not sealed (no valid footer); DataLoss when the footer points at a bad index.
bool read_shard_index(const std::string& path, std::vector<uint8_t>* meta, uint32_t* crc,
                      uint64_t* size);

/// What fsck says of a shard's tensor index.
struct TensorIndexCheck {
  /// "ok" (byte for byte what the shard's index gives), "absent" (no file), "corrupt" (fails
  /// its own checks), "stale" (valid, but not the shard's: another shard's, or an older one),
  /// or "orphan" (the shard is not sealed, so it cannot have one).
  std::string state;
  std::string message;  ///< Why, for corrupt and stale.
};

/// Compares the tensor index of the shard at `shard_path` with the one its INDEX frame gives.
/// Throws DataLoss when the shard's own index is corrupt (fsck reports that separately).
TensorIndexCheck check_tensor_index(const std::string& shard_path, uint32_t rank, uint32_t seq);

/// (Re)writes the tensor index of the sealed shard at `shard_path` from its INDEX frame;
/// removes it when the shard is not sealed. Returns true when a file was written.
/// Throws DataLoss when the shard's index is corrupt, Io when the file cannot be written.
bool rewrite_tensor_index(const std::string& shard_path, uint32_t rank, uint32_t seq);

/// File name of shard `seq`'s tensor index: "shard-00000042.tvt".
std::string tensor_index_file_name(uint32_t seq);
/// The tensor index path of a shard path ending in ".tvs".
std::string tensor_index_path(const std::string& shard_path);

}  // namespace tensorvigil::store
