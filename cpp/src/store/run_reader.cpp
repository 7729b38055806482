#include "tensorvigil/store/run_reader.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <shared_mutex>

#include "tensorvigil/error.h"
#include "tensorvigil/store/codec.h"
#include "tensorvigil/store/crc32c.h"

namespace fs = std::filesystem;

namespace tensorvigil::store {

namespace {

struct Fd {
  int fd = -1;
  explicit Fd(const std::string& path) { fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC); }
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
};

/// Reads exactly n bytes at off; returns false when the file is shorter.
bool pread_full(int fd, void* buf, std::size_t n, uint64_t off, const std::string& path) {
  auto* p = static_cast<uint8_t*>(buf);
  while (n) {
    ssize_t r = ::pread(fd, p, n, static_cast<off_t>(off));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw Error(ErrorCode::kIo, "[run_reader.read] '" + path + "': " + std::strerror(errno));
    }
    if (r == 0) return false;
    p += r;
    n -= static_cast<std::size_t>(r);
    off += static_cast<uint64_t>(r);
  }
  return true;
}

uint64_t file_size(int fd, const std::string& path) {
  struct stat st;
  if (::fstat(fd, &st) != 0)
    throw Error(ErrorCode::kIo, "[run_reader.stat] '" + path + "': " + std::strerror(errno));
  return static_cast<uint64_t>(st.st_size);
}

struct Key {
  uint32_t name, rank;
  int64_t step;
  bool operator==(const Key& o) const { return name == o.name && rank == o.rank && step == o.step; }
};
struct KeyHash {
  std::size_t operator()(const Key& k) const {
    uint64_t h = static_cast<uint64_t>(k.step) * 0x9E3779B97F4A7C15ull;
    h ^= (static_cast<uint64_t>(k.name) << 32 | k.rank) + 0x7F4A7C159E3779B9ull + (h << 6) + (h >> 2);
    return static_cast<std::size_t>(h);
  }
};

struct Shard {
  uint32_t seq = 0;
  uint32_t id = 0;  // index into Impl::shard_paths
  uint64_t pos = kShardHeaderSize;
  bool header_ok = false;
  bool done = false;  // sealed (index read) or abandoned and fully scanned
};

struct Stream {
  uint32_t rank = 0;
  std::string dir;
  std::map<uint32_t, Shard> shards;  // by seq
  std::vector<RecordInfo> pending;   // tensor frames whose step has no commit yet
  bool ended = false;                // an END frame was seen (in shard end_seq)
  uint32_t end_seq = 0;
};

}  // namespace

struct RunReader::Impl {
  // refresh() changes the tables below under an exclusive lock; read_value() (called without
  // the GIL from other threads) reads shard_paths under a shared one.
  mutable std::shared_mutex mu;
  std::string run_dir;
  bool strict = true;
  std::map<uint32_t, Stream> streams;
  std::vector<std::string> names;
  std::unordered_map<std::string, uint32_t> name_ids;
  std::vector<RecordInfo> records;
  // step_prefix_max[i] = max step of records[0..i]: non-decreasing, so a query for steps >=
  // s skips, by binary search, every record before the first that can match (steps mostly
  // grow with the record index, so incremental queries touch only the newest records).
  std::vector<int64_t> step_prefix_max;
  std::unordered_map<Key, std::size_t, KeyHash> by_key;
  std::vector<StepInfo> commits;
  std::vector<std::string> shard_paths;
  std::vector<std::string> problems;
  std::string where_buf;  // error context of the frame being applied
  std::vector<uint8_t> scan_buf;  // read window of scan()

  uint32_t intern(const std::string& n) {
    auto it = name_ids.find(n);
    if (it != name_ids.end()) return it->second;
    uint32_t id = static_cast<uint32_t>(names.size());
    names.push_back(n);
    name_ids.emplace(n, id);
    return id;
  }

  [[noreturn]] void corrupt(const std::string& msg) { throw Error(ErrorCode::kDataLoss, msg); }

  /// Applies one frame; returns false when the shard's frames end here (index or end frame).
  bool apply(Stream& st, Shard& sh, const FrameHeader& h, const uint8_t* meta, uint64_t off,
             std::size_t* new_steps) {
    // Error context, rebuilt in a reused buffer: building a fresh string per frame was a
    // measurable part of opening a run of millions of records.
    const std::string& path = shard_paths[sh.id];
    where_buf.assign("run_reader ");
    where_buf += path;
    where_buf += '@';
    where_buf += std::to_string(off);
    const std::string& where = where_buf;
    switch (h.kind) {
      case FrameKind::kTensor: {
        TensorMeta m = decode_tensor_meta(meta, h.meta_len, where);
        bool has_payload = (h.flags & (kFlagStatsOnly | kFlagDropped)) == 0;
        if (has_payload && m.raw_nbytes > 0 && h.payload_len < container_header_size(1))
          corrupt("[" + where + "] payload missing for tensor '" + m.name + "'");
        RecordInfo r;
        r.name_id = intern(m.name);
        r.rank = st.rank;
        r.step = m.step;
        r.mode_step = m.mode_step;
        r.mode = m.mode;
        r.dtype = m.dtype;
        r.codec = h.codec;
        r.flags = h.flags;
        r.shape = std::move(m.shape);
        r.raw_nbytes = m.raw_nbytes;
        r.wall_time = m.wall_time;
        r.shard = sh.id;
        r.frame_offset = off;
        r.meta_crc = h.meta_crc;
        r.payload_offset = off + kFrameHeaderSize + h.meta_len;
        r.payload_len = h.payload_len;
        r.payload_crc = h.payload_crc;
        r.stats = std::move(m.stats);
        if (!r.stats.hist.empty() || !r.stats.exp_hist.empty()) {
          r.stats.hist = {};
          r.stats.exp_hist = {};
          r.hists_elided = true;
        }
        st.pending.push_back(std::move(r));
        return true;
      }
      case FrameKind::kCommit: {
        CommitMeta c = decode_commit_meta(meta, h.meta_len, where);
        // Usually every pending frame belongs to the committed step: skip the partition then.
        auto it = std::all_of(st.pending.begin(), st.pending.end(),
                              [&](const RecordInfo& r) { return r.step == c.step; })
                      ? st.pending.begin()
                      : std::stable_partition(st.pending.begin(), st.pending.end(),
                                              [&](const RecordInfo& r) { return r.step != c.step; });
        uint32_t n = 0;
        for (auto p = it; p != st.pending.end(); ++p, ++n) {
          Key k{p->name_id, p->rank, p->step};
          auto found = by_key.find(k);
          if (found != by_key.end()) {
            records[found->second] = std::move(*p);
          } else {
            by_key.emplace(k, records.size());
            int64_t pm = step_prefix_max.empty() ? p->step
                                                 : std::max(step_prefix_max.back(), p->step);
            step_prefix_max.push_back(pm);
            records.push_back(std::move(*p));
          }
        }
        st.pending.erase(it, st.pending.end());
        commits.push_back(StepInfo{st.rank, c.step, c.mode_step, c.mode, c.wall_time, n});
        ++*new_steps;
        return true;
      }
      case FrameKind::kEnd:
        st.ended = true;
        st.end_seq = sh.seq;
        return true;
      case FrameKind::kIndex:
        return false;
    }
    return false;
  }

  void read_sealed(Stream& st, Shard& sh, int fd, uint64_t size, std::size_t* new_steps,
                   bool* sealed) {
    *sealed = false;
    const std::string& path = shard_paths[sh.id];
    if (size < kShardHeaderSize + kFooterSize) return;
    uint8_t foot[kFooterSize];
    if (!pread_full(fd, foot, kFooterSize, size - kFooterSize, path)) return;
    uint64_t ioff, ilen;
    uint32_t nframes;
    if (!decode_footer(foot, &ioff, &ilen, &nframes)) return;  // not sealed (yet): scan
    std::string where = "run_reader " + path + " index";
    if (ioff < kShardHeaderSize || ilen < kFrameHeaderSize || ioff + ilen != size - kFooterSize)
      corrupt("[" + where + "] footer points outside the file");
    uint8_t hb[kFrameHeaderSize];
    FrameHeader h;
    if (!pread_full(fd, hb, kFrameHeaderSize, ioff, path) || !decode_frame_header(hb, &h) ||
        h.kind != FrameKind::kIndex || h.total() != ilen)
      corrupt("[" + where + "] bad index frame header");
    std::vector<uint8_t> meta(h.meta_len);
    if (!pread_full(fd, meta.data(), meta.size(), ioff + kFrameHeaderSize, path))
      corrupt("[" + where + "] index is truncated");
    if (crc32c(meta.data(), meta.size()) != h.meta_crc) corrupt("[" + where + "] index checksum mismatch");
    uint64_t expect = kShardHeaderSize;
    // Geometric growth: reserving exactly per shard would reallocate for every shard.
    const std::size_t need = records.size() + nframes;
    if (records.capacity() < need) {
      const std::size_t cap = std::max(need, 2 * records.capacity());
      records.reserve(cap);
      step_prefix_max.reserve(cap);
      by_key.reserve(cap);
    }
    uint32_t count = for_each_index_entry(
        meta.data(), meta.size(), where,
        [&](uint64_t offset, const FrameHeader& h, const uint8_t* m) {
          if (offset != expect) corrupt("[" + where + "] index entries leave a hole or overlap");
          expect = offset + h.total();
          apply(st, sh, h, m, offset, new_steps);
        });
    if (count != nframes) corrupt("[" + where + "] index count does not match footer");
    if (expect != ioff) corrupt("[" + where + "] index does not cover the shard");
    *sealed = true;
  }

  /// Scans frames from sh.pos; stops at the first incomplete frame. Headers and metas are read
  /// through a 256 KiB window (two preads per frame dominated opening live runs of small frames).
  void scan(Stream& st, Shard& sh, int fd, uint64_t size, std::size_t* new_steps) {
    const std::string& path = shard_paths[sh.id];
    constexpr uint64_t kWindow = 256u << 10;
    std::vector<uint8_t>& buf = scan_buf;
    uint64_t buf_off = 0, buf_len = 0;
    // Pointer to bytes [off, off + n) of the file, or nullptr when they cannot be read.
    auto bytes = [&](uint64_t off, uint64_t n) -> const uint8_t* {
      if (off >= buf_off && off + n <= buf_off + buf_len) return buf.data() + (off - buf_off);
      const uint64_t want = std::min(std::max(n, kWindow), size - off);
      if (want < n) return nullptr;
      if (buf.size() < want) buf.resize(want);
      if (!pread_full(fd, buf.data(), want, off, path)) {
        buf_len = 0;
        return nullptr;
      }
      buf_off = off;
      buf_len = want;
      return buf.data();
    };
    while (size - sh.pos >= kFrameHeaderSize) {
      const uint8_t* hb = bytes(sh.pos, kFrameHeaderSize);
      if (hb == nullptr) return;
      FrameHeader h;
      if (!decode_frame_header(hb, &h)) {
        bool zeros = std::all_of(hb, hb + kFrameHeaderSize, [](uint8_t b) { return b == 0; });
        if (zeros) return;  // zero-filled tail after a crash: nothing more was written
        corrupt("[run_reader.scan] corrupt frame header at offset " + std::to_string(sh.pos) +
                " in '" + path + "'");
      }
      if (size - sh.pos < h.total()) return;  // torn or still being written
      const uint8_t* meta = bytes(sh.pos + kFrameHeaderSize, h.meta_len);
      if (meta == nullptr) return;
      if (crc32c(meta, h.meta_len) != h.meta_crc)
        corrupt("[run_reader.scan] meta checksum mismatch at offset " + std::to_string(sh.pos) +
                " in '" + path + "'");
      if (h.kind == FrameKind::kIndex) {
        sh.done = true;
        return;
      }
      apply(st, sh, h, meta, sh.pos, new_steps);
      sh.pos += h.total();
    }
  }

  void refresh_shard(Stream& st, Shard& sh, bool is_last, std::size_t* new_steps) {
    const std::string& path = shard_paths[sh.id];
    Fd f(path);
    if (f.fd < 0) {
      if (errno == ENOENT) return;  // removed under us
      throw Error(ErrorCode::kIo, "[run_reader.open] '" + path + "': " + std::strerror(errno));
    }
    uint64_t size = file_size(f.fd, path);
    if (!sh.header_ok) {
      if (size < kShardHeaderSize) {
        if (!is_last) sh.done = true;  // an abandoned, empty shard
        return;
      }
      uint8_t hb[kShardHeaderSize];
      if (!pread_full(f.fd, hb, kShardHeaderSize, 0, path)) return;
      if (std::all_of(hb, hb + kShardHeaderSize, [](uint8_t b) { return b == 0; })) {
        // Zero-filled after a power loss: nothing of this shard reached the disk.
        if (!is_last) sh.done = true;
        return;
      }
      uint32_t rank, seq;
      decode_shard_header(hb, path, &rank, &seq);
      if (rank != st.rank || seq != sh.seq)
        corrupt("[run_reader.open] '" + path + "' belongs to rank " + std::to_string(rank) +
                " shard " + std::to_string(seq) + ", not where it is stored");
      sh.header_ok = true;
      if (sh.pos == kShardHeaderSize) {
        bool sealed = false;
        read_sealed(st, sh, f.fd, size, new_steps, &sealed);
        if (sealed) {
          sh.done = true;
          return;
        }
      }
    }
    scan(st, sh, f.fd, size, new_steps);
    if (!is_last) sh.done = true;  // a later shard exists: this one will not grow
  }

  std::size_t refresh_stream(Stream& st) {
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(st.dir, ec)) {
      std::string n = entry.path().filename().string();
      unsigned v;
      char tail;
      if (n.size() != 18 || std::sscanf(n.c_str(), "shard-%8u.tv%c", &v, &tail) != 2 || tail != 's')
        continue;
      if (st.shards.count(v)) continue;
      Shard sh;
      sh.seq = v;
      sh.id = static_cast<uint32_t>(shard_paths.size());
      shard_paths.push_back(entry.path().string());
      st.shards.emplace(v, sh);
    }
    std::size_t new_steps = 0;
    for (auto it = st.shards.begin(); it != st.shards.end(); ++it) {
      Shard& sh = it->second;
      if (sh.done) continue;
      bool is_last = std::next(it) == st.shards.end();
      try {
        refresh_shard(st, sh, is_last, &new_steps);
      } catch (const Error& e) {
        if (strict || e.code() != ErrorCode::kDataLoss) throw;
        problems.push_back(e.what());
        sh.done = true;
      }
      if (sh.done) st.pending.clear();  // uncommitted frames of a finished shard never commit
    }
    return new_steps;
  }
};

RunReader::RunReader(const std::string& run_dir, bool strict) : impl_(std::make_unique<Impl>()) {
  std::error_code ec;
  if (!fs::is_directory(run_dir, ec))
    throw Error(ErrorCode::kNotFound, "[run_reader.open] no run directory at '" + run_dir + "'");
  impl_->run_dir = run_dir;
  impl_->strict = strict;
  refresh();
}

RunReader::~RunReader() = default;

std::size_t RunReader::refresh() {
  Impl& s = *impl_;
  std::unique_lock<std::shared_mutex> lock(s.mu);
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(s.run_dir, ec)) {
    if (!entry.is_directory(ec)) continue;
    std::string n = entry.path().filename().string();
    unsigned r;
    if (n.size() != 10 || std::sscanf(n.c_str(), "rank-%5u", &r) != 1) continue;
    if (s.streams.count(r)) continue;
    Stream st;
    st.rank = r;
    st.dir = entry.path().string();
    s.streams.emplace(r, std::move(st));
  }
  if (ec) throw Error(ErrorCode::kIo, "[run_reader.list] '" + s.run_dir + "': " + ec.message());
  std::size_t n = 0;
  for (auto& [rank, st] : s.streams) n += s.refresh_stream(st);
  return n;
}

std::vector<uint32_t> RunReader::ranks() const {
  std::vector<uint32_t> out;
  for (const auto& [r, st] : impl_->streams) out.push_back(r);
  return out;
}
const std::vector<std::string>& RunReader::names() const { return impl_->names; }
int64_t RunReader::name_id(const std::string& name) const {
  auto it = impl_->name_ids.find(name);
  return it == impl_->name_ids.end() ? -1 : static_cast<int64_t>(it->second);
}
const std::vector<RecordInfo>& RunReader::records() const { return impl_->records; }
const std::vector<StepInfo>& RunReader::commits() const { return impl_->commits; }
const std::vector<std::string>& RunReader::problems() const { return impl_->problems; }
const std::string& RunReader::shard_path(uint32_t i) const { return impl_->shard_paths.at(i); }

const RecordInfo* RunReader::find(uint32_t name_id, int64_t step, uint32_t rank) const {
  auto it = impl_->by_key.find(Key{name_id, rank, step});
  return it == impl_->by_key.end() ? nullptr : &impl_->records[it->second];
}

std::vector<std::size_t> RunReader::select(const Selection& sel) const {
  const auto& recs = impl_->records;
  std::vector<uint8_t> want_name, want_rank;
  auto mark = [](std::vector<uint8_t>& m, const std::vector<uint32_t>& ids) {
    for (uint32_t i : ids) {
      if (i >= m.size()) m.resize(i + 1, 0);
      m[i] = 1;
    }
  };
  mark(want_name, sel.name_ids);
  mark(want_rank, sel.ranks);
  std::vector<std::size_t> out;
  const auto& pm = impl_->step_prefix_max;
  std::size_t first = static_cast<std::size_t>(
      std::lower_bound(pm.begin(), pm.end(), sel.step_min) - pm.begin());
  for (std::size_t i = first; i < recs.size(); ++i) {
    const RecordInfo& r = recs[i];
    if (!sel.name_ids.empty() && (r.name_id >= want_name.size() || !want_name[r.name_id])) continue;
    if (!sel.ranks.empty() && (r.rank >= want_rank.size() || !want_rank[r.rank])) continue;
    if (r.step < sel.step_min || r.step > sel.step_max) continue;
    if (sel.mode >= 0 && static_cast<int>(r.mode) != sel.mode) continue;
    out.push_back(i);
  }
  return out;
}

bool RunReader::ended(uint32_t rank) const {
  auto it = impl_->streams.find(rank);
  if (it == impl_->streams.end() || !it->second.ended) return false;
  // An END frame counts only in the newest shard: a later writer may continue the rank.
  return it->second.shards.rbegin()->first == it->second.end_seq;
}

bool RunReader::writer_alive(uint32_t rank) const {
  auto it = impl_->streams.find(rank);
  if (it == impl_->streams.end()) return false;
  std::string lock = it->second.dir + "/writer.lock";
  int fd = ::open(lock.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return false;
  bool alive = ::flock(fd, LOCK_SH | LOCK_NB) != 0 && errno == EWOULDBLOCK;
  ::close(fd);  // closing drops a shared lock we may have taken
  return alive;
}

void RunReader::load_histograms(RecordInfo& rec) const {
  if (!rec.hists_elided) return;
  std::string path;
  {
    std::shared_lock<std::shared_mutex> lock(impl_->mu);
    path = impl_->shard_paths.at(rec.shard);
  }
  Fd f(path);
  if (f.fd < 0)
    throw Error(ErrorCode::kIo, "[run_reader.stats] '" + path + "': " + std::strerror(errno));
  const uint64_t meta_len = rec.payload_offset - rec.frame_offset - kFrameHeaderSize;
  std::vector<uint8_t> meta(meta_len);
  std::string where = "run_reader.stats " + path + "@" + std::to_string(rec.frame_offset);
  if (!pread_full(f.fd, meta.data(), meta_len, rec.frame_offset + kFrameHeaderSize, path))
    throw Error(ErrorCode::kDataLoss, "[" + where + "] frame meta is truncated");
  if (crc32c(meta.data(), meta.size()) != rec.meta_crc)
    throw Error(ErrorCode::kDataLoss, "[" + where + "] meta checksum mismatch");
  TensorMeta m = decode_tensor_meta(meta.data(), meta.size(), where);
  rec.stats.hist = std::move(m.stats.hist);
  rec.stats.exp_hist = std::move(m.stats.exp_hist);
  rec.hists_elided = false;
}

void RunReader::read_value(const RecordInfo& rec, void* dst, int threads) const {
  std::string path;
  std::string name;
  {
    std::shared_lock<std::shared_mutex> lock(impl_->mu);
    path = impl_->shard_paths.at(rec.shard);
    name = impl_->names.at(rec.name_id);
  }
  if (!rec.has_value())
    throw Error(ErrorCode::kNotFound,
                std::string("[run_reader.read] tensor '") + name +
                    "' at step " + std::to_string(rec.step) + " has no stored values (" +
                    ((rec.flags & kFlagDropped) ? "dropped under memory pressure" : "statistics only") +
                    ")");
  if (rec.raw_nbytes == 0) return;
  Fd f(path);
  if (f.fd < 0)
    throw Error(ErrorCode::kIo, "[run_reader.read] '" + path + "': " + std::strerror(errno));
  // Read the whole frame: its header and meta are verified again so that a damaged frame body
  // is never served on the strength of the (intact) index copy of its meta.
  const uint64_t head = rec.payload_offset - rec.frame_offset;
  const uint64_t total = head + rec.payload_len;
  thread_local std::vector<uint8_t> frame;
  if (frame.size() < total) frame.resize(total);
  std::string where = "run_reader.read " + path + "@" + std::to_string(rec.frame_offset);
  if (!pread_full(f.fd, frame.data(), total, rec.frame_offset, path))
    throw Error(ErrorCode::kDataLoss, "[" + where + "] frame is truncated");
  FrameHeader h;
  if (!decode_frame_header(frame.data(), &h) || h.kind != FrameKind::kTensor ||
      h.meta_crc != rec.meta_crc || h.payload_len != rec.payload_len ||
      h.payload_crc != rec.payload_crc || kFrameHeaderSize + h.meta_len != head ||
      crc32c(frame.data() + kFrameHeaderSize, h.meta_len) != h.meta_crc)
    throw Error(ErrorCode::kDataLoss, "[" + where + "] frame header or meta does not match the index");
  const uint8_t* payload = frame.data() + head;
  std::size_t nch = 0;
  if (rec.payload_len >= 8) {
    uint32_t n;
    std::memcpy(&n, payload + 4, 4);
    nch = n;
  }
  std::size_t table = container_header_size(nch);
  if (rec.payload_len < 8 || table > rec.payload_len ||
      crc32c(payload, table) != rec.payload_crc)
    throw Error(ErrorCode::kDataLoss, "[" + where + "] payload checksum mismatch");
  decode_payload(rec.codec, payload, rec.payload_len, dtype_size(rec.dtype),
                 static_cast<uint8_t*>(dst), rec.raw_nbytes, where.c_str(), threads);
  if (frame.size() > (64u << 20)) {  // do not pin a huge buffer per thread
    frame.clear();
    frame.shrink_to_fit();
  }
}

}  // namespace tensorvigil::store
