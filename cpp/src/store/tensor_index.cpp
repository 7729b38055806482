#include "tensorvigil/store/tensor_index.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <string_view>
#include <unordered_map>

#include "tensorvigil/error.h"
#include "tensorvigil/internal/bytes.h"
#include "tensorvigil/store/codec.h"
#include "tensorvigil/store/crc32c.h"

namespace tensorvigil::store {

using internal::ByteReader;
using internal::ByteWriter;

namespace {

[[noreturn]] void bad(const std::string& where, const std::string& what) {
  throw_error(ErrorCode::kDataLoss, "[" + where + "] " + what);
}

Mode mode_of(uint8_t m, const std::string& where) {
  if (m > static_cast<uint8_t>(Mode::kGlobal)) bad(where, "unknown mode " + std::to_string(m));
  return static_cast<Mode>(m);
}

struct PendingRec {
  uint32_t name;
  TableRecord rec;
};

}  // namespace

TableRecord table_record(const TensorMetaView& v, const FrameHeader& h, uint64_t offset,
                         const std::string& where) {
  const bool has_payload = (h.flags & (kFlagStatsOnly | kFlagDropped)) == 0;
  if (has_payload && v.raw_nbytes > 0 && h.payload_len < container_header_size(1))
    bad(where, "payload missing for tensor '" + std::string(v.name) + "'");
  TableRecord r;
  r.step = v.step;
  r.mode_step = v.mode_step;
  r.wall_time = v.wall_time;
  r.raw_nbytes = v.raw_nbytes;
  r.frame_offset = offset;
  r.payload_len = h.payload_len;
  r.meta_len = h.meta_len;
  r.meta_crc = h.meta_crc;
  r.payload_crc = h.payload_crc;
  r.flags = h.flags;
  r.mode = v.mode;
  r.dtype = v.dtype;
  r.codec = h.codec;
  r.hists = v.stats.has_hists();
  r.stats = ScalarStats::of(v.stats);
  return r;
}

TensorTable build_tensor_table(uint32_t rank, uint32_t seq, uint64_t shard_size,
                               uint32_t index_crc, const uint8_t* index_meta, std::size_t len,
                               const std::string& where) {
  TensorTable t;
  t.rank = rank;
  t.seq = seq;
  t.shard_size = shard_size;
  t.index_crc = index_crc;
  std::unordered_map<std::string_view, uint32_t> name_ids;  // views into index_meta
  std::map<std::vector<int64_t>, uint32_t> shape_ids;
  std::vector<PendingRec> pending;
  std::vector<uint32_t> last_shape;  // per name
  std::string at;
  t.num_frames = for_each_index_entry(index_meta, len, where, [&](uint64_t off, const FrameHeader& h, const uint8_t* m) {
    at.assign(where);  // reused: a fresh string per frame was a measurable part of a seal
    at += '@';
    at += std::to_string(off);
    switch (h.kind) {
      case FrameKind::kTensor: {
        TensorMetaView v;
        decode_tensor_meta_view(m, h.meta_len, at, &v);
        TableRecord r = table_record(v, h, off, at);
        auto [it, fresh] = name_ids.emplace(v.name, static_cast<uint32_t>(t.names.size()));
        if (fresh) {
          t.names.emplace_back(v.name);
          t.records.emplace_back();
          last_shape.push_back(UINT32_MAX);
        }
        // A tensor usually keeps its shape: try its last one before the map.
        uint32_t& last = last_shape[it->second];
        if (last == UINT32_MAX || t.shapes[last].size() != v.ndim ||
            !std::equal(v.shape, v.shape + v.ndim, t.shapes[last].begin())) {
          std::vector<int64_t> shape(v.shape, v.shape + v.ndim);
          auto [sit, snew] = shape_ids.emplace(std::move(shape), static_cast<uint32_t>(t.shapes.size()));
          if (snew) t.shapes.push_back(sit->first);
          last = sit->second;
        }
        r.shape = last;
        pending.push_back(PendingRec{it->second, r});
        break;
      }
      case FrameKind::kCommit: {
        CommitMeta c = decode_commit_meta(m, h.meta_len, at);
        const uint32_t ci = static_cast<uint32_t>(t.commits.size());
        uint32_t n = 0;
        std::size_t keep = 0;
        for (std::size_t i = 0; i < pending.size(); ++i) {
          if (pending[i].rec.step == c.step) {
            pending[i].rec.commit = ci;
            t.records[pending[i].name].push_back(pending[i].rec);
            ++n;
          } else {
            pending[keep++] = pending[i];
          }
        }
        pending.resize(keep);
        t.commits.push_back(TableCommit{c.step, c.mode_step, c.wall_time, n, c.mode});
        break;
      }
      case FrameKind::kEnd:
        t.ended = true;
        break;
      case FrameKind::kIndex:
        bad(at, "index lists an index frame");
    }
  });
  // Frames still pending when the shard ends never become visible (§9.1 step 4).
  return t;
}

std::vector<uint8_t> encode_tensor_index(const TensorTable& t) {
  ByteWriter d;  // the directory
  for (const TableCommit& c : t.commits) {
    d.put<int64_t>(c.step);
    d.put<int64_t>(c.mode_step);
    d.put<double>(c.wall_time);
    d.put<uint32_t>(c.num_tensors);
    d.put<uint8_t>(static_cast<uint8_t>(c.mode));
    d.put<uint8_t>(0);
    d.put<uint16_t>(0);
  }
  for (const auto& s : t.shapes) {
    d.put<uint8_t>(static_cast<uint8_t>(s.size()));
    for (int64_t x : s) d.put<int64_t>(x);
  }
  // Blocks follow the directory; its size is known before the offsets are written.
  uint64_t dir_len = d.bytes().size();
  for (const auto& n : t.names) dir_len += 8 + 4 + 4 + 2 + n.size();
  uint64_t off = kTensorIndexHeaderSize + dir_len;
  // The blocks: fixed-size records written at fixed offsets (the layout decode reads).
  std::size_t nrec = 0;
  for (const auto& v : t.records) nrec += v.size();
  std::vector<uint8_t> blocks(nrec * kTensorIndexRecordSize, 0);
  uint8_t* q = blocks.data();
  auto put = [&q](std::size_t at, auto v) { std::memcpy(q + at, &v, sizeof v); };
  for (std::size_t k = 0; k < t.names.size(); ++k) {
    const std::size_t start = static_cast<std::size_t>(q - blocks.data());
    for (const TableRecord& r : t.records[k]) {
      put(0, r.step);
      put(8, r.mode_step);
      put(16, r.wall_time);
      put(24, r.raw_nbytes);
      put(32, r.frame_offset);
      put(40, r.payload_len);
      put(48, r.meta_len);
      put(52, r.meta_crc);
      put(56, r.payload_crc);
      put(60, r.shape);
      put(64, r.commit);
      put(68, r.flags);
      q[70] = static_cast<uint8_t>(r.mode);
      q[71] = static_cast<uint8_t>(r.dtype);
      q[72] = static_cast<uint8_t>(r.codec);
      q[73] = r.hists ? 1 : 0;  // 74..79 stay zero
      const ScalarStats& st = r.stats;
      std::size_t at = 80;
      for (uint64_t c : {st.numel, st.nan, st.posinf, st.neginf, st.zeros}) put(at, c), at += 8;
      for (double x : {st.min, st.max, st.mean, st.m2, st.abs_sum, st.abs_max}) put(at, x), at += 8;
      q += kTensorIndexRecordSize;
    }
    const std::size_t bytes = static_cast<std::size_t>(q - blocks.data()) - start;
    d.put<uint64_t>(off + start);
    d.put<uint32_t>(static_cast<uint32_t>(t.records[k].size()));
    d.put<uint32_t>(crc32c(blocks.data() + start, bytes));
    d.put<uint16_t>(static_cast<uint16_t>(t.names[k].size()));
    d.put_bytes(t.names[k].data(), t.names[k].size());
  }
  ByteWriter h;
  h.put_bytes(kTensorIndexMagic, 8);
  h.put<uint16_t>(kFormatMajor);
  h.put<uint16_t>(0);
  h.put<uint32_t>(t.rank);
  h.put<uint32_t>(t.seq);
  h.put<uint32_t>(t.ended ? kTensorIndexEnded : 0);
  h.put<uint64_t>(t.shard_size);
  h.put<uint32_t>(t.index_crc);
  h.put<uint32_t>(static_cast<uint32_t>(t.commits.size()));
  h.put<uint32_t>(static_cast<uint32_t>(t.names.size()));
  h.put<uint32_t>(static_cast<uint32_t>(t.shapes.size()));
  h.put<uint64_t>(d.bytes().size());
  h.put<uint32_t>(crc32c(d.bytes().data(), d.bytes().size()));
  h.put<uint32_t>(t.num_frames);
  h.put<uint32_t>(0);
  h.put<uint32_t>(crc32c(h.bytes().data(), h.bytes().size()));
  std::vector<uint8_t> out;
  out.reserve(h.bytes().size() + d.bytes().size() + blocks.size());
  out.insert(out.end(), h.bytes().begin(), h.bytes().end());
  out.insert(out.end(), d.bytes().begin(), d.bytes().end());
  out.insert(out.end(), blocks.begin(), blocks.end());
  return out;
}

uint64_t decode_tensor_index_header(const uint8_t* p, uint64_t file_size, const std::string& where,
                                    TensorIndexDir* dir, uint32_t* dir_crc) {
  if (file_size < kTensorIndexHeaderSize) bad(where, "tensor index is truncated");
  if (std::memcmp(p, kTensorIndexMagic, 8) != 0) bad(where, "not a tensor index (bad magic)");
  uint32_t hcrc;
  std::memcpy(&hcrc, p + 68, 4);
  if (crc32c(p, 68) != hcrc) bad(where, "tensor index header checksum mismatch");
  ByteReader r(p + 8, 60, where);
  const uint16_t major = r.get<uint16_t>();
  r.get<uint16_t>();  // minor: any
  if (major != kFormatMajor) bad(where, "tensor index of format major " + std::to_string(major));
  dir->rank = r.get<uint32_t>();
  dir->seq = r.get<uint32_t>();
  const uint32_t flags = r.get<uint32_t>();
  if (flags & ~kTensorIndexEnded) bad(where, "unknown tensor index flags");
  dir->ended = (flags & kTensorIndexEnded) != 0;
  dir->shard_size = r.get<uint64_t>();
  dir->index_crc = r.get<uint32_t>();
  const uint32_t ncommits = r.get<uint32_t>();
  const uint32_t nnames = r.get<uint32_t>();
  const uint32_t nshapes = r.get<uint32_t>();
  const uint64_t dir_len = r.get<uint64_t>();
  *dir_crc = r.get<uint32_t>();
  dir->num_frames = r.get<uint32_t>();
  r.get<uint32_t>();  // reserved
  dir->file_size = file_size;
  if (dir_len > file_size - kTensorIndexHeaderSize) bad(where, "tensor index directory is truncated");
  // Bound the counts by what the directory can hold before anything is reserved.
  if (ncommits > dir_len / kTensorIndexCommitSize || nshapes > dir_len || nnames > dir_len / 19)
    bad(where, "tensor index counts exceed its directory");
  dir->commits.resize(ncommits);
  dir->shapes.resize(nshapes);
  dir->blocks.resize(nnames);
  return dir_len;
}

void decode_tensor_index_dir(const uint8_t* p, std::size_t n, const std::string& where,
                             TensorIndexDir* dir) {
  ByteReader r(p, n, where);
  for (TableCommit& c : dir->commits) {
    c.step = r.get<int64_t>();
    c.mode_step = r.get<int64_t>();
    c.wall_time = r.get<double>();
    c.num_tensors = r.get<uint32_t>();
    c.mode = mode_of(r.get<uint8_t>(), where);
    r.get<uint8_t>();
    r.get<uint16_t>();
    if (c.step < 0) bad(where, "negative step in tensor index");
  }
  dir->shape_numel.clear();
  for (auto& s : dir->shapes) {
    const uint8_t ndim = r.get<uint8_t>();
    if (ndim > kMaxNdim) bad(where, "too many dimensions in tensor index");
    s.resize(ndim);
    uint64_t numel = 1;
    for (int64_t& x : s) {
      x = r.get<int64_t>();
      if (x < 0 || (x > 0 && numel > (uint64_t{1} << 48) / static_cast<uint64_t>(x)))
        bad(where, "bad shape in tensor index");
      numel *= static_cast<uint64_t>(x);
    }
    dir->shape_numel.push_back(numel);
  }
  const uint64_t blocks_start = kTensorIndexHeaderSize + n;
  for (TensorIndexBlock& b : dir->blocks) {
    b.offset = r.get<uint64_t>();
    b.count = r.get<uint32_t>();
    b.crc = r.get<uint32_t>();
    const uint16_t len = r.get<uint16_t>();
    if (len == 0 || len > kMaxNameLen) bad(where, "bad tensor name length in tensor index");
    b.name.assign(reinterpret_cast<const char*>(r.take(len)), len);
    if (b.offset < blocks_start || b.offset > dir->file_size ||
        b.count > (dir->file_size - b.offset) / kTensorIndexRecordSize)
      bad(where, "tensor index block of '" + b.name + "' lies outside the file");
  }
  if (r.remaining()) bad(where, "trailing bytes in tensor index directory");
}

void decode_tensor_index_records(const uint8_t* p, uint32_t count, const TensorIndexDir& dir,
                                 const std::string& where, TableRecord* out) {
  const uint64_t frames_end = dir.shard_size >= kFooterSize ? dir.shard_size - kFooterSize : 0;
  // Fixed offsets (the block's size was checked against its count): no per-field bounds checks.
  auto u64 = [](const uint8_t* q) { uint64_t v; std::memcpy(&v, q, 8); return v; };
  auto i64 = [](const uint8_t* q) { int64_t v; std::memcpy(&v, q, 8); return v; };
  auto f64 = [](const uint8_t* q) { double v; std::memcpy(&v, q, 8); return v; };
  auto u32 = [](const uint8_t* q) { uint32_t v; std::memcpy(&v, q, 4); return v; };
  for (uint32_t i = 0; i < count; ++i) {
    const uint8_t* q = p + static_cast<std::size_t>(i) * kTensorIndexRecordSize;
    TableRecord& r = out[i];
    r.step = i64(q);
    r.mode_step = i64(q + 8);
    r.wall_time = f64(q + 16);
    r.raw_nbytes = u64(q + 24);
    r.frame_offset = u64(q + 32);
    r.payload_len = u64(q + 40);
    r.meta_len = u32(q + 48);
    r.meta_crc = u32(q + 52);
    r.payload_crc = u32(q + 56);
    r.shape = u32(q + 60);
    r.commit = u32(q + 64);
    std::memcpy(&r.flags, q + 68, 2);
    const uint8_t mode = q[70], dtype = q[71], codec = q[72], hists = q[73];
    ScalarStats& st = r.stats;
    st.numel = u64(q + 80);
    st.nan = u64(q + 88);
    st.posinf = u64(q + 96);
    st.neginf = u64(q + 104);
    st.zeros = u64(q + 112);
    st.min = f64(q + 120);
    st.max = f64(q + 128);
    st.mean = f64(q + 136);
    st.m2 = f64(q + 144);
    st.abs_sum = f64(q + 152);
    st.abs_max = f64(q + 160);
    r.mode = mode_of(mode, where);
    r.dtype = dtype_from_code(dtype);
    if (codec > static_cast<uint8_t>(Codec::kShuffleZstd) || hists > 1 ||
        (r.flags & ~(kFlagStatsOnly | kFlagDropped)))
      bad(where, "bad codec or flags in tensor index record " + std::to_string(i));
    r.codec = static_cast<Codec>(codec);
    r.hists = hists != 0;
    if (r.shape >= dir.shapes.size() || r.commit >= dir.commits.size() ||
        dir.commits[r.commit].step != r.step || r.step < 0)
      bad(where, "tensor index record " + std::to_string(i) + " names no shape or commit of its step");
    if (r.raw_nbytes != dir.shape_numel[r.shape] * dtype_size(r.dtype))
      bad(where, "byte count does not match shape and dtype in tensor index");
    if (st.nan > st.numel || st.posinf > st.numel - st.nan ||
        st.neginf > st.numel - st.nan - st.posinf || st.zeros > st.numel)
      bad(where, "inconsistent statistics counts in tensor index");
    if (r.meta_len > kMaxMetaLen || r.payload_len > kMaxPayloadLen ||
        r.frame_offset < kShardHeaderSize ||
        r.frame_offset + kFrameHeaderSize + r.meta_len + r.payload_len > frames_end)
      bad(where, "tensor index record " + std::to_string(i) + " points outside its shard");
    const bool has_payload = (r.flags & (kFlagStatsOnly | kFlagDropped)) == 0;
    if (has_payload && r.raw_nbytes > 0 && r.payload_len < container_header_size(1))
      bad(where, "payload missing in tensor index record " + std::to_string(i));
  }
}

namespace {

bool pread_all(int fd, void* buf, std::size_t n, uint64_t off) {
  auto* p = static_cast<uint8_t*>(buf);
  while (n) {
    ssize_t r = ::pread(fd, p, n, static_cast<off_t>(off));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    p += r;
    n -= static_cast<std::size_t>(r);
    off += static_cast<uint64_t>(r);
  }
  return true;
}

}  // namespace

TensorTable read_tensor_index(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) throw_error(ErrorCode::kNotFound, "[tensor_index] no file '" + path + "'");
    throw_error(ErrorCode::kIo, "[tensor_index] '" + path + "': " + std::strerror(errno));
  }
  struct stat st;
  std::vector<uint8_t> buf;
  bool ok = ::fstat(fd, &st) == 0;
  if (ok) {
    buf.resize(static_cast<std::size_t>(st.st_size));
    ok = pread_all(fd, buf.data(), buf.size(), 0);
  }
  ::close(fd);
  const std::string where = "tensor_index " + path;
  if (!ok) bad(where, "cannot read the tensor index");
  TensorIndexDir dir;
  uint32_t dir_crc;
  const uint64_t dir_len = decode_tensor_index_header(buf.data(), buf.size(), where, &dir, &dir_crc);
  const uint8_t* dp = buf.data() + kTensorIndexHeaderSize;
  if (crc32c(dp, dir_len) != dir_crc) bad(where, "tensor index directory checksum mismatch");
  decode_tensor_index_dir(dp, dir_len, where, &dir);
  TensorTable t;
  t.rank = dir.rank;
  t.seq = dir.seq;
  t.shard_size = dir.shard_size;
  t.index_crc = dir.index_crc;
  t.num_frames = dir.num_frames;
  t.ended = dir.ended;
  t.commits = dir.commits;
  t.shapes = dir.shapes;
  uint64_t expect = kTensorIndexHeaderSize + dir_len;
  for (const TensorIndexBlock& b : dir.blocks) {
    const uint64_t bytes = uint64_t{b.count} * kTensorIndexRecordSize;
    if (b.offset != expect) bad(where, "tensor index blocks leave a hole or overlap");
    if (crc32c(buf.data() + b.offset, bytes) != b.crc)
      bad(where, "tensor index block of '" + b.name + "' checksum mismatch");
    t.names.push_back(b.name);
    t.records.emplace_back();
    t.records.back().resize(b.count);
    decode_tensor_index_records(buf.data() + b.offset, b.count, dir, where, t.records.back().data());
    expect += bytes;
  }
  if (expect != buf.size()) bad(where, "trailing bytes after the tensor index blocks");
  return t;
}

bool write_tensor_index_file(const std::string& path, const std::vector<uint8_t>& bytes) {
  const std::string tmp = path + ".tmp";
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return false;
  std::size_t done = 0;
  while (done < bytes.size()) {
    ssize_t w = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) break;
    done += static_cast<std::size_t>(w);
  }
  const bool ok = ::close(fd) == 0 && done == bytes.size() && ::rename(tmp.c_str(), path.c_str()) == 0;
  if (!ok) ::unlink(tmp.c_str());
  return ok;
}

ShardIndexAt locate_shard_index(int fd, uint64_t size, const std::string& path) {
  // Exactly n bytes at off: false at end of file, Io on a failed read.
  auto read = [&](void* buf, std::size_t n, uint64_t off) {
    for (auto* p = static_cast<uint8_t*>(buf); n;) {
      ssize_t r = ::pread(fd, p, n, static_cast<off_t>(off));
      if (r < 0 && errno == EINTR) continue;
      if (r < 0) throw_error(ErrorCode::kIo, "[store.read] '" + path + "': " + std::strerror(errno));
      if (r == 0) return false;
      p += r;
      n -= static_cast<std::size_t>(r);
      off += static_cast<uint64_t>(r);
    }
    return true;
  };
  ShardIndexAt at;
  uint8_t foot[kFooterSize];
  if (size < kShardHeaderSize + kFooterSize || !read(foot, kFooterSize, size - kFooterSize) ||
      !decode_footer(foot, &at.offset, &at.len, &at.num_frames))
    return at;  // kUnsealed
  if (at.offset < kShardHeaderSize || at.len < kFrameHeaderSize || at.offset + at.len != size - kFooterSize) {
    at.state = ShardIndexAt::kFooterOutside;
    return at;
  }
  uint8_t hb[kFrameHeaderSize];
  at.state = read(hb, kFrameHeaderSize, at.offset) && decode_frame_header(hb, &at.header) &&
                     at.header.kind == FrameKind::kIndex && at.header.total() == at.len
                 ? ShardIndexAt::kFound
                 : ShardIndexAt::kBadHeader;
  return at;
}

bool read_shard_index(const std::string& path, std::vector<uint8_t>* meta, uint32_t* crc,
                      uint64_t* size) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw_error(ErrorCode::kIo, "[tensor_index] '" + path + "': " + std::strerror(errno));
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st;
  if (::fstat(fd, &st) != 0)
    throw_error(ErrorCode::kIo, "[tensor_index] '" + path + "': " + std::strerror(errno));
  *size = static_cast<uint64_t>(st.st_size);
  const ShardIndexAt at = locate_shard_index(fd, *size, path);
  const std::string where = "tensor_index " + path + " index";
  if (at.state == ShardIndexAt::kUnsealed) return false;
  if (at.state == ShardIndexAt::kFooterOutside) bad(where, "footer points outside the file");
  if (at.state == ShardIndexAt::kBadHeader) bad(where, "bad index frame header");
  const FrameHeader& h = at.header;
  meta->resize(h.meta_len);
  if (!pread_all(fd, meta->data(), h.meta_len, at.offset + kFrameHeaderSize) ||
      crc32c(meta->data(), h.meta_len) != h.meta_crc)
    bad(where, "index checksum mismatch");
  *crc = h.meta_crc;
  return true;
}

namespace {
/// The tensor index bytes of a sealed shard, or nothing when it is not sealed.
bool expected_tensor_index(const std::string& shard_path, uint32_t rank, uint32_t seq,
                           std::vector<uint8_t>* out) {
  std::vector<uint8_t> meta;
  uint32_t crc;
  uint64_t size;
  if (!read_shard_index(shard_path, &meta, &crc, &size)) return false;
  *out = encode_tensor_index(build_tensor_table(rank, seq, size, crc, meta.data(), meta.size(),
                                                "tensor_index " + shard_path));
  return true;
}
}  // namespace

TensorIndexCheck check_tensor_index(const std::string& shard_path, uint32_t rank, uint32_t seq) {
  const std::string tpath = tensor_index_path(shard_path);
  TensorIndexCheck c;
  std::error_code ec;
  if (!std::filesystem::exists(tpath, ec)) {
    c.state = "absent";
    return c;
  }
  std::vector<uint8_t> want;
  if (!expected_tensor_index(shard_path, rank, seq, &want)) {
    c.state = "orphan";
    c.message = "the shard is not sealed, so it has no tensor index";
    return c;
  }
  TensorTable got;
  try {
    got = read_tensor_index(tpath);
  } catch (const Error& e) {
    if (e.code() != ErrorCode::kDataLoss) throw;
    c.state = "corrupt";
    c.message = e.what();
    return c;
  }
  if (encode_tensor_index(got) != want) {
    c.state = "stale";
    c.message = "'" + tpath + "' does not match the shard's index";
    return c;
  }
  c.state = "ok";
  return c;
}

bool rewrite_tensor_index(const std::string& shard_path, uint32_t rank, uint32_t seq) {
  const std::string tpath = tensor_index_path(shard_path);
  std::vector<uint8_t> want;
  if (!expected_tensor_index(shard_path, rank, seq, &want)) {
    ::unlink(tpath.c_str());
    return false;
  }
  if (!write_tensor_index_file(tpath, want))
    throw_error(ErrorCode::kIo, "[tensor_index] cannot write '" + tpath + "'");
  return true;
}

std::string tensor_index_file_name(uint32_t seq) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "shard-%08u.tvt", seq);
  return buf;
}

std::string tensor_index_path(const std::string& shard_path) {
  std::string p = shard_path;
  if (p.size() >= 4 && p.compare(p.size() - 4, 4, ".tvs") == 0) p.back() = 't';
  else p += ".tvt";
  return p;
}

}  // namespace tensorvigil::store
