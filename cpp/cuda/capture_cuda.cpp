// GpuCapture: statistics on the device, payloads through a pinned staging ring on a side
// stream, a native thread that hands both to the StreamWriter in submission order.
#include <cuda_runtime_api.h>

#include <condition_variable>
#include <deque>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>

#include "cuda_util.h"
#include "tensorvigil/cuda_capture.h"
#include "tensorvigil/error.h"
#include "tensorvigil/stats/reduce_cuda.h"

namespace tensorvigil {

using internal::cuda_check;
using store::Mode;

namespace {

constexpr const char* kOp = "gpu_capture";
constexpr std::size_t kAlign = 256;

struct Region {
  std::size_t off = 0, len = 0;
};

struct ItemRec {
  std::string name;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  std::size_t index = 0;     // in the stats job
  bool stats_only = false;
  bool dropped = false;
  uint8_t* host = nullptr;   // payload in pinned memory
  std::size_t nbytes = 0;
  bool in_ring = false;      // else a one-off pinned buffer (when host != nullptr)
};

struct Op {
  bool commit = false;
  int64_t step = 0, mode_step = 0;
  Mode mode = Mode::kTrain;
  std::shared_ptr<CudaPendingStats> stats;
  std::vector<ItemRec> items;
  cudaEvent_t copied = nullptr;  // side-stream copies of these items done
};

}  // namespace

struct GpuCapture::Impl {
  store::StreamWriter* writer = nullptr;
  uint64_t capacity = 0;
  bool skip = false;

  int device = -1;
  cudaStream_t side = nullptr;
  uint8_t* ring = nullptr;  // pinned, `capacity` bytes, allocated on the first payload
  std::deque<Region> used;  // FIFO: allocations in submit order, released in the same order

  std::mutex mu;
  std::condition_variable cv_work, cv_space, cv_idle;
  std::deque<std::unique_ptr<Op>> ops;
  bool busy = false, stopping = false, closed = false;
  std::exception_ptr failure;
  GpuCaptureCounters ctr;
  std::thread worker;

  void check_failed() {  // requires mu
    if (failure) std::rethrow_exception(failure);
  }

  // Ring allocation (requires mu); false when there is no room now.
  bool ring_alloc(std::size_t n, std::size_t& off) {
    n = (n + kAlign - 1) / kAlign * kAlign;
    if (n > capacity) return false;
    if (used.empty()) {
      off = 0;
    } else {
      const std::size_t tail = used.front().off, head = used.back().off + used.back().len;
      if (head > tail) {  // not wrapped: free space is [head, capacity) and [0, tail)
        if (capacity - head >= n) off = head;
        else if (tail >= n) off = 0;
        else return false;
      } else {  // wrapped (or full): free space is [head, tail)
        if (tail - head >= n) off = head;
        else return false;
      }
    }
    used.push_back({off, n});
    ctr.pending_bytes += n;
    ctr.peak_pending_bytes = std::max(ctr.peak_pending_bytes, ctr.pending_bytes);
    return true;
  }

  void enqueue(std::unique_ptr<Op> op) {
    std::lock_guard<std::mutex> lk(mu);
    ops.push_back(std::move(op));
    cv_work.notify_all();
  }

  void write_op(Op& op) {
    if (op.commit) {
      writer->commit_step(op.step, op.mode, op.mode_step);
      return;
    }
    const std::vector<TensorStats>& st = op.stats->result();
    if (op.copied) cuda_check(cudaEventSynchronize(op.copied), kOp, "cudaEventSynchronize");
    for (ItemRec& it : op.items) {
      const TensorStats& s = st[it.index];
      if (it.dropped) {
        writer->write_dropped(it.name, op.step, op.mode, op.mode_step, it.dtype, it.shape, s);
        continue;
      }
      TensorView v;
      v.data = it.host;
      v.dtype = it.dtype;
      v.shape = it.shape;
      writer->write_tensor(it.name, op.step, op.mode, op.mode_step, v, it.stats_only, {},
                           std::nullopt, &s);
      std::lock_guard<std::mutex> lk(mu);
      ++ctr.tensors;
    }
  }

  // Returns the staging of `op` (always, also after a failure).
  void release_op(Op& op) {
    if (op.copied) cudaEventSynchronize(op.copied);  // the copies must be done before reuse
    for (ItemRec& it : op.items) {
      if (!it.host) continue;
      if (it.in_ring) {
        std::lock_guard<std::mutex> lk(mu);
        ctr.pending_bytes -= used.front().len;
        used.pop_front();
      } else {
        cudaFreeHost(it.host);
      }
      it.host = nullptr;
    }
    if (op.copied) cudaEventDestroy(op.copied);
    op.copied = nullptr;
    std::lock_guard<std::mutex> lk(mu);
    cv_space.notify_all();
  }

  void loop() {
    if (device >= 0) cudaSetDevice(device);
    std::unique_lock<std::mutex> lk(mu);
    for (;;) {
      cv_work.wait(lk, [&] { return stopping || !ops.empty(); });
      if (ops.empty()) {
        if (stopping) return;
        continue;
      }
      std::unique_ptr<Op> op = std::move(ops.front());
      ops.pop_front();
      busy = true;
      const bool failed = failure != nullptr;
      lk.unlock();
      std::exception_ptr err;
      if (!failed) {
        try {
          write_op(*op);
        } catch (...) {
          err = std::current_exception();
        }
      }
      release_op(*op);
      op.reset();
      lk.lock();
      if (err && !failure) failure = err;
      busy = false;
      if (ops.empty()) cv_idle.notify_all();
    }
  }

  void wait_idle(std::unique_lock<std::mutex>& lk) {
    cv_idle.wait(lk, [&] { return ops.empty() && !busy; });
  }
};

GpuCapture::GpuCapture(store::StreamWriter& writer, uint64_t staging_bytes)
    : impl_(std::make_unique<Impl>()) {
  if (staging_bytes == 0)
    throw_error(ErrorCode::kInvalidArgument, "[gpu_capture] staging_bytes must be > 0");
  Impl& s = *impl_;
  s.writer = &writer;
  s.capacity = (staging_bytes + kAlign - 1) / kAlign * kAlign;
  s.skip = writer.options().policy == store::PendingPolicy::kSkip;
  s.worker = std::thread([&s] { s.loop(); });
}

GpuCapture::~GpuCapture() {
  try {
    close();
  } catch (...) {
  }
}

void GpuCapture::submit(int64_t step, Mode mode, int64_t mode_step,
                        const std::vector<GpuCaptureItem>& items, bool exp_hist,
                        uintptr_t stream_id) {
  Impl& s = *impl_;
  if (step < 0 || mode_step < 0)
    throw_error(ErrorCode::kInvalidArgument, "[gpu_capture.submit] step must be >= 0");
  {
    std::lock_guard<std::mutex> lk(s.mu);
    if (s.closed) throw_error(ErrorCode::kFailedPrecondition, "[gpu_capture.submit] capture is closed");
    s.check_failed();
    ++s.ctr.submits;
  }
  if (items.empty()) return;
  for (const GpuCaptureItem& it : items) {
    if (it.name.empty())
      throw_error(ErrorCode::kInvalidArgument, "[gpu_capture.submit] empty tensor name");
    if (it.view.device != DeviceType::kCuda)
      throw_error(ErrorCode::kInvalidArgument,
                  "[gpu_capture.submit] '" + it.name + "' is not a CUDA tensor");
  }
  const int device = items[0].view.device_index;
  if (s.device >= 0 && s.device != device)
    throw_error(ErrorCode::kInvalidArgument,
                "[gpu_capture.submit] one capture serves one device: cuda:" +
                    std::to_string(s.device) + ", got cuda:" + std::to_string(device));
  internal::DeviceGuard guard(device, kOp);
  const cudaStream_t stream = internal::stream_from_int(stream_id);

  std::vector<CudaStatsRequest> req(items.size());
  bool any_payload = false;
  for (std::size_t i = 0; i < items.size(); ++i) {
    req[i].view = items[i].view;
    req[i].hist_bins = items[i].hist_bins;
    any_payload |= !items[i].stats_only && items[i].view.nbytes() > 0;
  }
  if (any_payload && s.side == nullptr) {
    s.device = device;
    cuda_check(cudaStreamCreateWithFlags(&s.side, cudaStreamNonBlocking), kOp, "cudaStreamCreate");
    cuda_check(cudaHostAlloc(reinterpret_cast<void**>(&s.ring), s.capacity, cudaHostAllocDefault),
               kOp, "cudaHostAlloc (staging)");
    std::lock_guard<std::mutex> lk(s.mu);
    s.ctr.staging_bytes = s.capacity;
  }
  if (s.device < 0) s.device = device;
  auto make_event = [&](cudaEvent_t& e, unsigned flags) {
    cuda_check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming | flags), kOp, "cudaEventCreate");
  };
  if (any_payload) {
    // Copies wait for the work queued so far (not for the statistics, which follow).
    cudaEvent_t ready;
    make_event(ready, 0);
    cuda_check(cudaEventRecord(ready, stream), kOp, "cudaEventRecord");
    cuda_check(cudaStreamWaitEvent(s.side, ready, 0), kOp, "cudaStreamWaitEvent");
    cudaEventDestroy(ready);  // released once the recorded work completes
  }
  auto stats = std::make_shared<CudaPendingStats>(compute_stats_cuda_async(req, exp_hist, stream_id));

  auto new_op = [&] {
    auto op = std::make_unique<Op>();
    op->step = step;
    op->mode = mode;
    op->mode_step = mode_step;
    op->stats = stats;
    return op;
  };
  std::unique_ptr<Op> op = new_op();
  bool copies = false;  // op has copies on the side stream
  // Hands `op` to the worker; its copies are ordered after the stats, and `stream` waits for
  // them so that later in-place updates of the tensors cannot race the copies.
  auto close_op = [&] {
    if (copies) {
      make_event(op->copied, cudaEventBlockingSync);
      cuda_check(cudaEventRecord(op->copied, s.side), kOp, "cudaEventRecord");
      cuda_check(cudaStreamWaitEvent(stream, op->copied, 0), kOp, "cudaStreamWaitEvent");
    }
    s.enqueue(std::move(op));
    op = new_op();
    copies = false;
  };
  for (std::size_t i = 0; i < items.size(); ++i) {
    const GpuCaptureItem& it = items[i];
    ItemRec r;
    r.name = it.name;
    r.dtype = it.view.dtype;
    r.shape = it.view.shape;
    r.index = i;
    r.nbytes = it.view.nbytes();
    r.stats_only = it.stats_only;
    if (!r.stats_only && r.nbytes > 0) {
      std::size_t off = 0;
      bool got = false;
      {
        std::unique_lock<std::mutex> lk(s.mu);
        got = s.ring_alloc(r.nbytes, off);
        if (!got && s.skip) {
          r.dropped = true;
          ++s.ctr.dropped;
        }
      }
      if (!got && !s.skip) {
        // Block: hand over what this submit holds, then wait for the worker to free space.
        if (!op->items.empty()) close_op();
        std::unique_lock<std::mutex> lk(s.mu);
        const bool oneoff = ((r.nbytes + kAlign - 1) / kAlign * kAlign) > s.capacity;
        s.cv_space.wait(lk, [&] {
          return s.failure != nullptr || (oneoff ? s.used.empty() : s.ring_alloc(r.nbytes, off));
        });
        s.check_failed();
        got = !oneoff;
        if (oneoff) {
          lk.unlock();
          cuda_check(cudaHostAlloc(reinterpret_cast<void**>(&r.host), r.nbytes, cudaHostAllocDefault),
                     kOp, "cudaHostAlloc (one-off staging)");
        }
      }
      if (got) {
        r.host = s.ring + off;
        r.in_ring = true;
      }
      if (r.host) {
        cuda_check(cudaMemcpyAsync(r.host, it.view.data, r.nbytes, cudaMemcpyDeviceToHost, s.side),
                   kOp, "cudaMemcpyAsync (payload)");
        copies = true;
        std::lock_guard<std::mutex> lk(s.mu);
        s.ctr.copied_bytes += r.nbytes;
      }
    }
    op->items.push_back(std::move(r));
  }
  if (!op->items.empty()) close_op();
}

void GpuCapture::commit(int64_t step, Mode mode, int64_t mode_step) {
  Impl& s = *impl_;
  if (step < 0 || mode_step < 0)
    throw_error(ErrorCode::kInvalidArgument, "[gpu_capture.commit] step must be >= 0");
  {
    std::lock_guard<std::mutex> lk(s.mu);
    if (s.closed) throw_error(ErrorCode::kFailedPrecondition, "[gpu_capture.commit] capture is closed");
    s.check_failed();
  }
  auto op = std::make_unique<Op>();
  op->commit = true;
  op->step = step;
  op->mode = mode;
  op->mode_step = mode_step;
  s.enqueue(std::move(op));
}

void GpuCapture::flush() {
  Impl& s = *impl_;
  {
    std::unique_lock<std::mutex> lk(s.mu);
    s.wait_idle(lk);
    s.check_failed();
  }
  s.writer->flush();
}

void GpuCapture::close() {
  Impl& s = *impl_;
  {
    std::unique_lock<std::mutex> lk(s.mu);
    if (s.closed) return;
    s.closed = true;
    s.wait_idle(lk);
    s.stopping = true;
  }
  s.cv_work.notify_all();
  if (s.worker.joinable()) s.worker.join();
  if (s.ring) cudaFreeHost(s.ring);
  s.ring = nullptr;
  if (s.side) cudaStreamDestroy(s.side);
  s.side = nullptr;
  std::exception_ptr err;
  {
    std::lock_guard<std::mutex> lk(s.mu);
    err = s.failure;
  }
  if (err) std::rethrow_exception(err);
  if (!s.writer->closed()) s.writer->flush();
}

GpuCaptureCounters GpuCapture::counters() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->ctr;
}

}  // namespace tensorvigil
