#pragma once
/// \file store/format.h
/// Byte layouts of tensorvigil-store v1. Every constant here appears in docs/FORMAT.md, and the
/// golden files under tests/data/format_v1 pin both. All integers are little-endian.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "tensorvigil/dtype.h"
#include "tensorvigil/stats/stats.h"

namespace tensorvigil::store {

inline constexpr uint16_t kFormatMajor = 1;
inline constexpr uint16_t kFormatMinor = 0;

/// Shard file header: 32 bytes at offset 0.
inline constexpr char kShardMagic[8] = {'T', 'V', 'S', 'H', 'A', 'R', 'D', '\0'};
inline constexpr std::size_t kShardHeaderSize = 32;
/// Frame header: 32 bytes before every frame's meta and payload.
inline constexpr uint32_t kFrameMagic = 0x46525654;  // "TVRF"
inline constexpr std::size_t kFrameHeaderSize = 32;
/// Footer of a sealed shard: the last 32 bytes of the file.
inline constexpr char kFooterMagic[8] = {'T', 'V', 'F', 'O', 'O', 'T', 'E', 'R'};
inline constexpr std::size_t kFooterSize = 32;

/// Bounds checked before any allocation (docs/FORMAT.md §8).
inline constexpr uint32_t kMaxMetaLen = 1u << 20;          // 1 MiB (index frames: see below)
inline constexpr uint32_t kMaxIndexMetaLen = 1u << 30;     // 1 GiB
inline constexpr uint64_t kMaxPayloadLen = 1ull << 40;     // 1 TiB
inline constexpr uint32_t kMaxNdim = 32;
inline constexpr uint32_t kMaxNameLen = 4096;
inline constexpr uint32_t kMaxChunkSize = 64u << 20;       // 64 MiB
inline constexpr uint32_t kDefaultChunkSize = 1u << 20;     // 1 MiB

/// Frame kinds.
enum class FrameKind : uint8_t {
  kTensor = 1,  ///< One tensor (statistics and, unless stats-only, its payload).
  kCommit = 2,  ///< Marks a step complete on this rank; makes the step's records visible.
  kEnd = 3,     ///< The stream was closed cleanly; written before the index of the last shard.
  kIndex = 4,   ///< The shard's index (copies of every other frame's meta); sealed shards only.
};

/// Payload codecs.
enum class Codec : uint8_t {
  kRaw = 0,
  kZstd = 1,
  kShuffleZstd = 2,  ///< Byte shuffle by element size within each chunk, then zstd.
};
const char* codec_name(Codec c);
/// Accepts "raw", "zstd", "shuffle-zstd" (also "shuffle_zstd"); InvalidArgument otherwise.
Codec codec_from_name(const std::string& name);

/// Tensor frame flags.
inline constexpr uint16_t kFlagStatsOnly = 1u << 0;  ///< No payload by request (reductions only).
inline constexpr uint16_t kFlagDropped = 1u << 1;    ///< Payload dropped by the `skip` policy.

/// Training modes (the `mode` byte).
enum class Mode : uint8_t { kTrain = 0, kEval = 1, kPredict = 2, kGlobal = 3 };

/// Stats block flags.
inline constexpr uint8_t kStatsHasHist = 1u << 0;
inline constexpr uint8_t kStatsHasExpHist = 1u << 1;

/// Decoded meta of a tensor frame.
struct TensorMeta {
  std::string name;
  int64_t step = 0;
  int64_t mode_step = 0;
  Mode mode = Mode::kTrain;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  uint64_t raw_nbytes = 0;
  double wall_time = 0.0;  ///< Seconds since the Unix epoch when the tensor was captured.
  TensorStats stats;
};

/// A tensor meta decoded without allocating: the name and the histograms point into the
/// decoded buffer (valid while it is). TensorMeta is built from it.
struct TensorMetaView {
  /// Statistics; histogram pointers are null when absent.
  struct Stats {
    uint64_t numel = 0, nan = 0, posinf = 0, neginf = 0, zeros = 0;
    double min = 0.0, max = 0.0, mean = 0.0, m2 = 0.0, abs_sum = 0.0, abs_max = 0.0;
    uint16_t hist_bins = 0;  ///< Fixed-bin histogram bins (0: none).
    double hist_lo = 0.0, hist_hi = 0.0;
    uint64_t hist_below = 0, hist_above = 0;
    const uint8_t* hist = nullptr;  ///< hist_bins little-endian uint64 counts.
    bool has_exp_hist = false;
    uint16_t exp_first = 0, exp_count = 0;
    const uint8_t* exp_hist = nullptr;  ///< exp_count counts starting at bucket exp_first.
    bool has_hists() const { return hist_bins != 0 || has_exp_hist; }
    /// Fills the scalar fields of `s` and, when `with_hists`, its histograms.
    void copy_to(TensorStats* s, bool with_hists) const;
  };
  std::string_view name;
  int64_t step = 0;
  int64_t mode_step = 0;
  Mode mode = Mode::kTrain;
  DType dtype = DType::kFloat32;
  uint8_t ndim = 0;
  int64_t shape[kMaxNdim] = {};
  uint64_t raw_nbytes = 0;
  double wall_time = 0.0;
  Stats stats;
};

/// Decoded meta of a commit frame.
struct CommitMeta {
  int64_t step = 0;
  int64_t mode_step = 0;
  Mode mode = Mode::kTrain;
  uint32_t num_tensors = 0;  ///< Tensor frames of this step in this shard.
  double wall_time = 0.0;
};

/// Decoded frame header.
struct FrameHeader {
  FrameKind kind = FrameKind::kTensor;
  Codec codec = Codec::kRaw;
  uint16_t flags = 0;
  uint32_t meta_len = 0;
  uint32_t meta_crc = 0;
  uint64_t payload_len = 0;
  uint32_t payload_crc = 0;
  uint64_t total() const { return kFrameHeaderSize + meta_len + payload_len; }
};

/// One entry of a shard index: where a frame is and a copy of its meta.
struct IndexEntry {
  uint64_t offset = 0;  ///< Offset of the frame header in the shard file.
  FrameHeader header;
  std::vector<uint8_t> meta;
};

// --- Encoding helpers (one implementation used by writer, reader and tests) ---

void encode_shard_header(uint8_t out[kShardHeaderSize], uint32_t rank, uint32_t seq);
/// Validates magic, version and checksum; returns (rank, seq). DataLoss on failure.
void decode_shard_header(const uint8_t in[kShardHeaderSize], const std::string& where,
                         uint32_t* rank, uint32_t* seq);

void encode_frame_header(uint8_t out[kFrameHeaderSize], const FrameHeader& h);
/// Returns false when magic or checksum does not match (caller decides torn vs corrupt).
bool decode_frame_header(const uint8_t in[kFrameHeaderSize], FrameHeader* h);

std::vector<uint8_t> encode_tensor_meta(const TensorMeta& m);
TensorMeta decode_tensor_meta(const uint8_t* p, std::size_t n, const std::string& where);
/// Same validation as decode_tensor_meta, without copying name, shape or histograms.
void decode_tensor_meta_view(const uint8_t* p, std::size_t n, const std::string& where,
                             TensorMetaView* m);
std::vector<uint8_t> encode_commit_meta(const CommitMeta& m);
CommitMeta decode_commit_meta(const uint8_t* p, std::size_t n, const std::string& where);
std::vector<uint8_t> encode_end_meta(double wall_time, uint64_t num_commits);
std::vector<uint8_t> encode_index_meta(const std::vector<IndexEntry>& entries);
/// Validates an index meta and calls `fn(offset, header, meta_ptr)` per entry without copying
/// (`meta_ptr` points into [p, p + n)). Returns the entry count. DataLoss on any inconsistency;
/// entries before the bad one may already have been passed to `fn`.
template <typename Fn>
uint32_t for_each_index_entry(const uint8_t* p, std::size_t n, const std::string& where, Fn&& fn);

void encode_footer(uint8_t out[kFooterSize], uint64_t index_offset, uint64_t index_len,
                   uint32_t num_frames);
/// Returns false when the 32 bytes are not a valid footer.
bool decode_footer(const uint8_t in[kFooterSize], uint64_t* index_offset, uint64_t* index_len,
                   uint32_t* num_frames);

namespace internal_format {
[[noreturn]] void index_error(const std::string& where, const std::string& what);
bool check_meta_crc(const uint8_t* meta, uint32_t len, uint32_t crc);
}  // namespace internal_format

template <typename Fn>
uint32_t for_each_index_entry(const uint8_t* p, std::size_t n, const std::string& where, Fn&& fn) {
  constexpr std::size_t kMinEntry = 8 + kFrameHeaderSize;
  if (n < 4) internal_format::index_error(where, "index is truncated");
  uint32_t count;
  std::memcpy(&count, p, 4);
  // Each entry takes at least 8 + 32 bytes: bound the count before using it.
  if (count > (n - 4) / kMinEntry) internal_format::index_error(where, "index entry count exceeds its size");
  std::size_t pos = 4;
  for (uint32_t i = 0; i < count; ++i) {
    if (n - pos < kMinEntry) internal_format::index_error(where, "index is truncated");
    uint64_t offset;
    std::memcpy(&offset, p + pos, 8);
    FrameHeader h;
    if (!decode_frame_header(p + pos + 8, &h))
      internal_format::index_error(where, "bad frame header in index entry " + std::to_string(i));
    pos += kMinEntry;
    if (n - pos < h.meta_len) internal_format::index_error(where, "index is truncated");
    if (!internal_format::check_meta_crc(p + pos, h.meta_len, h.meta_crc))
      internal_format::index_error(where, "meta checksum mismatch in index entry " + std::to_string(i));
    fn(offset, h, p + pos);
    pos += h.meta_len;
  }
  if (pos != n) internal_format::index_error(where, "trailing bytes in index");
  return count;
}

/// File name of shard `seq`: "shard-00000042.tvs".
std::string shard_file_name(uint32_t seq);
/// Directory name of rank `rank`: "rank-00003".
std::string rank_dir_name(uint32_t rank);

}  // namespace tensorvigil::store
