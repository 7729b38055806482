#include "tensorvigil/store/fsck.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstring>
#include <map>

#include "tensorvigil/error.h"
#include "tensorvigil/store/codec.h"
#include "tensorvigil/store/crc32c.h"
#include "tensorvigil/store/format.h"

namespace tensorvigil::store {

namespace {

std::string os_error(const std::string& op, const std::string& path, int err) {
  return "[fsck." + op + "] '" + path + "': " + std::strerror(err);
}

class File {
 public:
  File(const std::string& path, int flags, mode_t mode = 0) : path_(path) {
    fd_ = ::open(path.c_str(), flags | O_CLOEXEC, mode);
    if (fd_ < 0) throw Error(ErrorCode::kIo, os_error("open", path, errno));
  }
  ~File() {
    if (fd_ >= 0) ::close(fd_);
  }
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  uint64_t size() const {
    struct stat st;
    if (::fstat(fd_, &st) != 0) throw Error(ErrorCode::kIo, os_error("stat", path_, errno));
    return static_cast<uint64_t>(st.st_size);
  }
  /// Reads exactly n bytes at off; false on a short read (the file shrank).
  bool read_at(uint64_t off, void* out, std::size_t n) const {
    auto* p = static_cast<uint8_t*>(out);
    while (n) {
      ssize_t r = ::pread(fd_, p, n, static_cast<off_t>(off));
      if (r < 0) {
        if (errno == EINTR) continue;
        throw Error(ErrorCode::kIo, os_error("read", path_, errno));
      }
      if (r == 0) return false;
      p += r;
      off += static_cast<uint64_t>(r);
      n -= static_cast<std::size_t>(r);
    }
    return true;
  }
  void write_all(const void* data, std::size_t n) {
    auto* p = static_cast<const uint8_t*>(data);
    while (n) {
      ssize_t w = ::write(fd_, p, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        throw Error(ErrorCode::kIo, os_error("write", path_, errno));
      }
      p += w;
      n -= static_cast<std::size_t>(w);
    }
  }
  void sync() {
    if (::fsync(fd_) != 0) throw Error(ErrorCode::kIo, os_error("fsync", path_, errno));
  }

 private:
  std::string path_;
  int fd_ = -1;
};

bool all_zero(const uint8_t* p, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i)
    if (p[i]) return false;
  return true;
}

// Verifies a TENSOR payload per FORMAT.md §6.6, one chunk at a time (memory stays bounded by
// kMaxChunkSize however large the tensor claims to be). Throws DataLoss.
void verify_container(const File& f, uint64_t off, const FrameHeader& h, uint64_t raw_nbytes,
                      std::size_t elem, const std::string& where) {
  auto fail = [&](const std::string& what) { throw_error(ErrorCode::kDataLoss, "[" + where + "] " + what); };
  if (h.payload_len < 8) fail("payload shorter than its container header");
  uint8_t head[8];
  if (!f.read_at(off, head, 8)) fail("payload is truncated");
  uint32_t chunk, n;
  std::memcpy(&chunk, head, 4);
  std::memcpy(&n, head + 4, 4);
  if (chunk == 0 || chunk > kMaxChunkSize) fail("bad chunk size " + std::to_string(chunk));
  if (n != (raw_nbytes + chunk - 1) / chunk) fail("chunk count does not match the shape");
  uint64_t table = container_header_size(n);
  if (table > h.payload_len) fail("chunk table is truncated");
  std::vector<uint8_t> t(table);
  if (!f.read_at(off, t.data(), t.size())) fail("payload is truncated");
  if (crc32c(t.data(), t.size()) != h.payload_crc) fail("chunk table checksum mismatch");
  uint64_t sum = table;
  for (uint32_t i = 0; i < n; ++i) {
    uint32_t len;
    std::memcpy(&len, t.data() + 8 + 8 * i, 4);
    sum += len;
  }
  if (sum != h.payload_len) fail("chunk lengths do not add up to the payload length");
  std::vector<uint8_t> stored, raw(std::min<uint64_t>(raw_nbytes, chunk));
  uint64_t pos = off + table;
  for (uint32_t i = 0; i < n; ++i) {
    uint32_t len, crc;
    std::memcpy(&len, t.data() + 8 + 8 * i, 4);
    std::memcpy(&crc, t.data() + 12 + 8 * i, 4);
    std::size_t raw_len = i + 1 < n ? chunk : raw_nbytes - uint64_t{i} * chunk;
    if (len > raw_len) fail("chunk " + std::to_string(i) + " is longer than its raw length");
    stored.resize(len);
    if (!f.read_at(pos, stored.data(), len)) fail("payload is truncated");
    if (crc32c(stored.data(), len) != crc) fail("checksum mismatch in chunk " + std::to_string(i));
    decode_chunk(h.codec, stored.data(), len, elem, raw.data(), raw_len, where.c_str());
    pos += len;
  }
}

struct Scanned {
  uint64_t offset;
  std::array<uint8_t, kFrameHeaderSize> header;
};

}  // namespace

ShardCheck check_shard(const std::string& path, int64_t rank, int64_t seq, bool verify_values) {
  ShardCheck c;
  c.path = path;
  File f(path, O_RDONLY);
  const uint64_t size = c.file_size = f.size();
  auto problem = [&](uint64_t off, const std::string& what) { c.problems.push_back({off, what}); };
  if (size < kShardHeaderSize) return c;
  c.has_header = true;
  uint8_t sh[kShardHeaderSize];
  if (!f.read_at(0, sh, kShardHeaderSize)) return c;
  try {
    uint32_t r, s;
    decode_shard_header(sh, path, &r, &s);
    if ((rank >= 0 && r != rank) || (seq >= 0 && s != seq))
      throw_error(ErrorCode::kDataLoss, "[fsck] shard header says rank " + std::to_string(r) +
                                            " seq " + std::to_string(s) + ", the path differs");
  } catch (const Error& e) {
    problem(0, e.what());
    return c;
  }
  c.header_ok = true;

  bool footer_valid = false;
  uint64_t f_off = 0, f_len = 0;
  uint32_t f_num = 0;
  if (size >= kShardHeaderSize + kFooterSize) {
    uint8_t foot[kFooterSize];
    if (f.read_at(size - kFooterSize, foot, kFooterSize))
      footer_valid = decode_footer(foot, &f_off, &f_len, &f_num);
  }

  std::vector<Scanned> frames;
  std::map<int64_t, uint32_t> pending;  // step -> uncommitted TENSOR frames
  std::vector<uint8_t> meta;
  uint64_t pos = kShardHeaderSize;
  c.commit_end = pos;
  bool reached_index = false;
  for (;;) {
    if (size - pos < kFrameHeaderSize) {
      c.scan_end = pos == size ? "eof" : "torn_tail";
      break;
    }
    Scanned fr{pos, {}};
    if (!f.read_at(pos, fr.header.data(), kFrameHeaderSize)) {
      c.scan_end = "torn_tail";
      break;
    }
    FrameHeader h;
    if (!decode_frame_header(fr.header.data(), &h)) {
      if (all_zero(fr.header.data(), kFrameHeaderSize)) {
        c.scan_end = "zero_tail";
      } else {
        c.scan_end = "corrupt";
        problem(pos, "corrupt frame header");
      }
      break;
    }
    if (h.total() > size - pos) {
      c.scan_end = "torn_tail";
      break;
    }
    meta.resize(h.meta_len);
    if (!f.read_at(pos + kFrameHeaderSize, meta.data(), h.meta_len)) {
      c.scan_end = "torn_tail";
      break;
    }
    if (crc32c(meta.data(), meta.size()) != h.meta_crc) {
      c.scan_end = "corrupt";
      problem(pos, "meta checksum mismatch");
      break;
    }
    if (h.kind == FrameKind::kIndex) {
      reached_index = true;
      c.index_offset = pos;
      c.scan_end = "index";
      break;
    }
    const std::string where = "fsck " + path + " @" + std::to_string(pos);
    try {
      if (h.kind == FrameKind::kTensor) {
        TensorMetaView m;
        decode_tensor_meta_view(meta.data(), meta.size(), where, &m);
        bool has_value = (h.flags & (kFlagStatsOnly | kFlagDropped)) == 0;
        if (!has_value && (h.payload_len != 0 || h.payload_crc != 0 || h.codec != Codec::kRaw))
          throw_error(ErrorCode::kDataLoss, "[" + where + "] frame without a value has a payload");
        if (has_value && m.raw_nbytes > 0 && h.payload_len < 16)
          throw_error(ErrorCode::kDataLoss, "[" + where + "] value-bearing frame has no container");
        if (has_value && m.raw_nbytes == 0 && h.payload_len != 0)
          throw_error(ErrorCode::kDataLoss, "[" + where + "] empty tensor has a payload");
        ++pending[m.step];
        ++c.tensors;
        if (verify_values && has_value && m.raw_nbytes > 0) {
          try {
            verify_container(f, pos + kFrameHeaderSize + h.meta_len, h, m.raw_nbytes,
                             dtype_size(m.dtype), where);
            ++c.values_checked;
          } catch (const Error& e) {
            if (e.code() != ErrorCode::kDataLoss) throw;
            problem(pos, std::string("value of '") + std::string(m.name) + "' step " +
                             std::to_string(m.step) + ": " + e.what());
          }
        }
      } else if (h.kind == FrameKind::kCommit) {
        if (h.payload_len != 0 || h.flags != 0)
          throw_error(ErrorCode::kDataLoss, "[" + where + "] commit frame with payload or flags");
        CommitMeta cm = decode_commit_meta(meta.data(), meta.size(), where);
        pending.erase(cm.step);
        ++c.commits;
        c.committed_steps.push_back(cm.step);
      } else {  // kEnd
        if (h.payload_len != 0 || h.flags != 0 || h.meta_len < 16)
          throw_error(ErrorCode::kDataLoss, "[" + where + "] malformed END frame");
        c.ended = true;
      }
    } catch (const Error& e) {
      if (e.code() != ErrorCode::kDataLoss) throw;
      c.scan_end = "corrupt";
      problem(pos, e.what());
      break;
    }
    frames.push_back(fr);
    ++c.frames;
    pos += h.total();
    if (h.kind != FrameKind::kTensor) {
      c.commit_end = pos;
      c.commit_frames = c.frames;
      uint32_t u = 0;
      for (const auto& kv : pending) u += kv.second;
      c.uncommitted = u;
    }
  }
  c.scan_stop = pos;
  c.after_commit = c.frames - c.commit_frames;
  if (c.after_commit == 0) {
    uint32_t u = 0;
    for (const auto& kv : pending) u += kv.second;
    c.uncommitted = u;
  }

  // Compare the index (wherever the footer points) with the frames the scan found.
  auto index_matches = [&](uint64_t at, std::string* why) -> bool {
    if (!footer_valid) return false;
    if (f_off < kShardHeaderSize || f_len < kFrameHeaderSize || f_off > size ||
        f_len != size - kFooterSize - f_off) {
      *why = "footer points outside the file";
      return false;
    }
    if (at != f_off && reached_index) {
      *why = "footer does not point at the INDEX frame";
      return false;
    }
    uint8_t hb[kFrameHeaderSize];
    FrameHeader h;
    if (!f.read_at(f_off, hb, kFrameHeaderSize) || !decode_frame_header(hb, &h) ||
        h.kind != FrameKind::kIndex || h.total() != f_len) {
      *why = "footer does not point at a valid INDEX frame";
      return false;
    }
    std::vector<uint8_t> im(h.meta_len);
    if (!f.read_at(f_off + kFrameHeaderSize, im.data(), im.size()) ||
        crc32c(im.data(), im.size()) != h.meta_crc) {
      *why = "index checksum mismatch";
      return false;
    }
    try {
      std::size_t k = 0;
      bool same = true;
      uint64_t next = kShardHeaderSize;
      uint32_t count = for_each_index_entry(
          im.data(), im.size(), "fsck " + path, [&](uint64_t off, const FrameHeader& eh, const uint8_t*) {
            if (off != next) same = false;
            next = off + eh.total();
            uint8_t enc[kFrameHeaderSize];
            encode_frame_header(enc, eh);
            // Frames the scan did not reach (stopped at corruption) cannot be compared.
            if (k < frames.size() &&
                (frames[k].offset != off || std::memcmp(frames[k].header.data(), enc, kFrameHeaderSize) != 0))
              same = false;
            ++k;
          });
      if (!same || next != f_off) {
        *why = "index entries do not match the frames on disk";
        return false;
      }
      if (count != f_num) {
        *why = "index entry count differs from the footer";
        return false;
      }
      if (reached_index && count != frames.size()) {
        *why = "index lists " + std::to_string(count) + " frames, the shard holds " +
               std::to_string(frames.size());
        return false;
      }
    } catch (const Error& e) {
      *why = e.what();
      return false;
    }
    return true;
  };

  std::string why;
  if (reached_index) {
    if (index_matches(c.index_offset, &why)) {
      c.index_state = "sealed";
    } else if (!footer_valid) {
      c.index_state = "footer_damaged";
      problem(size >= kFooterSize ? size - kFooterSize : 0, "invalid footer (the INDEX frame is intact)");
    } else {
      c.index_state = "index_corrupt";
      problem(c.index_offset, why);
    }
  } else if (footer_valid) {
    // The scan stopped before the index (corruption): the index may still serve readers.
    if (index_matches(f_off, &why)) {
      c.index_state = "sealed";
    } else {
      c.index_state = "index_corrupt";
      problem(f_off, why);
    }
  } else {
    c.index_state = "absent";
  }
  return c;
}

uint64_t write_sealed_copy(const std::string& path, uint64_t upto, const std::string& out_path) {
  File src(path, O_RDONLY);
  const uint64_t size = src.size();
  if (upto < kShardHeaderSize || upto > size)
    throw_error(ErrorCode::kInvalidArgument, "[fsck.repair] offset " + std::to_string(upto) +
                                                 " is outside '" + path + "'");
  uint8_t sh[kShardHeaderSize];
  if (!src.read_at(0, sh, kShardHeaderSize))
    throw_error(ErrorCode::kInvalidArgument, "[fsck.repair] '" + path + "' shrank");
  uint32_t r, s;
  decode_shard_header(sh, path, &r, &s);
  std::vector<IndexEntry> entries;
  uint64_t pos = kShardHeaderSize;
  while (pos < upto) {
    uint8_t hb[kFrameHeaderSize];
    FrameHeader h;
    if (upto - pos < kFrameHeaderSize || !src.read_at(pos, hb, kFrameHeaderSize) ||
        !decode_frame_header(hb, &h) || h.kind == FrameKind::kIndex || h.total() > upto - pos)
      throw_error(ErrorCode::kInvalidArgument, "[fsck.repair] no valid frame at offset " +
                                                   std::to_string(pos) + " of '" + path + "'");
    IndexEntry e;
    e.offset = pos;
    e.header = h;
    e.meta.resize(h.meta_len);
    if (!src.read_at(pos + kFrameHeaderSize, e.meta.data(), h.meta_len) ||
        crc32c(e.meta.data(), e.meta.size()) != h.meta_crc)
      throw_error(ErrorCode::kInvalidArgument, "[fsck.repair] frame at offset " +
                                                   std::to_string(pos) + " fails its meta checksum");
    entries.push_back(std::move(e));
    pos += h.total();
  }
  File out(out_path, O_WRONLY | O_CREAT | O_EXCL, 0644);
  std::vector<uint8_t> buf(std::min<uint64_t>(upto, 4u << 20));
  for (uint64_t off = 0; off < upto;) {
    std::size_t n = static_cast<std::size_t>(std::min<uint64_t>(buf.size(), upto - off));
    if (!src.read_at(off, buf.data(), n))
      throw_error(ErrorCode::kInvalidArgument, "[fsck.repair] '" + path + "' shrank");
    out.write_all(buf.data(), n);
    off += n;
  }
  std::vector<uint8_t> im = encode_index_meta(entries);
  FrameHeader ih;
  ih.kind = FrameKind::kIndex;
  ih.meta_len = static_cast<uint32_t>(im.size());
  ih.meta_crc = crc32c(im.data(), im.size());
  uint8_t hb[kFrameHeaderSize];
  encode_frame_header(hb, ih);
  out.write_all(hb, kFrameHeaderSize);
  out.write_all(im.data(), im.size());
  uint8_t foot[kFooterSize];
  encode_footer(foot, upto, kFrameHeaderSize + im.size(), static_cast<uint32_t>(entries.size()));
  out.write_all(foot, kFooterSize);
  out.sync();
  return upto + kFrameHeaderSize + im.size() + kFooterSize;
}

}  // namespace tensorvigil::store
