#include "tensorvigil/store/run_reader.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <deque>
#include <filesystem>
#include <map>
#include <mutex>
#include <shared_mutex>
#include <string_view>
#include <thread>
#include <unordered_map>

#include "tensorvigil/error.h"
#include "tensorvigil/store/codec.h"
#include "tensorvigil/store/crc32c.h"
#include "tensorvigil/store/tensor_index.h"

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

/// A tensor frame read before its step's commit.
struct Pending {
  RecordRow row;
  ScalarStats stats;
};

/// Records of one commit: rows [first, first + count) of the record table, all of `step`.
struct Span {
  int64_t step;
  uint32_t first;
  uint32_t count;
};

/// The table row of a record of `rank`'s shard `shard`.
RecordRow row_of(const TableRecord& t, uint32_t name_id, uint32_t rank, uint32_t shard, uint32_t shape_id) {
  RecordRow r;
  r.step = t.step;
  r.mode_step = t.mode_step;
  r.wall_time = t.wall_time;
  r.raw_nbytes = t.raw_nbytes;
  r.frame_offset = t.frame_offset;
  r.payload_len = t.payload_len;
  r.name_id = name_id;
  r.rank = rank;
  r.shard = shard;
  r.shape_id = shape_id;
  r.meta_len = t.meta_len;
  r.meta_crc = t.meta_crc;
  r.payload_crc = t.payload_crc;
  r.flags = t.flags;
  r.mode = t.mode;
  r.dtype = t.dtype;
  r.codec = t.codec;
  r.hists = t.hists;
  return r;
}

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
  std::vector<Pending> pending;      // tensor frames whose step has no commit yet
  bool ended = false;                // an END frame was seen (in shard end_seq)
  // Tensors come in the same order every step: next_of[id] is the name that followed `id` last
  // time, tried before hashing the name.
  uint32_t prev_id = UINT32_MAX;
  std::vector<uint32_t> next_of;
  uint32_t end_seq = 0;
};

}  // namespace

struct RunReader::Impl {
  // refresh() changes the tables below under an exclusive lock; read_value() (called without
  // the GIL from other threads) reads shard_paths under a shared one.
  mutable std::shared_mutex mu;
  std::string run_dir;
  bool strict = true;
  bool lazy = false;
  std::map<uint32_t, Stream> streams;
  std::vector<std::string> names;
  // Name lookup without building a string per record: the keys view name_keys (a deque, so
  // they never move).
  std::deque<std::string> name_keys;
  std::unordered_map<std::string_view, uint32_t> name_ids;
  // The record table: one fixed-size row per committed record.
  std::vector<RecordRow> rows;
  StatsTable stats;
  // Interned shapes; a tensor usually keeps its shape, so the last one per name is tried first.
  std::vector<std::vector<int64_t>> shapes;
  std::map<std::vector<int64_t>, uint32_t> shape_ids;
  std::vector<uint32_t> last_shape_of_name;
  // (name, rank) series: row indices sorted by step (steps mostly arrive in order: appends).
  std::vector<std::vector<std::pair<uint32_t, uint32_t>>> series_of_name;  // (rank, series)
  std::vector<std::vector<uint32_t>> series;
  // Commit spans sorted by (step, first row): a step-range query reads only its rows. Spans
  // are appended as rows are and merged into order when a refresh or load ends
  // (finish_spans); spans_sorted of them are in order.
  std::vector<Span> spans;
  std::size_t spans_sorted = 0;
  // Records loaded a tensor at a time (load_deferred) get no spans: spans are rebuilt from the
  // table once everything is loaded, and select() scans the table meanwhile.
  bool spans_stale = false;
  // Lazy mode: sealed shards with a tensor index (FORMAT.md §3.8) are deferred. Their commits
  // and names are known at once; a tensor's records enter the table when a query asks for it.
  struct Block {
    uint32_t name_id;
    uint32_t count;
    uint32_t crc;
    bool loaded;
    uint64_t offset;
  };
  struct Deferred {
    uint32_t shard_id;
    uint32_t rank;
    TensorIndexDir dir;
    std::vector<uint32_t> shape_ids;  // dir.shapes -> the shape table
    std::vector<Block> blocks;
  };
  std::vector<Deferred> deferred;
  std::vector<std::vector<std::pair<uint32_t, uint32_t>>> blocks_of_name;  // (deferred, block)
  std::vector<uint32_t> unloaded_of_name;  // blocks of the name not loaded yet
  uint64_t unloaded_total = 0;
  std::vector<uint32_t> shard_seq;  // seq of each shard of shard_paths
  bool replaying = false;  // replay_deferred(): commits are known already
  std::vector<StepInfo> commits;
  std::vector<std::string> shard_paths;
  std::vector<std::string> problems;
  std::string where_buf;  // error context of the frame being applied
  std::vector<uint8_t> scan_buf;  // read window of scan()
  std::unique_ptr<uint8_t[]> index_buf;  // index of the sealed shard being read
  std::size_t index_cap = 0;

  void release_buffers() {
    index_buf.reset();
    index_cap = 0;
    if (scan_buf.capacity() > (1u << 20)) std::vector<uint8_t>().swap(scan_buf);
  }

  uint32_t intern(std::string_view n) {
    auto it = name_ids.find(n);
    if (it != name_ids.end()) return it->second;
    uint32_t id = static_cast<uint32_t>(names.size());
    names.emplace_back(n);
    name_keys.emplace_back(n);
    name_ids.emplace(std::string_view(name_keys.back()), id);
    last_shape_of_name.push_back(UINT32_MAX);
    series_of_name.emplace_back();
    blocks_of_name.emplace_back();
    unloaded_of_name.push_back(0);
    return id;
  }

  uint32_t intern_next(Stream& st, std::string_view n) {
    uint32_t id = UINT32_MAX;
    if (st.prev_id < st.next_of.size()) {
      uint32_t guess = st.next_of[st.prev_id];
      if (guess < names.size() && names[guess] == n) id = guess;
    }
    if (id == UINT32_MAX) {
      id = intern(n);
      if (st.prev_id != UINT32_MAX) {
        if (st.next_of.size() <= st.prev_id) st.next_of.resize(names.size(), UINT32_MAX);
        st.next_of[st.prev_id] = id;
      }
    }
    st.prev_id = id;
    return id;
  }

  uint32_t intern_shape(uint32_t name_id, const int64_t* dims, uint8_t ndim) {
    uint32_t last = last_shape_of_name[name_id];
    if (last != UINT32_MAX) {
      const auto& s = shapes[last];
      if (s.size() == ndim && std::equal(s.begin(), s.end(), dims)) return last;
    }
    uint32_t id = intern_shape(std::vector<int64_t>(dims, dims + ndim));
    last_shape_of_name[name_id] = id;
    return id;
  }

  uint32_t intern_shape(std::vector<int64_t> key) {
    auto it = shape_ids.find(key);
    if (it != shape_ids.end()) return it->second;
    uint32_t id = static_cast<uint32_t>(shapes.size());
    shapes.push_back(key);
    shape_ids.emplace(std::move(key), id);
    return id;
  }

  /// True when record a was applied after record b of the same rank (§9.4 "later wins": shard
  /// seq, then file offset), whatever order they were loaded in.
  bool later(const RecordRow& a, const RecordRow& b) const {
    const uint32_t sa = shard_seq[a.shard], sb = shard_seq[b.shard];
    return sa != sb ? sa > sb : a.frame_offset > b.frame_offset;
  }

  /// Adds a committed record to the table and its (name, rank) series; a record of the same
  /// (name, step, rank) is replaced only by a later one. Returns true when a row was appended.
  bool add_row(std::vector<uint32_t>& sv, const RecordRow& row, const ScalarStats& st) {
    if (sv.empty() || rows[sv.back()].step < row.step) {
      sv.push_back(static_cast<uint32_t>(rows.size()));
      rows.push_back(row);
      stats.push_back(st);
      return true;
    }
    auto pos = std::lower_bound(sv.begin(), sv.end(), row.step,
                                [&](uint32_t i, int64_t s) { return rows[i].step < s; });
    if (pos != sv.end() && rows[*pos].step == row.step) {
      if (later(row, rows[*pos])) {  // the step written again (restarted writer)
        rows[*pos] = row;
        stats.set(*pos, st);
      }
      return false;
    }
    sv.insert(pos, static_cast<uint32_t>(rows.size()));
    rows.push_back(row);
    stats.push_back(st);
    return true;
  }

  /// Spans of the whole table, from scratch: one per run of rows of the same step.
  void rebuild_spans() {
    spans.clear();
    for (std::size_t i = 0; i < rows.size();) {
      std::size_t j = i + 1;
      while (j < rows.size() && rows[j].step == rows[i].step) ++j;
      spans.push_back(Span{rows[i].step, static_cast<uint32_t>(i), static_cast<uint32_t>(j - i)});
      i = j;
    }
    std::stable_sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.step < b.step; });
    spans_sorted = spans.size();
    spans_stale = false;
  }

  /// Puts the spans appended since the last call in order (a merge: new spans usually follow).
  void finish_spans() {
    if (spans_stale) {
      if (unloaded_total == 0) rebuild_spans();
      return;
    }
    if (spans_sorted == spans.size()) return;
    auto by_step = [](const Span& a, const Span& b) { return a.step < b.step; };
    auto mid = spans.begin() + static_cast<std::ptrdiff_t>(spans_sorted);
    if (!std::is_sorted(mid, spans.end(), by_step)) std::stable_sort(mid, spans.end(), by_step);
    if (mid != spans.begin() && by_step(*mid, *(mid - 1)))
      std::inplace_merge(spans.begin(), mid, spans.end(), by_step);
    spans_sorted = spans.size();
  }

  std::vector<uint32_t>& series_for(uint32_t name_id, uint32_t rank) {
    auto& list = series_of_name[name_id];
    for (const auto& [r, sid] : list)
      if (r == rank) return series[sid];
    list.emplace_back(rank, static_cast<uint32_t>(series.size()));
    series.emplace_back();
    return series.back();
  }

  /// Row index of (name, rank, step), or -1.
  int64_t find(uint32_t name_id, int64_t step, uint32_t rank) const {
    if (name_id >= series_of_name.size()) return -1;
    for (const auto& [r, sid] : series_of_name[name_id]) {
      if (r != rank) continue;
      const auto& sv = series[sid];
      auto it = std::lower_bound(sv.begin(), sv.end(), step,
                                 [&](uint32_t i, int64_t s) { return rows[i].step < s; });
      if (it != sv.end() && rows[*it].step == step) return *it;
      return -1;
    }
    return -1;
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
        TensorMetaView m;
        decode_tensor_meta_view(meta, h.meta_len, where, &m);
        const TableRecord t = table_record(m, h, off, where);
        const uint32_t name_id = intern_next(st, m.name);
        st.pending.push_back(Pending{row_of(t, name_id, st.rank, sh.id, intern_shape(name_id, m.shape, m.ndim)), t.stats});
        return true;
      }
      case FrameKind::kCommit: {
        CommitMeta c = decode_commit_meta(meta, h.meta_len, where);
        // Usually every pending frame belongs to the committed step: skip the partition then.
        auto it = std::all_of(st.pending.begin(), st.pending.end(),
                              [&](const Pending& p) { return p.row.step == c.step; })
                      ? st.pending.begin()
                      : std::stable_partition(st.pending.begin(), st.pending.end(),
                                              [&](const Pending& p) { return p.row.step != c.step; });
        uint32_t n = 0;
        const uint32_t first = static_cast<uint32_t>(rows.size());
        for (auto p = it; p != st.pending.end(); ++p, ++n)
          add_row(series_for(p->row.name_id, p->row.rank), p->row, p->stats);
        const uint32_t added = static_cast<uint32_t>(rows.size()) - first;
        if (added) spans.push_back(Span{c.step, first, added});
        st.pending.erase(it, st.pending.end());
        if (!replaying) {  // a deferred shard's commits came from its tensor index
          commits.push_back(StepInfo{st.rank, c.step, c.mode_step, c.mode, c.wall_time, n});
          ++*new_steps;
        }
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
    const ShardIndexAt at = locate_shard_index(fd, size, path);
    if (at.state == ShardIndexAt::kUnsealed) return;  // not sealed (yet): scan
    std::string where = "run_reader " + path + " index";
    if (at.state == ShardIndexAt::kFooterOutside) corrupt("[" + where + "] footer points outside the file");
    if (at.state == ShardIndexAt::kBadHeader) corrupt("[" + where + "] bad index frame header");
    const FrameHeader& h = at.header;
    const uint64_t ioff = at.offset;
    const uint32_t nframes = at.num_frames;
    // One uninitialised buffer for every index of a refresh (a zeroed vector per shard cost
    // a memset and fresh pages per index); released when the refresh ends.
    if (index_cap < h.meta_len) {
      index_buf.reset(new uint8_t[h.meta_len]);
      index_cap = h.meta_len;
    }
    uint8_t* meta = index_buf.get();
    if (!pread_full(fd, meta, h.meta_len, ioff + kFrameHeaderSize, path))
      corrupt("[" + where + "] index is truncated");
    if (crc32c(meta, h.meta_len) != h.meta_crc) corrupt("[" + where + "] index checksum mismatch");
    uint64_t expect = kShardHeaderSize;
    // Geometric growth: reserving exactly per shard would reallocate for every shard.
    // nframes is not checked against the index yet: bound it by what the index can hold.
    const std::size_t need = rows.size() + std::min<uint64_t>(nframes, h.meta_len / (8 + kFrameHeaderSize));
    if (rows.capacity() < need) {
      rows.reserve(std::max(need, 2 * rows.capacity()));
      stats.reserve(rows.capacity());
    }
    uint32_t count = for_each_index_entry(
        meta, h.meta_len, where,
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

  /// Lazy mode: takes the commits and names of a sealed shard from its tensor index, if it
  /// has a valid one that matches the shard; its records are loaded on demand (load()).
  /// Returns false when the shard must be read through its own index instead.
  bool defer(Stream& st, Shard& sh, int fd, uint64_t size, std::size_t* new_steps) {
    const std::string& path = shard_paths[sh.id];
    const ShardIndexAt at = locate_shard_index(fd, size, path);
    if (at.state != ShardIndexAt::kFound) return false;  // read_sealed says what is wrong
    const std::string tpath = tensor_index_path(path);
    Fd t(tpath);
    if (t.fd < 0) return false;  // none (an older writer, or not written): not a problem
    Deferred d;
    d.shard_id = sh.id;
    d.rank = st.rank;
    const std::string where = "run_reader " + tpath;
    try {
      uint8_t th[kTensorIndexHeaderSize];
      const uint64_t tsize = file_size(t.fd, tpath);
      if (tsize < kTensorIndexHeaderSize || !pread_full(t.fd, th, sizeof th, 0, tpath))
        corrupt("[" + where + "] tensor index is truncated");
      uint32_t dir_crc;
      const uint64_t dir_len = decode_tensor_index_header(th, tsize, where, &d.dir, &dir_crc);
      if (d.dir.rank != st.rank || d.dir.seq != sh.seq || d.dir.shard_size != size ||
          d.dir.index_crc != at.header.meta_crc || d.dir.num_frames != at.num_frames)
        corrupt("[" + where + "] tensor index does not describe this shard (stale)");
      std::vector<uint8_t> dbuf(dir_len);
      if (!pread_full(t.fd, dbuf.data(), dir_len, kTensorIndexHeaderSize, tpath) ||
          crc32c(dbuf.data(), dir_len) != dir_crc)
        corrupt("[" + where + "] tensor index directory checksum mismatch");
      decode_tensor_index_dir(dbuf.data(), dir_len, where, &d.dir);
    } catch (const Error& e) {
      if (e.code() != ErrorCode::kDataLoss) throw;
      // The shard itself is intact: read it through its own index; the note says why.
      problems.push_back(std::string(e.what()) + " (read through the shard's index instead)");
      return false;
    }
    for (const TableCommit& c : d.dir.commits) {
      commits.push_back(StepInfo{st.rank, c.step, c.mode_step, c.mode, c.wall_time, c.num_tensors});
      ++*new_steps;
    }
    for (const auto& shape : d.dir.shapes) d.shape_ids.push_back(intern_shape(shape));
    const uint32_t di = static_cast<uint32_t>(deferred.size());
    for (auto& b : d.dir.blocks) {
      const uint32_t id = intern(b.name);
      std::string().swap(b.name);  // the name table has it
      if (b.count == 0) continue;
      blocks_of_name[id].emplace_back(di, static_cast<uint32_t>(d.blocks.size()));
      d.blocks.push_back(Block{id, b.count, b.crc, false, b.offset});
      ++unloaded_of_name[id];
      ++unloaded_total;
    }
    std::vector<TensorIndexBlock>().swap(d.dir.blocks);
    if (d.dir.ended) {
      st.ended = true;
      st.end_seq = sh.seq;
    }
    deferred.push_back(std::move(d));
    return true;
  }

  // Scratch of load_deferred(), kept across shards (fresh vectors per shard cost page faults).
  std::vector<TableRecord> load_recs;
  std::vector<uint32_t> load_names;  // name id of each of load_recs
  std::vector<uint32_t> load_order;
  std::vector<uint32_t> load_start;

  /// Reads blocks `which` of deferred shard `d` back to back into `raw` (one read per run of
  /// consecutive blocks). Touches nothing shared: load() runs it on several threads. Returns
  /// false when the file cannot be opened or is short (read_blocks then says why).
  bool read_raw_blocks(const Deferred& d, const std::vector<uint32_t>& which,
                       std::vector<uint8_t>* raw) const {
    const std::string tpath = tensor_index_path(shard_paths[d.shard_id]);
    Fd t(tpath);
    if (t.fd < 0) return false;
    std::size_t total = 0;
    for (uint32_t b : which) total += static_cast<std::size_t>(d.blocks[b].count) * kTensorIndexRecordSize;
    raw->resize(total);
    std::size_t at = 0;
    for (std::size_t k = 0; k < which.size();) {
      const uint64_t first = d.blocks[which[k]].offset;
      uint64_t end = first;
      for (; k < which.size() && d.blocks[which[k]].offset == end; ++k)
        end += uint64_t{d.blocks[which[k]].count} * kTensorIndexRecordSize;
      const std::size_t bytes = static_cast<std::size_t>(end - first);
      if (bytes && !pread_full(t.fd, raw->data() + at, bytes, first, tpath)) return false;
      at += bytes;
    }
    return true;
  }

  /// Fills load_recs/load_names with the records of blocks `which` of deferred shard `d`, from
  /// `raw` (read_raw_blocks(); read here when !have_raw) checked against the tensor index; or,
  /// when that fails its checks, rebuilt from the shard's own index. Their `shape` is an id of
  /// the reader's shape table.
  void read_blocks(const Deferred& d, const std::vector<uint32_t>& which, std::vector<uint8_t>* raw,
                   bool have_raw) {
    load_recs.clear();
    load_names.clear();
    const std::string& path = shard_paths[d.shard_id];
    const std::string tpath = tensor_index_path(path);
    const std::string where = "run_reader " + tpath;
    try {
      if (!have_raw && !read_raw_blocks(d, which, raw))
        corrupt("[" + where + "] tensor index is missing or truncated");
      std::size_t total = 0;
      for (uint32_t b : which) total += d.blocks[b].count;
      load_recs.resize(total);
      load_names.resize(total);
      std::size_t at = 0;
      const uint8_t* p = raw->data();
      for (uint32_t w : which) {
        const Block& b = d.blocks[w];
        const std::size_t n = static_cast<std::size_t>(b.count) * kTensorIndexRecordSize;
        if (crc32c(p, n) != b.crc)
          corrupt("[" + where + "] tensor index block of '" + names[b.name_id] + "' checksum mismatch");
        decode_tensor_index_records(p, b.count, d.dir, where, load_recs.data() + at);
        for (uint32_t i = 0; i < b.count; ++i) {
          load_recs[at + i].shape = d.shape_ids[load_recs[at + i].shape];
          load_names[at + i] = b.name_id;
        }
        at += b.count;
        p += n;
      }
      return;
    } catch (const Error& e) {
      if (e.code() != ErrorCode::kDataLoss) throw;
      problems.push_back(std::string(e.what()) + " (read through the shard's index instead)");
    }
    load_recs.clear();
    load_names.clear();
    // Fall back to the shard's index (the shard is checked as a sealed read would).
    std::vector<uint8_t> meta;
    uint32_t icrc;
    uint64_t size;
    const std::string iwhere = "run_reader " + path + " index";
    if (!read_shard_index(path, &meta, &icrc, &size) || size != d.dir.shard_size)
      corrupt("[" + iwhere + "] the sealed shard changed since it was opened");
    TensorTable tt = build_tensor_table(d.rank, shard_seq[d.shard_id], size, icrc, meta.data(),
                                        meta.size(), iwhere);
    // Both number the shard's COMMIT frames in file order; the commits were taken from the
    // tensor index's directory, so they must agree.
    bool same = tt.commits.size() == d.dir.commits.size();
    for (std::size_t c = 0; same && c < tt.commits.size(); ++c)
      same = tt.commits[c].step == d.dir.commits[c].step;
    if (!same) corrupt("[" + iwhere + "] the shard's commits differ from its tensor index's");
    for (uint32_t b : which) {
      const std::string& want = names[d.blocks[b].name_id];
      for (std::size_t n = 0; n < tt.names.size(); ++n) {
        if (tt.names[n] != want) continue;
        for (TableRecord r : tt.records[n]) {
          r.shape = intern_shape(tt.shapes[r.shape]);
          load_recs.push_back(r);
          load_names.push_back(d.blocks[b].name_id);
        }
      }
    }
  }

  /// Loads blocks `which` of deferred shard `di` into the record table, in the order a reader
  /// of the shard would have committed them (commit, then file offset).
  void load_deferred(uint32_t di, const std::vector<uint32_t>& which, std::vector<uint8_t>* raw,
                     bool have_raw) {
    Deferred& d = deferred[di];
    try {
      read_blocks(d, which, raw, have_raw);
    } catch (const Error& e) {
      if (strict || e.code() != ErrorCode::kDataLoss) throw;
      problems.push_back(e.what());
      load_recs.clear();
      load_names.clear();
    }
    // Order by commit with a counting sort (each block is already in commit order).
    const std::size_t nc = d.dir.commits.size();
    const std::size_t total = load_recs.size();
    load_start.assign(nc + 1, 0);
    for (const TableRecord& r : load_recs) ++load_start[r.commit + 1];
    for (std::size_t c = 0; c < nc; ++c) load_start[c + 1] += load_start[c];
    load_order.resize(total);
    for (uint32_t i = 0; i < total; ++i) load_order[load_start[load_recs[i].commit]++] = i;
    // Within a commit, file order: insertion sort (blocks come in write order, so it rarely moves).
    auto off = [&](uint32_t i) { return load_recs[i].frame_offset; };
    for (std::size_t i = 1; i < total; ++i) {
      const uint32_t x = load_order[i];
      std::size_t j = i;
      while (j > 0 && load_recs[load_order[j - 1]].commit == load_recs[x].commit &&
             off(load_order[j - 1]) > off(x)) {
        load_order[j] = load_order[j - 1];
        --j;
      }
      load_order[j] = x;
    }
    if (rows.capacity() < rows.size() + total) {
      rows.reserve(std::max(rows.size() + total, rows.capacity() + rows.capacity() / 2));
      stats.reserve(rows.capacity());
    }
    std::size_t i = 0;
    uint32_t last_name = UINT32_MAX;
    std::vector<uint32_t>* sv = nullptr;
    const std::size_t before = rows.size();
    while (i < total) {
      const uint32_t commit = load_recs[load_order[i]].commit;
      for (; i < total && load_recs[load_order[i]].commit == commit; ++i) {
        const TableRecord& t = load_recs[load_order[i]];
        const RecordRow r = row_of(t, load_names[load_order[i]], d.rank, d.shard_id, t.shape);
        if (r.name_id != last_name) {
          sv = &series_for(r.name_id, r.rank);
          last_name = r.name_id;
        }
        add_row(*sv, r, t.stats);
      }
    }
    if (rows.size() != before) spans_stale = true;
    for (uint32_t b : which) mark_loaded(d.blocks[b]);
  }

  void mark_loaded(Block& b) {
    if (b.loaded) return;
    b.loaded = true;
    --unloaded_of_name[b.name_id];
    --unloaded_total;
  }

  /// Loads every record of deferred shard `di` through the shard's own index, the way an eager
  /// reader does (faster than regrouping the tensor index's per-tensor blocks by commit when
  /// most of the shard is wanted). Records already loaded are met again and kept (add_row
  /// replaces a record only by a later one). Returns false, having noted why, when the
  /// shard's index cannot be used.
  bool replay_deferred(uint32_t di) {
    Deferred& d = deferred[di];
    const std::string& path = shard_paths[d.shard_id];
    Fd f(path);
    if (f.fd < 0) return false;
    if (file_size(f.fd, path) != d.dir.shard_size) return false;
    Stream tmp;  // not the rank's stream: its pending frames are not this shard's
    tmp.rank = d.rank;
    Shard sh;
    sh.seq = shard_seq[d.shard_id];
    sh.id = d.shard_id;
    std::size_t ignored = 0;
    bool sealed = false;
    replaying = true;
    try {
      read_sealed(tmp, sh, f.fd, d.dir.shard_size, &ignored, &sealed);
    } catch (const Error& e) {
      replaying = false;
      if (e.code() != ErrorCode::kDataLoss) throw;
      problems.push_back(std::string(e.what()) + " (read through its tensor index instead)");
      return false;
    }
    replaying = false;
    if (!sealed) return false;
    for (Block& b : d.blocks) mark_loaded(b);
    return true;
  }

  void release_load_scratch() {
    std::vector<TableRecord>().swap(load_recs);
    std::vector<uint32_t>().swap(load_names);
    std::vector<uint32_t>().swap(load_order);
  }

  /// Whether every record of tensors `ids` (all when empty) of ranks `ranks` (all when empty)
  /// is loaded.
  bool loaded(const std::vector<uint32_t>& ids, const std::vector<uint32_t>& ranks) const {
    if (ranks.empty()) {
      if (ids.empty()) return unloaded_total == 0;
      for (uint32_t id : ids)
        if (id < unloaded_of_name.size() && unloaded_of_name[id]) return false;
      return true;
    }
    bool found = true;
    for_each_unloaded(ids, ranks, [&](uint32_t, uint32_t) { found = false; });
    return found;
  }

  /// Calls fn(deferred shard, block) for every block not loaded yet of tensors `ids` (all when
  /// empty) of ranks `ranks` (all when empty).
  template <typename F>
  void for_each_unloaded(const std::vector<uint32_t>& ids, const std::vector<uint32_t>& ranks, F&& fn) const {
    auto rank_ok = [&](uint32_t r) {
      return ranks.empty() || std::find(ranks.begin(), ranks.end(), r) != ranks.end();
    };
    if (ids.empty()) {
      for (uint32_t di = 0; di < deferred.size(); ++di) {
        if (!rank_ok(deferred[di].rank)) continue;
        for (uint32_t b = 0; b < deferred[di].blocks.size(); ++b)
          if (!deferred[di].blocks[b].loaded) fn(di, b);
      }
      return;
    }
    for (uint32_t id : ids) {
      if (id >= blocks_of_name.size() || !unloaded_of_name[id]) continue;
      for (auto [di, b] : blocks_of_name[id])
        if (!deferred[di].blocks[b].loaded && rank_ok(deferred[di].rank)) fn(di, b);
    }
  }

  void load(const std::vector<uint32_t>& ids, const std::vector<uint32_t>& ranks) {
    std::map<uint32_t, std::vector<uint32_t>> todo;  // deferred shard -> blocks, in shard order
    for_each_unloaded(ids, ranks, [&](uint32_t di, uint32_t b) { todo[di].push_back(b); });
    if (todo.empty()) return;
    // Most of a shard wanted: its own index is the faster way (and gives file order).
    std::vector<uint32_t> replay;
    std::vector<std::pair<uint32_t, std::vector<uint32_t>>> blocks;  // the others
    std::size_t total = 0;  // the record table grows once for everything this load brings
    for (auto& [di, which] : todo) {
      std::sort(which.begin(), which.end());
      const Deferred& d = deferred[di];
      uint64_t want = 0, all = 0;
      for (uint32_t b : which) want += d.blocks[b].count;
      for (const Block& b : d.blocks) all += b.count;
      if (2 * want >= all) {
        replay.push_back(di);
        total += d.dir.num_frames;  // a replay reserves for every frame before it filters
      } else {
        blocks.emplace_back(di, std::move(which));
        total += want;
      }
    }
    if (rows.capacity() < rows.size() + total) {  // geometric: loads come one tensor at a time
      const std::size_t cap = std::max(rows.size() + total, rows.capacity() + rows.capacity() / 2);
      rows.reserve(cap);
      stats.reserve(cap);
    }
    try {
      for (uint32_t di : replay) {
        if (replay_deferred(di)) continue;
        std::vector<uint32_t> which;  // its own index failed: read its tensor index instead
        for (uint32_t b = 0; b < deferred[di].blocks.size(); ++b)
          if (!deferred[di].blocks[b].loaded) which.push_back(b);
        blocks.emplace_back(di, std::move(which));
      }
      // Blocks are read a batch of shards at a time on several threads (on a cold page cache
      // the disk serves them in parallel), then checked and added here in shard order.
      constexpr std::size_t kBatchBytes = 64u << 20;
      std::vector<std::vector<uint8_t>> raw;
      std::vector<char> ok;
      for (std::size_t i = 0; i < blocks.size();) {
        std::size_t e = i, bytes = 0;
        for (; e < blocks.size() && (e == i || bytes < kBatchBytes); ++e)
          for (uint32_t b : blocks[e].second)
            bytes += std::size_t{deferred[blocks[e].first].blocks[b].count} * kTensorIndexRecordSize;
        raw.resize(e - i);
        ok.assign(e - i, 0);
        parallel_for(e - i, [&](std::size_t k) {
          ok[k] = read_raw_blocks(deferred[blocks[i + k].first], blocks[i + k].second, &raw[k]);
        });
        for (std::size_t k = 0; k < e - i; ++k) {
          load_deferred(blocks[i + k].first, blocks[i + k].second, &raw[k], ok[k] != 0);
          std::vector<uint8_t>().swap(raw[k]);
        }
        i = e;
      }
    } catch (...) {
      release_load_scratch();
      finish_spans();
      throw;
    }
    release_load_scratch();
    finish_spans();
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
        if (lazy && defer(st, sh, f.fd, size, new_steps)) {
          sh.done = true;
          return;
        }
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

  /// Lists the rank directory: adds the shards not seen before.
  void list_stream(Stream& st) {
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
      shard_seq.push_back(v);
      st.shards.emplace(v, sh);
    }
  }

  /// Lazy mode, cold page cache: the few small reads each new shard needs (shard header,
  /// footer, INDEX frame header, tensor index header and directory) are made from several
  /// threads first, so that the disk serves them in parallel and the real, serial reads find
  /// them cached. Only the page cache is touched; what is read is checked again afterwards.
  void prefetch_new_shards() {
    std::vector<std::string> todo;
    for (auto& [rank, st] : streams)
      for (auto& [seq, sh] : st.shards)
        if (!sh.done && !sh.header_ok) todo.push_back(shard_paths[sh.id]);
    if (todo.size() < 16) return;  // a few reads: not worth threads
    parallel_for(todo.size(), [&](std::size_t i) {
      thread_local std::vector<uint8_t> buf;
      warm(todo[i], &buf);
    });
  }

  /// Runs fn(0..n-1) on up to 8 threads (I/O-bound work: more threads than cores keep more
  /// reads in flight); inline when n is small. fn must not throw (an exception is dropped: the
  /// serial pass after it meets the same problem and reports it).
  template <typename F>
  static void parallel_for(std::size_t n, F&& fn) {
    const std::size_t nthreads = std::min<std::size_t>(8, n / 4);
    auto guarded = [&](std::size_t i) {
      try {
        fn(i);
      } catch (...) {
      }
    };
    if (nthreads < 2) {
      for (std::size_t i = 0; i < n; ++i) guarded(i);
      return;
    }
    std::atomic<std::size_t> next{0};
    std::vector<std::thread> threads;
    for (std::size_t t = 0; t < nthreads; ++t)
      threads.emplace_back([&] {
        for (std::size_t i; (i = next.fetch_add(1)) < n;) guarded(i);
      });
    for (auto& t : threads) t.join();
  }

  static void warm(const std::string& path, std::vector<uint8_t>* buf) {
    {
      Fd f(path);
      if (f.fd < 0) return;
      const uint64_t size = file_size(f.fd, path);
      uint8_t b[kShardHeaderSize];
      if (!pread_full(f.fd, b, kShardHeaderSize, 0, path)) return;
      if (locate_shard_index(f.fd, size, path).state != ShardIndexAt::kFound) return;
    }
    const std::string tpath = tensor_index_path(path);
    Fd t(tpath);
    if (t.fd < 0) return;
    uint8_t h[kTensorIndexHeaderSize];
    const uint64_t tsize = file_size(t.fd, tpath);
    if (tsize < sizeof h || !pread_full(t.fd, h, sizeof h, 0, tpath)) return;
    uint64_t dir_len;
    std::memcpy(&dir_len, h + 48, 8);
    if (dir_len > tsize - sizeof h || dir_len > (64u << 20)) return;
    buf->resize(dir_len);
    pread_full(t.fd, buf->data(), dir_len, sizeof h, tpath);
  }

  /// Reserves the record table once for every sealed shard still to read, of every rank
  /// (their footers give the frame counts): growing it shard by shard, or rank by rank, copied
  /// the whole table each time. Not for a lazy reader: most shards will be deferred.
  void reserve_for_new_shards() {
    std::size_t frames = 0;
    for (auto& [rank, st] : streams)
      for (auto& [seq, sh] : st.shards) {
        if (sh.done || sh.header_ok) continue;
        const std::string& path = shard_paths[sh.id];
        Fd f(path);
        if (f.fd < 0) continue;
        struct stat sb;
        if (::fstat(f.fd, &sb) != 0 || static_cast<uint64_t>(sb.st_size) < kShardHeaderSize + kFooterSize)
          continue;
        uint8_t foot[kFooterSize];
        uint64_t ioff, ilen;
        uint32_t nframes;
        // A footer is not trusted yet: a frame takes >= 32 bytes plus >= 40 in the index, so a
        // count the file cannot hold is ignored here (and rejected when the index is read).
        if (pread_full(f.fd, foot, kFooterSize, static_cast<uint64_t>(sb.st_size) - kFooterSize, path) &&
            decode_footer(foot, &ioff, &ilen, &nframes) &&
            nframes <= static_cast<uint64_t>(sb.st_size) / (2 * kFrameHeaderSize))
          frames += nframes;
      }
    if (frames && rows.capacity() < rows.size() + frames) {
      rows.reserve(rows.size() + frames);
      stats.reserve(rows.size() + frames);
    }
  }

  std::size_t refresh_stream(Stream& st) {
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

RunReader::RunReader(const std::string& run_dir, bool strict, bool lazy)
    : impl_(std::make_unique<Impl>()) {
  std::error_code ec;
  if (!fs::is_directory(run_dir, ec))
    throw Error(ErrorCode::kNotFound, "[run_reader.open] no run directory at '" + run_dir + "'");
  impl_->run_dir = run_dir;
  impl_->strict = strict;
  impl_->lazy = lazy;
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
  try {
    for (auto& [rank, st] : s.streams) s.list_stream(st);
    if (s.lazy)
      s.prefetch_new_shards();
    else
      s.reserve_for_new_shards();
    for (auto& [rank, st] : s.streams) n += s.refresh_stream(st);
  } catch (...) {
    s.release_buffers();
    s.finish_spans();
    throw;
  }
  s.release_buffers();
  s.finish_spans();
  return n;
}

bool RunReader::loaded(const std::vector<uint32_t>& name_ids, const std::vector<uint32_t>& ranks) const {
  return impl_->loaded(name_ids, ranks);
}

void RunReader::load(const std::vector<uint32_t>& name_ids, const std::vector<uint32_t>& ranks) {
  std::unique_lock<std::shared_mutex> lock(impl_->mu);
  impl_->load(name_ids, ranks);
}

std::size_t RunReader::num_deferred_records() const {
  std::size_t n = 0;
  for (const auto& d : impl_->deferred)
    for (const auto& b : d.blocks)
      if (!b.loaded) n += b.count;
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
const std::vector<StepInfo>& RunReader::commits() const { return impl_->commits; }
const std::vector<std::string>& RunReader::problems() const { return impl_->problems; }
const std::string& RunReader::shard_path(uint32_t i) const { return impl_->shard_paths.at(i); }
std::size_t RunReader::num_records() const { return impl_->rows.size(); }
const RecordRow& RunReader::row(std::size_t i) const { return impl_->rows.at(i); }
const std::vector<RecordRow>& RunReader::rows() const { return impl_->rows; }
const std::vector<int64_t>& RunReader::shape(uint32_t id) const { return impl_->shapes.at(id); }

const StatsTable& RunReader::stats_table() const { return impl_->stats; }

TensorStats ScalarStats::to_stats() const {
  TensorStats s;
  s.numel = numel;
  s.nan = nan;
  s.posinf = posinf;
  s.neginf = neginf;
  s.zeros = zeros;
  s.min = min;
  s.max = max;
  s.mean = mean;
  s.m2 = m2;
  s.abs_sum = abs_sum;
  s.abs_max = abs_max;
  return s;
}

void StatsTable::reserve(std::size_t n) {
  for (auto* v : {&numel, &nan, &posinf, &neginf, &zeros}) v->reserve(n);
  for (auto* v : {&min, &max, &mean, &m2, &abs_sum, &abs_max}) v->reserve(n);
}

void StatsTable::push_back(const ScalarStats& s) {
  numel.push_back(s.numel);
  nan.push_back(s.nan);
  posinf.push_back(s.posinf);
  neginf.push_back(s.neginf);
  zeros.push_back(s.zeros);
  min.push_back(s.min);
  max.push_back(s.max);
  mean.push_back(s.mean);
  m2.push_back(s.m2);
  abs_sum.push_back(s.abs_sum);
  abs_max.push_back(s.abs_max);
}

void StatsTable::set(std::size_t i, const ScalarStats& s) {
  numel[i] = s.numel;
  nan[i] = s.nan;
  posinf[i] = s.posinf;
  neginf[i] = s.neginf;
  zeros[i] = s.zeros;
  min[i] = s.min;
  max[i] = s.max;
  mean[i] = s.mean;
  m2[i] = s.m2;
  abs_sum[i] = s.abs_sum;
  abs_max[i] = s.abs_max;
}

ScalarStats StatsTable::get(std::size_t i) const {
  ScalarStats s;
  s.numel = numel[i];
  s.nan = nan[i];
  s.posinf = posinf[i];
  s.neginf = neginf[i];
  s.zeros = zeros[i];
  s.min = min[i];
  s.max = max[i];
  s.mean = mean[i];
  s.m2 = m2[i];
  s.abs_sum = abs_sum[i];
  s.abs_max = abs_max[i];
  return s;
}

RecordInfo RunReader::record(std::size_t i) const {
  const RecordRow& w = impl_->rows.at(i);
  RecordInfo r;
  r.name_id = w.name_id;
  r.rank = w.rank;
  r.step = w.step;
  r.mode_step = w.mode_step;
  r.mode = w.mode;
  r.dtype = w.dtype;
  r.codec = w.codec;
  r.flags = w.flags;
  r.shape = impl_->shapes[w.shape_id];
  r.raw_nbytes = w.raw_nbytes;
  r.wall_time = w.wall_time;
  r.shard = w.shard;
  r.frame_offset = w.frame_offset;
  r.meta_crc = w.meta_crc;
  r.payload_offset = w.frame_offset + kFrameHeaderSize + w.meta_len;
  r.payload_len = w.payload_len;
  r.payload_crc = w.payload_crc;
  r.stats = impl_->stats.get(i).to_stats();
  r.hists_elided = w.hists;
  return r;
}

int64_t RunReader::find_index(uint32_t name_id, int64_t step, uint32_t rank) const {
  return impl_->find(name_id, step, rank);
}

std::optional<RecordInfo> RunReader::find(uint32_t name_id, int64_t step, uint32_t rank) const {
  int64_t i = impl_->find(name_id, step, rank);
  if (i < 0) return std::nullopt;
  return record(static_cast<std::size_t>(i));
}

std::vector<std::size_t> RunReader::select(const Selection& sel) const {
  const auto& rows = impl_->rows;
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
  if (!sel.name_ids.empty()) {
    // By (name, rank) series: the cost follows the records selected, not the table.
    for (std::size_t k = 0; k < sel.name_ids.size(); ++k) {
      const uint32_t id = sel.name_ids[k];
      if (id >= impl_->series_of_name.size()) continue;
      if (std::find(sel.name_ids.begin(), sel.name_ids.begin() + static_cast<std::ptrdiff_t>(k), id) !=
          sel.name_ids.begin() + static_cast<std::ptrdiff_t>(k))
        continue;  // listed twice
      for (const auto& [rank, sid] : impl_->series_of_name[id]) {
        if (!sel.ranks.empty() && (rank >= want_rank.size() || !want_rank[rank])) continue;
        const auto& sv = impl_->series[sid];
        auto lo = std::lower_bound(sv.begin(), sv.end(), sel.step_min,
                                   [&](uint32_t i, int64_t s) { return rows[i].step < s; });
        for (auto it = lo; it != sv.end() && rows[*it].step <= sel.step_max; ++it)
          if (sel.mode < 0 || static_cast<int>(rows[*it].mode) == sel.mode) out.push_back(*it);
      }
    }
    std::sort(out.begin(), out.end());
    return out;
  }
  auto take = [&](std::size_t i) {
    const RecordRow& r = rows[i];
    if (!sel.name_ids.empty() && (r.name_id >= want_name.size() || !want_name[r.name_id])) return;
    if (!sel.ranks.empty() && (r.rank >= want_rank.size() || !want_rank[r.rank])) return;
    if (r.step < sel.step_min || r.step > sel.step_max) return;
    if (sel.mode >= 0 && static_cast<int>(r.mode) != sel.mode) return;
    out.push_back(i);
  };
  if ((sel.step_min == INT64_MIN && sel.step_max == INT64_MAX) || impl_->spans_stale) {
    for (std::size_t i = 0; i < rows.size(); ++i) take(i);
    return out;
  }
  const auto& spans = impl_->spans;
  auto lo = std::lower_bound(spans.begin(), spans.end(), sel.step_min,
                             [](const Span& x, int64_t s) { return x.step < s; });
  auto hi = std::upper_bound(lo, spans.end(), sel.step_max,
                             [](int64_t s, const Span& x) { return s < x.step; });
  std::vector<Span> hit(lo, hi);
  // Table order: spans of several ranks interleave by step but not by row.
  if (!std::is_sorted(hit.begin(), hit.end(),
                      [](const Span& a, const Span& b) { return a.first < b.first; }))
    std::sort(hit.begin(), hit.end(), [](const Span& a, const Span& b) { return a.first < b.first; });
  for (const Span& sp : hit)
    for (std::size_t i = sp.first; i < static_cast<std::size_t>(sp.first) + sp.count; ++i) take(i);
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
  TensorMetaView m;
  decode_tensor_meta_view(meta.data(), meta.size(), where, &m);
  m.stats.copy_to(&rec.stats, /*with_hists=*/true);
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
