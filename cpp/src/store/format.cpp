#include "tensorvigil/store/format.h"

#include <cstdio>
#include <cstring>

#include "tensorvigil/error.h"
#include "tensorvigil/internal/bytes.h"
#include "tensorvigil/store/crc32c.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "tensorvigil-store is little-endian; big-endian hosts need byte swapping");

namespace tensorvigil::store {

using internal::ByteReader;
using internal::ByteWriter;

const char* codec_name(Codec c) {
  switch (c) {
    case Codec::kRaw: return "raw";
    case Codec::kZstd: return "zstd";
    case Codec::kShuffleZstd: return "shuffle-zstd";
  }
  return "invalid";
}

Codec codec_from_name(const std::string& name) {
  if (name == "raw" || name == "none") return Codec::kRaw;
  if (name == "zstd") return Codec::kZstd;
  if (name == "shuffle-zstd" || name == "shuffle_zstd" || name == "default")
    return Codec::kShuffleZstd;
  throw_error(ErrorCode::kInvalidArgument,
              "[codec] unknown codec '" + name + "'; supported: raw, zstd, shuffle-zstd");
}

namespace {
template <typename T>
void put_le(uint8_t* p, T v) {
  std::memcpy(p, &v, sizeof(T));
}
template <typename T>
T get_le(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

void encode_stats(ByteWriter& w, const TensorStats& s) {
  uint8_t flags = 0;
  if (!s.hist.empty()) flags |= kStatsHasHist;
  if (!s.exp_hist.empty()) flags |= kStatsHasExpHist;
  w.put<uint8_t>(flags);
  w.put<uint64_t>(s.numel);
  w.put<uint64_t>(s.nan);
  w.put<uint64_t>(s.posinf);
  w.put<uint64_t>(s.neginf);
  w.put<uint64_t>(s.zeros);
  w.put<double>(s.min);
  w.put<double>(s.max);
  w.put<double>(s.mean);
  w.put<double>(s.m2);
  w.put<double>(s.abs_sum);
  w.put<double>(s.abs_max);
  if (flags & kStatsHasHist) {
    if (s.hist.size() > static_cast<std::size_t>(kMaxHistBins))
      throw_error(ErrorCode::kInvalidArgument, "[format] histogram has more than 4096 bins");
    if (s.exp_hist.size() > static_cast<std::size_t>(kExpHistBuckets))
      throw_error(ErrorCode::kInvalidArgument, "[format] exponent histogram is too long");
    w.put<uint16_t>(static_cast<uint16_t>(s.hist.size()));
    w.put<double>(s.hist_lo);
    w.put<double>(s.hist_hi);
    w.put<uint64_t>(s.hist_below);
    w.put<uint64_t>(s.hist_above);
    w.put_bytes(s.hist.data(), s.hist.size() * 8);
  }
  if (flags & kStatsHasExpHist) {
    // Sparse: the range [first, first + count) that holds every non-zero bucket.
    int first = 0, last = -1;
    for (int i = 0; i < static_cast<int>(s.exp_hist.size()); ++i)
      if (s.exp_hist[i]) {
        if (last < 0) first = i;
        last = i;
      }
    uint16_t count = last < 0 ? 0 : static_cast<uint16_t>(last - first + 1);
    w.put<uint16_t>(static_cast<uint16_t>(first));
    w.put<uint16_t>(count);
    w.put_bytes(s.exp_hist.data() + first, count * 8u);
  }
}

// Decodes the stats block into `s` without copying the histograms (they stay in the buffer).
void decode_stats_view(ByteReader& r, const std::string& where, TensorMetaView::Stats* s) {
  uint8_t flags = r.get<uint8_t>();
  if (flags & ~(kStatsHasHist | kStatsHasExpHist))
    throw_error(ErrorCode::kDataLoss, "[" + where + "] unknown statistics flags");
  s->numel = r.get<uint64_t>();
  s->nan = r.get<uint64_t>();
  s->posinf = r.get<uint64_t>();
  s->neginf = r.get<uint64_t>();
  s->zeros = r.get<uint64_t>();
  if (s->nan > s->numel || s->posinf > s->numel - s->nan ||
      s->neginf > s->numel - s->nan - s->posinf || s->zeros > s->numel)
    throw_error(ErrorCode::kDataLoss, "[" + where + "] inconsistent statistics counts");
  s->min = r.get<double>();
  s->max = r.get<double>();
  s->mean = r.get<double>();
  s->m2 = r.get<double>();
  s->abs_sum = r.get<double>();
  s->abs_max = r.get<double>();
  s->hist_bins = 0;
  s->exp_count = 0;
  s->has_exp_hist = (flags & kStatsHasExpHist) != 0;
  if (flags & kStatsHasHist) {
    uint16_t bins = r.get<uint16_t>();
    if (bins == 0 || bins > kMaxHistBins)
      throw_error(ErrorCode::kDataLoss, "[" + where + "] bad histogram bin count");
    s->hist_lo = r.get<double>();
    s->hist_hi = r.get<double>();
    s->hist_below = r.get<uint64_t>();
    s->hist_above = r.get<uint64_t>();
    s->hist_bins = bins;
    s->hist = r.take(bins * 8u);
  }
  if (flags & kStatsHasExpHist) {
    uint16_t first = r.get<uint16_t>();
    uint16_t count = r.get<uint16_t>();
    if (static_cast<int>(first) + count > kExpHistBuckets)
      throw_error(ErrorCode::kDataLoss, "[" + where + "] bad exponent histogram range");
    s->exp_first = first;
    s->exp_count = count;
    s->exp_hist = r.take(count * 8u);
  }
}

Mode checked_mode(uint8_t m, const std::string& where) {
  if (m > static_cast<uint8_t>(Mode::kGlobal))
    throw_error(ErrorCode::kDataLoss, "[" + where + "] unknown mode " + std::to_string(m));
  return static_cast<Mode>(m);
}
}  // namespace

void encode_shard_header(uint8_t out[kShardHeaderSize], uint32_t rank, uint32_t seq) {
  std::memset(out, 0, kShardHeaderSize);
  std::memcpy(out, kShardMagic, 8);
  put_le<uint16_t>(out + 8, kFormatMajor);
  put_le<uint16_t>(out + 10, kFormatMinor);
  put_le<uint32_t>(out + 12, rank);
  put_le<uint32_t>(out + 16, seq);
  put_le<uint32_t>(out + 28, crc32c(out, 28));
}

void decode_shard_header(const uint8_t in[kShardHeaderSize], const std::string& where,
                         uint32_t* rank, uint32_t* seq) {
  if (std::memcmp(in, kShardMagic, 8) != 0)
    throw_error(ErrorCode::kDataLoss, "[shard_reader.open] '" + where +
                                          "' is not a tensorvigil shard (bad magic)");
  if (get_le<uint32_t>(in + 28) != crc32c(in, 28))
    throw_error(ErrorCode::kDataLoss,
                "[shard_reader.open] shard header checksum mismatch in '" + where + "'");
  uint16_t major = get_le<uint16_t>(in + 8);
  if (major != kFormatMajor)
    throw_error(ErrorCode::kDataLoss, "[shard_reader.open] '" + where + "' has format version " +
                                          std::to_string(major) + ", this reader knows " +
                                          std::to_string(kFormatMajor));
  *rank = get_le<uint32_t>(in + 12);
  *seq = get_le<uint32_t>(in + 16);
}

void encode_frame_header(uint8_t out[kFrameHeaderSize], const FrameHeader& h) {
  put_le<uint32_t>(out, kFrameMagic);
  out[4] = static_cast<uint8_t>(h.kind);
  out[5] = static_cast<uint8_t>(h.codec);
  put_le<uint16_t>(out + 6, h.flags);
  put_le<uint32_t>(out + 8, h.meta_len);
  put_le<uint32_t>(out + 12, h.meta_crc);
  put_le<uint64_t>(out + 16, h.payload_len);
  put_le<uint32_t>(out + 24, h.payload_crc);
  put_le<uint32_t>(out + 28, crc32c(out, 28));
}

bool decode_frame_header(const uint8_t in[kFrameHeaderSize], FrameHeader* h) {
  if (get_le<uint32_t>(in) != kFrameMagic) return false;
  if (get_le<uint32_t>(in + 28) != crc32c(in, 28)) return false;
  uint8_t kind = in[4], codec = in[5];
  if (kind < 1 || kind > 4 || codec > 2) return false;
  h->kind = static_cast<FrameKind>(kind);
  h->codec = static_cast<Codec>(codec);
  h->flags = get_le<uint16_t>(in + 6);
  // Only tensor frames carry flags, a codec and a payload.
  if (h->kind == FrameKind::kTensor) {
    if (h->flags & ~(kFlagStatsOnly | kFlagDropped)) return false;
  } else if (h->flags != 0 || codec != 0 || get_le<uint64_t>(in + 16) != 0) {
    return false;
  }
  h->meta_len = get_le<uint32_t>(in + 8);
  h->meta_crc = get_le<uint32_t>(in + 12);
  h->payload_len = get_le<uint64_t>(in + 16);
  h->payload_crc = get_le<uint32_t>(in + 24);
  uint32_t max_meta = h->kind == FrameKind::kIndex ? kMaxIndexMetaLen : kMaxMetaLen;
  if (h->meta_len > max_meta || h->payload_len > kMaxPayloadLen) return false;
  return true;
}

std::vector<uint8_t> encode_tensor_meta(const TensorMeta& m) {
  ByteWriter w;
  w.put<int64_t>(m.step);
  w.put<int64_t>(m.mode_step);
  w.put<uint8_t>(static_cast<uint8_t>(m.mode));
  w.put<uint8_t>(static_cast<uint8_t>(m.dtype));
  w.put<uint8_t>(static_cast<uint8_t>(m.shape.size()));
  w.put<uint8_t>(0);
  w.put<double>(m.wall_time);
  w.put<uint16_t>(static_cast<uint16_t>(m.name.size()));
  w.put_bytes(m.name.data(), m.name.size());
  for (int64_t d : m.shape) w.put<int64_t>(d);
  w.put<uint64_t>(m.raw_nbytes);
  encode_stats(w, m.stats);
  return std::move(w.bytes());
}

void decode_tensor_meta_view(const uint8_t* p, std::size_t n, const std::string& where,
                             TensorMetaView* m) {
  ByteReader r(p, n, where);
  m->step = r.get<int64_t>();
  m->mode_step = r.get<int64_t>();
  m->mode = checked_mode(r.get<uint8_t>(), where);
  m->dtype = dtype_from_code(r.get<uint8_t>());
  uint8_t ndim = r.get<uint8_t>();
  r.get<uint8_t>();
  m->wall_time = r.get<double>();
  if (ndim > kMaxNdim) throw_error(ErrorCode::kDataLoss, "[" + where + "] too many dimensions");
  uint16_t name_len = r.get<uint16_t>();
  if (name_len == 0 || name_len > kMaxNameLen)
    throw_error(ErrorCode::kDataLoss, "[" + where + "] bad tensor name length");
  m->name = std::string_view(reinterpret_cast<const char*>(r.take(name_len)), name_len);
  uint64_t numel = 1;
  m->ndim = ndim;
  for (uint8_t i = 0; i < ndim; ++i) {
    int64_t d = r.get<int64_t>();
    if (d < 0 || (d > 0 && numel > (uint64_t{1} << 48) / static_cast<uint64_t>(d)))
      throw_error(ErrorCode::kDataLoss, "[" + where + "] bad shape");
    numel *= static_cast<uint64_t>(d);
    m->shape[i] = d;
  }
  m->raw_nbytes = r.get<uint64_t>();
  if (m->raw_nbytes != numel * dtype_size(m->dtype))
    throw_error(ErrorCode::kDataLoss, "[" + where + "] byte count does not match shape and dtype");
  if (m->step < 0) throw_error(ErrorCode::kDataLoss, "[" + where + "] negative step");
  decode_stats_view(r, where, &m->stats);
  if (r.remaining() != 0)
    throw_error(ErrorCode::kDataLoss, "[" + where + "] trailing bytes in tensor meta");
}

TensorMeta decode_tensor_meta(const uint8_t* p, std::size_t n, const std::string& where) {
  TensorMetaView v;
  decode_tensor_meta_view(p, n, where, &v);
  TensorMeta m;
  m.name.assign(v.name.data(), v.name.size());
  m.step = v.step;
  m.mode_step = v.mode_step;
  m.mode = v.mode;
  m.dtype = v.dtype;
  m.shape.assign(v.shape, v.shape + v.ndim);
  m.raw_nbytes = v.raw_nbytes;
  m.wall_time = v.wall_time;
  v.stats.copy_to(&m.stats, /*with_hists=*/true);
  return m;
}

std::vector<uint8_t> encode_commit_meta(const CommitMeta& m) {
  ByteWriter w;
  w.put<int64_t>(m.step);
  w.put<int64_t>(m.mode_step);
  w.put<uint8_t>(static_cast<uint8_t>(m.mode));
  w.put<uint8_t>(0);
  w.put<uint16_t>(0);
  w.put<uint32_t>(m.num_tensors);
  w.put<double>(m.wall_time);
  return std::move(w.bytes());
}

CommitMeta decode_commit_meta(const uint8_t* p, std::size_t n, const std::string& where) {
  ByteReader r(p, n, where);
  CommitMeta m;
  m.step = r.get<int64_t>();
  m.mode_step = r.get<int64_t>();
  m.mode = checked_mode(r.get<uint8_t>(), where);
  r.get<uint8_t>();
  r.get<uint16_t>();
  m.num_tensors = r.get<uint32_t>();
  m.wall_time = r.get<double>();
  if (m.step < 0) throw_error(ErrorCode::kDataLoss, "[" + where + "] negative step");
  return m;
}

std::vector<uint8_t> encode_end_meta(double wall_time, uint64_t num_commits) {
  ByteWriter w;
  w.put<double>(wall_time);
  w.put<uint64_t>(num_commits);
  return std::move(w.bytes());
}

std::vector<uint8_t> encode_index_meta(const std::vector<IndexEntry>& entries) {
  ByteWriter w;
  w.put<uint32_t>(static_cast<uint32_t>(entries.size()));
  for (const auto& e : entries) {
    w.put<uint64_t>(e.offset);
    uint8_t h[kFrameHeaderSize];
    encode_frame_header(h, e.header);
    w.put_bytes(h, kFrameHeaderSize);
    w.put_bytes(e.meta.data(), e.meta.size());
  }
  return std::move(w.bytes());
}

namespace internal_format {
void index_error(const std::string& where, const std::string& what) {
  throw_error(ErrorCode::kDataLoss, "[" + where + "] " + what);
}
bool check_meta_crc(const uint8_t* meta, uint32_t len, uint32_t crc) {
  return crc32c(meta, len) == crc;
}
}  // namespace internal_format

void encode_footer(uint8_t out[kFooterSize], uint64_t index_offset, uint64_t index_len,
                   uint32_t num_frames) {
  std::memcpy(out, kFooterMagic, 8);
  put_le<uint64_t>(out + 8, index_offset);
  put_le<uint64_t>(out + 16, index_len);
  put_le<uint32_t>(out + 24, num_frames);
  put_le<uint32_t>(out + 28, crc32c(out, 28));
}

bool decode_footer(const uint8_t in[kFooterSize], uint64_t* index_offset, uint64_t* index_len,
                   uint32_t* num_frames) {
  if (std::memcmp(in, kFooterMagic, 8) != 0) return false;
  if (get_le<uint32_t>(in + 28) != crc32c(in, 28)) return false;
  *index_offset = get_le<uint64_t>(in + 8);
  *index_len = get_le<uint64_t>(in + 16);
  *num_frames = get_le<uint32_t>(in + 24);
  return true;
}

std::string shard_file_name(uint32_t seq) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "shard-%08u.tvs", seq);
  return buf;
}

std::string rank_dir_name(uint32_t rank) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "rank-%05u", rank);
  return buf;
}

void TensorMetaView::Stats::copy_to(TensorStats* s, bool with_hists) const {
  s->numel = numel;
  s->nan = nan;
  s->posinf = posinf;
  s->neginf = neginf;
  s->zeros = zeros;
  s->min = min;
  s->max = max;
  s->mean = mean;
  s->m2 = m2;
  s->abs_sum = abs_sum;
  s->abs_max = abs_max;
  if (!with_hists) return;
  if (hist_bins) {
    s->hist_lo = hist_lo;
    s->hist_hi = hist_hi;
    s->hist_below = hist_below;
    s->hist_above = hist_above;
    s->hist.resize(hist_bins);
    std::memcpy(s->hist.data(), hist, hist_bins * 8u);
  }
  if (has_exp_hist) {
    s->exp_hist.assign(kExpHistBuckets, 0);
    std::memcpy(s->exp_hist.data() + exp_first, exp_hist, exp_count * 8u);
  }
}

}  // namespace tensorvigil::store
