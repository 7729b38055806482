#include "tensorvigil/store/stream_writer.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <climits>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "tensorvigil/error.h"
#include "tensorvigil/store/codec.h"
#include "tensorvigil/store/crc32c.h"
#include "tensorvigil/store/tensor_index.h"

namespace fs = std::filesystem;

namespace tensorvigil::store {

namespace {

double now_seconds() {
  using namespace std::chrono;
  return duration<double>(system_clock::now().time_since_epoch()).count();
}

std::string os_error(const std::string& op, const std::string& path, int err) {
  return "[stream_writer." + op + "] '" + path + "': " + std::strerror(err);
}

/// Test-only fault injection, off unless TENSORVIGIL_FAULTS is set (docs/RELIABILITY.md):
/// "fail_after_bytes=N" makes shard writes past N bytes (per writer) fail with "errno=EIO"
/// (default) or ENOSPC, after a partial write as a full disk does; "delay_ms=D" sleeps D ms
/// before each write (a slow disk).
struct Faults {
  bool on = false;
  uint64_t fail_after = UINT64_MAX;
  int err = EIO;
  int delay_ms = 0;
  uint64_t written = 0;  // I/O thread only

  static Faults from_env() {
    Faults f;
    const char* spec = std::getenv("TENSORVIGIL_FAULTS");
    if (!spec || !*spec) return f;
    f.on = true;
    std::string s(spec);
    std::size_t pos = 0;
    while (pos <= s.size()) {
      std::size_t end = s.find(',', pos);
      if (end == std::string::npos) end = s.size();
      std::string item = s.substr(pos, end - pos);
      pos = end + 1;
      if (item.empty()) continue;
      std::size_t eq = item.find('=');
      std::string key = item.substr(0, eq), val = eq == std::string::npos ? "" : item.substr(eq + 1);
      char* stop = nullptr;
      unsigned long long num = std::strtoull(val.c_str(), &stop, 10);
      bool is_num = !val.empty() && stop && *stop == '\0';
      if (key == "fail_after_bytes" && is_num) {
        f.fail_after = num;
      } else if (key == "delay_ms" && is_num && num <= 60000) {
        f.delay_ms = static_cast<int>(num);
      } else if (key == "errno" && (val == "EIO" || val == "ENOSPC")) {
        f.err = val == "EIO" ? EIO : ENOSPC;
      } else {
        throw_error(ErrorCode::kInvalidArgument,
                    "[stream_writer] bad TENSORVIGIL_FAULTS item '" + item +
                        "' (expected fail_after_bytes=N, errno=EIO|ENOSPC, delay_ms=N)");
      }
    }
    return f;
  }
};

/// Reusable, uninitialised byte buffers: fresh memory is expensive to touch for the first time.
class BufferPool {
 public:
  struct Buffer {
    std::unique_ptr<uint8_t[]> data;
    std::size_t cap = 0;
  };
  explicit BufferPool(uint64_t max_cached) : max_cached_(max_cached) {}

  Buffer acquire(std::size_t n) {
    if (n == 0) return {};
    std::lock_guard<std::mutex> lk(mu_);
    auto it = free_.lower_bound(n);
    if (it != free_.end() && it->first <= 2 * n + (1u << 20)) {
      Buffer b = std::move(it->second);
      cached_ -= b.cap;
      free_.erase(it);
      return b;
    }
    std::size_t cap = (n + 65535) & ~std::size_t{65535};
    // Free cached buffers before growing: held memory stays near max_pending_bytes.
    while (!free_.empty() && held_ + cap > max_cached_) {
      auto victim = free_.begin();
      cached_ -= victim->first;
      held_ -= victim->first;
      free_.erase(victim);
    }
    held_ += cap;
    return Buffer{std::unique_ptr<uint8_t[]>(new uint8_t[cap]), cap};
  }
  void release(Buffer b) {
    if (!b.data) return;
    std::lock_guard<std::mutex> lk(mu_);
    // Cache only while everything held (in use + cached) fits max_pending_bytes. Evict the
    // smallest cached buffers first; keep big ones, they are the costly ones.
    while (!free_.empty() && held_ > max_cached_) {
      auto it = free_.begin();
      cached_ -= it->first;
      held_ -= it->first;
      free_.erase(it);
    }
    if (held_ > max_cached_) {
      held_ -= b.cap;
      return;
    }
    cached_ += b.cap;
    free_.emplace(b.cap, std::move(b));
  }
  uint64_t held() {
    std::lock_guard<std::mutex> lk(mu_);
    return held_;
  }

 private:
  std::mutex mu_;
  std::multimap<std::size_t, Buffer> free_;
  uint64_t cached_ = 0;
  uint64_t held_ = 0;
  uint64_t max_cached_;
};

struct Job {
  FrameKind kind = FrameKind::kTensor;
  uint16_t flags = 0;
  Codec codec = Codec::kRaw;
  std::vector<uint8_t> meta;  // encoded once stats are known
  TensorMeta tmeta;
  CommitMeta cmeta;  // commit jobs: encoded by the I/O thread, which knows num_tensors
  bool need_stats = false;
  StatsOptions sopt;
  BufferPool::Buffer raw;
  BufferPool::Buffer out;
  std::size_t elem = 1, nch = 0, chunk = 0, bound = 0;
  std::vector<uint32_t> clen, ccrc;
  std::atomic<std::size_t> remaining{0};
  bool sync_only = false;  // not a frame: fsync the open shard (flush(sync=true))
  bool ready = false;  // guarded by Impl::mu_
  uint64_t reserved = 0;
  std::exception_ptr error;
};

}  // namespace

struct StreamWriter::Impl {
  WriterOptions opt;
  std::string run_dir, dir;
  uint32_t rank;
  int lock_fd = -1;
  Faults faults;

  mutable std::mutex mu;
  std::condition_variable cv_io, cv_enc, cv_space, cv_idle;
  std::deque<std::unique_ptr<Job>> jobs;               // submission order
  std::deque<std::pair<Job*, std::size_t>> tasks;      // (job, task index; nch = stats task)
  std::vector<std::thread> encoders;
  std::thread io;
  bool stopping = false, closed = false;
  std::exception_ptr failure;
  uint64_t pending = 0;
  WriterCounters ctr;    // guarded by mu
  WriterCounters delta;  // I/O thread's counts not yet folded into ctr
  BufferPool pool;

  // Shard state (I/O thread only, except at construction/close).
  int fd = -1;
  uint32_t seq = 0;
  std::string shard_path;
  uint64_t shard_off = 0;
  double shard_opened = 0;
  // Tensor frames in the open shard whose step has no commit yet, by step. A shard only rolls
  // when this is empty: readers drop uncommitted frames when a shard ends.
  std::map<int64_t, uint32_t> uncommitted;
  uint64_t shard_commits = 0;
  std::vector<IndexEntry> index;
  uint64_t total_commits = 0;

  Impl(const WriterOptions& o) : opt(o), pool(o.max_pending_bytes) {}

  void check_failed() {
    if (failure) std::rethrow_exception(failure);
  }

  // --- file I/O (I/O thread) ---
  ssize_t faulty_writev(const struct iovec* v, int cnt) {
    if (faults.delay_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(faults.delay_ms));
    uint64_t allow = faults.fail_after > faults.written ? faults.fail_after - faults.written : 0;
    if (allow == 0) {
      errno = faults.err;
      return -1;
    }
    std::vector<struct iovec> t;
    uint64_t sum = 0;
    for (int k = 0; k < cnt && sum < allow; ++k) {
      struct iovec e = v[k];
      if (e.iov_len > allow - sum) e.iov_len = static_cast<std::size_t>(allow - sum);
      t.push_back(e);
      sum += e.iov_len;
    }
    ssize_t w = ::writev(fd, t.data(), static_cast<int>(t.size()));
    if (w > 0) faults.written += static_cast<uint64_t>(w);
    return w;
  }

  void write_all(const struct iovec* iov, int n) {
    std::vector<struct iovec> v(iov, iov + n);
    std::size_t i = 0;
    while (i < v.size()) {
      int cnt = static_cast<int>(std::min<std::size_t>(v.size() - i, IOV_MAX));
      ssize_t w = faults.on ? faulty_writev(v.data() + i, cnt) : ::writev(fd, v.data() + i, cnt);
      if (w < 0) {
        if (errno == EINTR) continue;
        throw Error(ErrorCode::kIo, os_error("write", shard_path, errno));
      }
      shard_off += static_cast<uint64_t>(w);
      delta.file_bytes += static_cast<uint64_t>(w);
      std::size_t left = static_cast<std::size_t>(w);
      while (i < v.size() && left >= v[i].iov_len) left -= v[i++].iov_len;
      if (left) {
        v[i].iov_base = static_cast<uint8_t*>(v[i].iov_base) + left;
        v[i].iov_len -= left;
      }
    }
  }

  // Frames are queued as iovecs and written with as few writev calls as possible; the queued
  // memory (job metas and buffers, the headers and tables below) lives until flush_batch().
  std::vector<struct iovec> batch_iov;
  std::deque<std::array<uint8_t, kFrameHeaderSize>> batch_hdr;
  std::deque<std::vector<uint8_t>> batch_bufs;
  uint64_t batch_bytes = 0;

  uint64_t cur_off() const { return shard_off + batch_bytes; }
  void queue(const void* p, std::size_t n) {
    if (!n) return;
    batch_iov.push_back({const_cast<void*>(p), n});
    batch_bytes += n;
  }
  void flush_batch() {
    if (!batch_iov.empty()) write_all(batch_iov.data(), static_cast<int>(batch_iov.size()));
    drop_batch();
  }
  void drop_batch() {
    batch_iov.clear();
    batch_hdr.clear();
    batch_bufs.clear();
    batch_bytes = 0;
  }

  void open_shard() {
    if (seq > 99999999u)
      throw Error(ErrorCode::kFailedPrecondition,
                  "[stream_writer.open] rank " + std::to_string(rank) + " has 10^8 shards already");
    shard_path = dir + "/" + shard_file_name(seq);
    fd = ::open(shard_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) throw Error(ErrorCode::kIo, os_error("open", shard_path, errno));
    shard_off = 0;
    auto& h = batch_hdr.emplace_back();
    encode_shard_header(h.data(), rank, seq);
    queue(h.data(), kShardHeaderSize);
    shard_opened = now_seconds();
    uncommitted.clear();
    shard_commits = 0;
    index.clear();
    ++delta.shards;
  }

  /// Queues one frame; `meta` and the payload memory must live until flush_batch().
  void write_frame(FrameHeader& h, const std::vector<uint8_t>& meta,
                   const std::vector<struct iovec>& payload) {
    h.meta_len = static_cast<uint32_t>(meta.size());
    h.meta_crc = crc32c(meta.data(), meta.size());
    auto& hb = batch_hdr.emplace_back();
    encode_frame_header(hb.data(), h);
    uint64_t at = cur_off();
    queue(hb.data(), kFrameHeaderSize);
    queue(meta.data(), meta.size());
    for (const auto& p : payload) queue(p.iov_base, p.iov_len);
    if (h.kind != FrameKind::kIndex) index.push_back(IndexEntry{at, h, meta});
  }

  void seal_shard(bool end_of_stream) {
    if (fd < 0) return;
    if (end_of_stream) {
      FrameHeader h;
      h.kind = FrameKind::kEnd;
      write_frame(h, batch_bufs.emplace_back(encode_end_meta(now_seconds(), total_commits)), {});
    }
    FrameHeader h;
    h.kind = FrameKind::kIndex;
    uint64_t at = cur_off();
    const auto& imeta = batch_bufs.emplace_back(encode_index_meta(index));
    write_frame(h, imeta, {});
    auto& foot = batch_bufs.emplace_back(kFooterSize);
    encode_footer(foot.data(), at, cur_off() - at, static_cast<uint32_t>(index.size()));
    queue(foot.data(), kFooterSize);
    std::vector<uint8_t> tindex = opt.tensor_index ? tensor_index_bytes(imeta, h.meta_crc) : std::vector<uint8_t>{};
    flush_batch();
    if (opt.fsync && ::fsync(fd) != 0) throw Error(ErrorCode::kIo, os_error("fsync", shard_path, errno));
    ::close(fd);
    fd = -1;
    // After the shard is sealed: a tensor index never describes a shard that is not.
    if (!tindex.empty()) write_tensor_index_file(tensor_index_path(shard_path), tindex);
    ++seq;
  }

  /// The tensor index (FORMAT.md §3.8) of the shard being sealed, built from its index meta
  /// with the reader's rules; empty if that fails (the file is optional, the shard is not).
  std::vector<uint8_t> tensor_index_bytes(const std::vector<uint8_t>& imeta, uint32_t index_crc) {
    try {
      return encode_tensor_index(build_tensor_table(rank, seq, cur_off(), index_crc, imeta.data(),
                                                    imeta.size(), "stream_writer " + shard_path));
    } catch (const std::exception&) {
      return {};
    }
  }

  void write_job(Job& j) {
    FrameHeader h;
    h.kind = j.kind;
    h.flags = j.flags;
    if (j.kind != FrameKind::kTensor) {
      if (j.kind == FrameKind::kCommit) {
        auto it = uncommitted.find(j.cmeta.step);
        if (it != uncommitted.end()) {
          j.cmeta.num_tensors = it->second;
          uncommitted.erase(it);
        }
        j.meta = encode_commit_meta(j.cmeta);
      }
      write_frame(h, j.meta, {});
      if (j.kind == FrameKind::kCommit) {
        ++shard_commits;
        ++total_commits;
        ++delta.commits;
      }
      return;
    }
    h.codec = j.codec;
    std::vector<struct iovec> payload;
    if (j.nch > 0) {
      std::vector<uint8_t>& table = batch_bufs.emplace_back(container_header_size(j.nch));
      uint32_t cs = static_cast<uint32_t>(j.chunk), nc = static_cast<uint32_t>(j.nch);
      std::memcpy(table.data(), &cs, 4);
      std::memcpy(table.data() + 4, &nc, 4);
      payload.push_back({table.data(), table.size()});
      for (std::size_t i = 0; i < j.nch; ++i) {
        std::memcpy(table.data() + 8 + 8 * i, &j.clen[i], 4);
        std::memcpy(table.data() + 12 + 8 * i, &j.ccrc[i], 4);
        uint8_t* src = j.codec == Codec::kRaw ? j.raw.data.get() + i * j.chunk
                                              : j.out.data.get() + i * j.bound;
        payload.push_back({src, j.clen[i]});
      }
      h.payload_crc = crc32c(table.data(), table.size());
      uint64_t stored = table.size();
      for (auto c : j.clen) stored += c;
      h.payload_len = stored;
      delta.raw_bytes += j.tmeta.raw_nbytes;
      delta.stored_bytes += stored;
    }
    write_frame(h, j.meta, payload);
    ++uncommitted[j.tmeta.step];
    ++delta.tensors;
  }

  void fold_delta() {  // requires mu
    ctr.tensors += delta.tensors;
    ctr.commits += delta.commits;
    ctr.raw_bytes += delta.raw_bytes;
    ctr.stored_bytes += delta.stored_bytes;
    ctr.file_bytes += delta.file_bytes;
    ctr.shards += delta.shards;
    delta = WriterCounters{};
  }

  bool roll_due() const {
    if (fd < 0 || !uncommitted.empty() || shard_commits == 0) return false;
    return cur_off() >= opt.roll_bytes || now_seconds() - shard_opened >= opt.roll_seconds;
  }

  void io_loop() {
    std::unique_lock<std::mutex> lk(mu);
    for (;;) {
      auto wait_for = std::chrono::duration<double>(opt.roll_seconds > 0 ? opt.roll_seconds : 1.0);
      cv_io.wait_for(lk, wait_for, [&] {
        return (stopping && jobs.empty()) || (!jobs.empty() && jobs.front()->ready);
      });
      if (!jobs.empty() && jobs.front()->ready) {
        // Take every ready job at the front: one writev for many small frames.
        std::vector<std::unique_ptr<Job>> batch;
        while (!jobs.empty() && jobs.front()->ready && batch.size() < 4096) {
          batch.push_back(std::move(jobs.front()));
          jobs.pop_front();
        }
        lk.unlock();
        std::exception_ptr err;
        for (auto& j : batch) {
          if (j->error && !err) err = j->error;
          if (err || failure) break;
          try {
            if (j->sync_only) {
              flush_batch();
              if (fd >= 0 && ::fsync(fd) != 0)
                throw Error(ErrorCode::kIo, os_error("fsync", shard_path, errno));
            } else {
              if (fd < 0) open_shard();
              write_job(*j);
              if (j->kind == FrameKind::kCommit && roll_due()) seal_shard(false);
            }
          } catch (...) {
            err = std::current_exception();
          }
        }
        if (!err && !failure) {
          try {
            flush_batch();
          } catch (...) {
            err = std::current_exception();
          }
        }
        if (err || failure) drop_batch();  // its iovecs point into the jobs released below
        uint64_t reserved = 0;
        for (auto& j : batch) {
          reserved += j->reserved;
          pool.release(std::move(j->raw));
          pool.release(std::move(j->out));
        }
        batch.clear();
        lk.lock();
        fold_delta();
        if (err && !failure) failure = err;
        pending -= reserved;
        cv_space.notify_all();
        if (jobs.empty()) cv_idle.notify_all();
        continue;
      }
      if (stopping && jobs.empty()) return;
      // Woken by the timer: roll an idle shard so readers of sealed shards catch up.
      if (jobs.empty() && !failure && roll_due()) {
        lk.unlock();
        std::exception_ptr err;
        try {
          seal_shard(false);
        } catch (...) {
          err = std::current_exception();
        }
        lk.lock();
        fold_delta();
        if (err && !failure) failure = err;
      }
    }
  }

  void run_task(Job& j, std::size_t t) {
    try {
      if (t == j.nch) {  // statistics task
        TensorView v;
        v.data = j.raw.data.get();
        v.dtype = j.tmeta.dtype;
        v.shape = j.tmeta.shape;
        StatsOptions so = j.sopt;
        so.num_threads = 1;
        j.tmeta.stats = compute_stats(v, so);
      } else {
        std::size_t len = t + 1 < j.nch ? j.chunk : j.tmeta.raw_nbytes - t * j.chunk;
        const uint8_t* src = j.raw.data.get() + t * j.chunk;
        if (j.codec == Codec::kRaw) {
          j.clen[t] = static_cast<uint32_t>(len);
          j.ccrc[t] = crc32c(src, len);
        } else {
          uint8_t* dst = j.out.data.get() + t * j.bound;
          std::size_t s = encode_chunk(j.codec, src, len, j.elem, opt.level, dst);
          j.clen[t] = static_cast<uint32_t>(s);
          j.ccrc[t] = crc32c(dst, s);
        }
      }
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu);
      if (!j.error) j.error = std::current_exception();
    }
    if (j.remaining.fetch_sub(1) == 1) {
      if (!j.error) {
        try {
          j.meta = encode_tensor_meta(j.tmeta);
        } catch (...) {
          j.error = std::current_exception();
        }
      }
      std::lock_guard<std::mutex> lk(mu);
      j.ready = true;
      cv_io.notify_all();
    }
  }

  void encoder_loop() {
    std::unique_lock<std::mutex> lk(mu);
    for (;;) {
      cv_enc.wait(lk, [&] { return stopping || !tasks.empty(); });
      if (tasks.empty()) {
        if (stopping) return;
        continue;
      }
      auto [j, t] = tasks.front();
      tasks.pop_front();
      lk.unlock();
      run_task(*j, t);
      lk.lock();
    }
  }

  void enqueue_ready(std::unique_ptr<Job> j) {
    std::lock_guard<std::mutex> lk(mu);
    j->ready = true;
    jobs.push_back(std::move(j));
    cv_io.notify_all();
  }
};

StreamWriter::StreamWriter(const std::string& run_dir, uint32_t rank, const WriterOptions& options)
    : impl_(std::make_unique<Impl>(options)) {
  Impl& s = *impl_;
  if (options.threads < 1 || options.threads > 256)
    throw_error(ErrorCode::kInvalidArgument, "[stream_writer] threads must be in [1, 256]");
  if (options.chunk_size < 4096 || options.chunk_size > kMaxChunkSize)
    throw_error(ErrorCode::kInvalidArgument,
                "[stream_writer] chunk_size must be in [4096, " + std::to_string(kMaxChunkSize) + "]");
  if (options.max_pending_bytes == 0)
    throw_error(ErrorCode::kInvalidArgument, "[stream_writer] max_pending_bytes must be > 0");
  if (rank > 99999)
    throw_error(ErrorCode::kInvalidArgument,
                "[stream_writer] rank must be <= 99999 (rank-NNNNN directories), got " +
                    std::to_string(rank));
  s.faults = Faults::from_env();
  s.run_dir = run_dir;
  s.rank = rank;
  s.dir = run_dir + "/" + rank_dir_name(rank);
  std::error_code ec;
  fs::create_directories(s.dir, ec);
  if (ec) throw Error(ErrorCode::kIo, "[stream_writer.open] cannot create '" + s.dir + "': " + ec.message());
  std::string lock_path = s.dir + "/writer.lock";
  s.lock_fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (s.lock_fd < 0) throw Error(ErrorCode::kIo, os_error("open", lock_path, errno));
  // Readers probe liveness with a momentary shared lock (FORMAT.md §3.6): retry for ~0.2 s so
  // a probe never refuses a writer; a live writer holds the lock for good.
  int lock_rc = -1, e = 0;
  for (int attempt = 0; attempt < 100; ++attempt) {
    lock_rc = ::flock(s.lock_fd, LOCK_EX | LOCK_NB);
    e = errno;
    if (lock_rc == 0 || e != EWOULDBLOCK) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  if (lock_rc != 0) {
    ::close(s.lock_fd);
    if (e == EWOULDBLOCK)
      throw Error(ErrorCode::kFailedPrecondition,
                  "[stream_writer.open] another writer holds the stream of rank " +
                      std::to_string(rank) + " in '" + run_dir + "' (" + lock_path +
                      "; or `tensorvigil fsck --repair` is repairing it)");
    throw Error(ErrorCode::kIo, os_error("lock", lock_path, e));
  }
  // Continue after the shards of a previous writer of this rank.
  uint32_t next = 0;
  for (const auto& entry : fs::directory_iterator(s.dir, ec)) {
    std::string n = entry.path().filename().string();
    unsigned v;
    if (n.size() == 18 && std::sscanf(n.c_str(), "shard-%8u.tvs", &v) == 1 && v + 1 > next) next = v + 1;
  }
  s.seq = next;
  for (int i = 0; i < options.threads; ++i) s.encoders.emplace_back([&s] { s.encoder_loop(); });
  s.io = std::thread([&s] { s.io_loop(); });
}

StreamWriter::~StreamWriter() {
  try {
    close();
  } catch (...) {
  }
}

void StreamWriter::write_tensor(const std::string& name, int64_t step, Mode mode,
                                int64_t mode_step, const TensorView& view, bool stats_only,
                                const StatsOptions& stats_options, std::optional<Codec> codec,
                                const TensorStats* stats) {
  Impl& s = *impl_;
  if (name.empty() || name.size() > kMaxNameLen)
    throw_error(ErrorCode::kInvalidArgument, "[stream_writer.write] tensor name must have 1.." +
                                                 std::to_string(kMaxNameLen) + " bytes");
  if (step < 0 || mode_step < 0)
    throw_error(ErrorCode::kInvalidArgument,
                "[stream_writer.write] step must be >= 0, got " + std::to_string(step < 0 ? step : mode_step));
  if (static_cast<uint8_t>(mode) > static_cast<uint8_t>(Mode::kGlobal))
    throw_error(ErrorCode::kInvalidArgument, "[stream_writer.write] unknown mode");
  if (view.shape.size() > kMaxNdim)
    throw_error(ErrorCode::kInvalidArgument, "[stream_writer.write] more than 32 dimensions");
  for (int64_t d : view.shape)
    if (d < 0) throw_error(ErrorCode::kInvalidArgument, "[stream_writer.write] negative dimension");
  if (view.device != DeviceType::kCpu)
    throw_error(ErrorCode::kInvalidArgument,
                "[stream_writer.write] the view must be in host memory; copy device tensors first");
  {
    std::lock_guard<std::mutex> lk(s.mu);
    if (s.closed) throw_error(ErrorCode::kFailedPrecondition, "[stream_writer.write] writer is closed");
    s.check_failed();
  }
  auto j = std::make_unique<Job>();
  j->tmeta.name = name;
  j->tmeta.step = step;
  j->tmeta.mode = mode;
  j->tmeta.mode_step = mode_step;
  j->tmeta.dtype = view.dtype;
  j->tmeta.shape = view.shape;
  j->tmeta.raw_nbytes = view.nbytes();
  j->tmeta.wall_time = now_seconds();
  j->elem = dtype_size(view.dtype);
  j->codec = codec ? *codec : (dtype_is_float(view.dtype) ? s.opt.codec : s.opt.int_codec);
  const uint64_t nbytes = j->tmeta.raw_nbytes;

  auto finish_sync = [&](uint16_t flag) {
    j->flags = flag;
    j->codec = Codec::kRaw;
    j->nch = 0;  // no payload
    j->tmeta.stats = stats ? *stats : compute_stats(view, stats_options);
    j->meta = encode_tensor_meta(j->tmeta);
    s.enqueue_ready(std::move(j));
  };
  if (stats_only) return finish_sync(kFlagStatsOnly);

  j->chunk = s.opt.chunk_size - s.opt.chunk_size % j->elem;
  j->nch = num_chunks_for(nbytes, j->chunk);
  j->bound = j->codec == Codec::kRaw ? 0 : chunk_bound(j->codec, j->chunk, j->elem);
  uint64_t need = nbytes + j->nch * j->bound;
  {
    std::unique_lock<std::mutex> lk(s.mu);
    auto fits = [&] { return s.pending == 0 || s.pending + need <= s.opt.max_pending_bytes; };
    if (!fits()) {
      if (s.opt.policy == PendingPolicy::kSkip) {
        ++s.ctr.dropped;
        lk.unlock();
        return finish_sync(kFlagDropped);
      }
      s.cv_space.wait(lk, [&] { return fits() || s.failure != nullptr; });
      s.check_failed();
    }
    s.pending += need;
    s.ctr.peak_pending_bytes = std::max(s.ctr.peak_pending_bytes, s.pending);
  }
  j->reserved = need;
  j->raw = s.pool.acquire(nbytes);
  if (j->bound) j->out = s.pool.acquire(j->nch * j->bound);
  if (nbytes) std::memcpy(j->raw.data.get(), view.data, nbytes);
  j->clen.assign(j->nch, 0);
  j->ccrc.assign(j->nch, 0);
  j->need_stats = stats == nullptr;
  if (stats) j->tmeta.stats = *stats;
  j->sopt = stats_options;
  std::size_t ntasks = j->nch + (j->need_stats ? 1 : 0);
  if (ntasks == 0) {
    j->meta = encode_tensor_meta(j->tmeta);
    return s.enqueue_ready(std::move(j));
  }
  j->remaining.store(ntasks);
  Job* raw = j.get();
  std::lock_guard<std::mutex> lk(s.mu);
  s.jobs.push_back(std::move(j));
  if (raw->need_stats) s.tasks.emplace_back(raw, raw->nch);  // statistics first: it is the longest
  for (std::size_t t = 0; t < raw->nch; ++t) s.tasks.emplace_back(raw, t);
  s.cv_enc.notify_all();
}

void StreamWriter::write_dropped(const std::string& name, int64_t step, Mode mode,
                                 int64_t mode_step, DType dtype, const std::vector<int64_t>& shape,
                                 const TensorStats& stats) {
  Impl& s = *impl_;
  if (name.empty() || name.size() > kMaxNameLen)
    throw_error(ErrorCode::kInvalidArgument, "[stream_writer.write] tensor name must have 1.." +
                                                 std::to_string(kMaxNameLen) + " bytes");
  if (step < 0 || mode_step < 0)
    throw_error(ErrorCode::kInvalidArgument, "[stream_writer.write] step must be >= 0");
  if (static_cast<uint8_t>(mode) > static_cast<uint8_t>(Mode::kGlobal))
    throw_error(ErrorCode::kInvalidArgument, "[stream_writer.write] unknown mode");
  if (shape.size() > kMaxNdim)
    throw_error(ErrorCode::kInvalidArgument, "[stream_writer.write] more than 32 dimensions");
  for (int64_t d : shape)
    if (d < 0) throw_error(ErrorCode::kInvalidArgument, "[stream_writer.write] negative dimension");
  {
    std::lock_guard<std::mutex> lk(s.mu);
    if (s.closed) throw_error(ErrorCode::kFailedPrecondition, "[stream_writer.write] writer is closed");
    s.check_failed();
    ++s.ctr.dropped;
  }
  auto j = std::make_unique<Job>();
  j->tmeta.name = name;
  j->tmeta.step = step;
  j->tmeta.mode = mode;
  j->tmeta.mode_step = mode_step;
  j->tmeta.dtype = dtype;
  j->tmeta.shape = shape;
  TensorView v;
  v.dtype = dtype;
  v.shape = shape;
  j->tmeta.raw_nbytes = v.nbytes();
  j->tmeta.wall_time = now_seconds();
  j->tmeta.stats = stats;
  j->flags = kFlagDropped;
  j->codec = Codec::kRaw;
  j->meta = encode_tensor_meta(j->tmeta);
  s.enqueue_ready(std::move(j));
}

void StreamWriter::commit_step(int64_t step, Mode mode, int64_t mode_step) {
  Impl& s = *impl_;
  if (step < 0 || mode_step < 0)
    throw_error(ErrorCode::kInvalidArgument, "[stream_writer.commit] step must be >= 0");
  {
    std::lock_guard<std::mutex> lk(s.mu);
    if (s.closed) throw_error(ErrorCode::kFailedPrecondition, "[stream_writer.commit] writer is closed");
    s.check_failed();
  }
  auto j = std::make_unique<Job>();
  j->kind = FrameKind::kCommit;
  j->cmeta.step = step;
  j->cmeta.mode = mode;
  j->cmeta.mode_step = mode_step;
  j->cmeta.wall_time = now_seconds();
  s.enqueue_ready(std::move(j));
}

void StreamWriter::flush(bool sync) {
  Impl& s = *impl_;
  if (sync) {
    auto j = std::make_unique<Job>();
    j->sync_only = true;
    s.enqueue_ready(std::move(j));
  }
  std::unique_lock<std::mutex> lk(s.mu);
  s.cv_idle.wait(lk, [&] { return s.jobs.empty(); });
  s.check_failed();
}

void StreamWriter::close() {
  Impl& s = *impl_;
  {
    std::unique_lock<std::mutex> lk(s.mu);
    if (s.closed) {
      return;
    }
    s.closed = true;
    s.cv_idle.wait(lk, [&] { return s.jobs.empty(); });
    s.stopping = true;
  }
  s.cv_enc.notify_all();
  s.cv_io.notify_all();
  for (auto& t : s.encoders) t.join();
  if (s.io.joinable()) s.io.join();
  std::exception_ptr err = s.failure;
  if (!err) {
    try {
      if (s.fd < 0) s.open_shard();  // an empty stream still records that it ended
      s.seal_shard(true);
    } catch (...) {
      err = std::current_exception();
    }
  }
  if (s.fd >= 0) ::close(s.fd);
  s.fd = -1;
  {
    std::lock_guard<std::mutex> lk(s.mu);
    s.fold_delta();
    if (err && !s.failure) s.failure = err;
  }
  if (s.lock_fd >= 0) {
    ::flock(s.lock_fd, LOCK_UN);
    ::close(s.lock_fd);
    s.lock_fd = -1;
  }
  if (err) std::rethrow_exception(err);
}

bool StreamWriter::closed() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->closed;
}

WriterCounters StreamWriter::counters() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  WriterCounters c = impl_->ctr;
  c.pending_bytes = impl_->pending;
  c.pool_bytes = impl_->pool.held();
  return c;
}

const WriterOptions& StreamWriter::options() const { return impl_->opt; }

const std::string& StreamWriter::path() const { return impl_->dir; }

}  // namespace tensorvigil::store
