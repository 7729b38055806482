// Host side of the CUDA statistics: builds the work list, takes a pooled slot (pinned host and
// device buffers, an event), and enqueues upload, kernels and the download of the records on
// the caller's stream. Nothing here synchronises the device; result() waits on the job's event.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_util.h"
#include "device/reduce_kernels.cuh"
#include "tensorvigil/error.h"
#include "tensorvigil/stats/reduce_cuda.h"

namespace tensorvigil {

namespace cd = cuda_dev;
using internal::cuda_check;

namespace {

constexpr const char* kOp = "compute_stats_cuda";

std::size_t align_up(std::size_t n, std::size_t a = 256) { return (n + a - 1) / a * a; }

// Reused buffers of one launch; grow-only. Free for reuse once `event` has completed and no
// job holds it.
struct Slot {
  int device = 0;
  void* host = nullptr;  // pinned
  std::size_t host_cap = 0;
  void* dev = nullptr;
  std::size_t dev_cap = 0;
  cudaEvent_t event = nullptr;
  bool in_use = false;
};

struct DeviceInfo {
  int sms = 0;
  int stats_blocks_per_sm = 0;
};

class SlotPool {
 public:
  static SlotPool& get() {
    static SlotPool* p = new SlotPool();  // never destroyed: CUDA may be torn down first
    return *p;
  }

  Slot* acquire(int device) {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& s : slots_) {
      if (s->in_use || s->device != device) continue;
      if (cudaEventQuery(s->event) != cudaSuccess) continue;  // still running (or failed)
      s->in_use = true;
      return s.get();
    }
    auto s = std::make_unique<Slot>();
    s->device = device;
    cuda_check(cudaEventCreateWithFlags(&s->event, cudaEventDisableTiming | cudaEventBlockingSync),
               kOp, "cudaEventCreate");
    s->in_use = true;
    slots_.push_back(std::move(s));
    return slots_.back().get();
  }

  void release(Slot* s) {
    std::lock_guard<std::mutex> lk(mu_);
    s->in_use = false;
  }

  const DeviceInfo& info(int device) {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = info_.find(device);
    if (it != info_.end()) return it->second;
    DeviceInfo d;
    cuda_check(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device), kOp,
               "cudaDeviceGetAttribute");
    cuda_check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&d.stats_blocks_per_sm,
                                                             cd::stats_kernel, cd::kThreads, 0),
               kOp, "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    d.stats_blocks_per_sm = std::max(1, d.stats_blocks_per_sm);
    return info_.emplace(device, d).first->second;
  }

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<Slot>> slots_;
  std::map<int, DeviceInfo> info_;
};

void grow(Slot& s, std::size_t host_need, std::size_t dev_need, cudaStream_t stream) {
  if (s.host_cap < host_need) {
    if (s.host) cudaFreeHost(s.host);
    s.host = nullptr;
    s.host_cap = 0;
    const std::size_t cap = align_up(host_need + host_need / 2, 1 << 16);
    cuda_check(cudaHostAlloc(&s.host, cap, cudaHostAllocDefault), kOp, "cudaHostAlloc");
    s.host_cap = cap;
  }
  if (s.dev_cap < dev_need) {
    // Stream-ordered: no device synchronisation (cudaFree would synchronise).
    if (s.dev) cudaFreeAsync(s.dev, stream);
    s.dev = nullptr;
    s.dev_cap = 0;
    const std::size_t cap = align_up(dev_need + dev_need / 2, 1 << 16);
    cuda_check(cudaMallocAsync(&s.dev, cap, stream), kOp, "cudaMallocAsync");
    s.dev_cap = cap;
  }
}

}  // namespace

namespace internal {

struct CudaStatsJob {
  Slot* slot = nullptr;
  std::vector<CudaStatsRequest> req;  // views' data pointers are not used after launch
  bool exp_hist = false;
  std::size_t rec_off = 0, exp_off = 0, hist_off = 0;  // in the downloaded region
  std::vector<unsigned long long> hist_offsets;
  std::vector<TensorStats> out;
  bool done = false;
  std::mutex mu;

  ~CudaStatsJob() {
    if (slot) SlotPool::get().release(slot);
  }
};

}  // namespace internal

bool cuda_stats_supports(DType dt) {
  switch (dt) {
    case DType::kFloat64:
    case DType::kFloat32:
    case DType::kFloat16:
    case DType::kBFloat16:
    case DType::kFloat8E4M3:
    case DType::kFloat8E5M2:
      return true;
    default:
      return false;
  }
}

CudaPendingStats::CudaPendingStats() = default;
CudaPendingStats::CudaPendingStats(std::shared_ptr<internal::CudaStatsJob> job)
    : job_(std::move(job)) {}
CudaPendingStats::~CudaPendingStats() = default;
CudaPendingStats::CudaPendingStats(CudaPendingStats&&) noexcept = default;
CudaPendingStats& CudaPendingStats::operator=(CudaPendingStats&&) noexcept = default;

bool CudaPendingStats::ready() const {
  if (!job_) return true;
  if (job_->done || !job_->slot) return true;
  return cudaEventQuery(job_->slot->event) != cudaErrorNotReady;
}

const std::vector<TensorStats>& CudaPendingStats::result() {
  if (!job_) throw_error(ErrorCode::kFailedPrecondition, "[compute_stats_cuda.result] no job");
  internal::CudaStatsJob& j = *job_;
  std::lock_guard<std::mutex> lk(j.mu);
  if (j.done) return j.out;
  Slot* s = j.slot;
  cuda_check(cudaEventSynchronize(s->event), "compute_stats_cuda.result", "cudaEventSynchronize");
  const auto* base = static_cast<const unsigned char*>(s->host);
  const auto* recs = reinterpret_cast<const cd::TvRecord*>(base + j.rec_off);
  const auto* exps = reinterpret_cast<const unsigned long long*>(base + j.exp_off);
  const auto* hist = reinterpret_cast<const unsigned long long*>(base + j.hist_off);
  j.out.resize(j.req.size());
  for (std::size_t i = 0; i < j.req.size(); ++i) {
    const CudaStatsRequest& q = j.req[i];
    TensorStats& o = j.out[i];
    const uint64_t numel = static_cast<uint64_t>(q.view.numel());
    if (numel > 0) {
      const cd::TvRecord& r = recs[i];
      o.numel = r.numel;
      o.nan = r.nan;
      o.posinf = r.posinf;
      o.neginf = r.neginf;
      o.zeros = r.zeros;
      o.min = r.min;
      o.max = r.max;
      o.mean = r.mean;
      o.m2 = r.m2;
      o.abs_sum = r.abs_sum;
      o.abs_max = r.abs_max;
    }
    if (j.exp_hist) {
      const unsigned long long* e = exps + i * cd::kExpBuckets;
      o.exp_hist.assign(e, e + cd::kExpBuckets);
    }
    if (q.hist_bins > 0) {
      const unsigned long long* h = hist + j.hist_offsets[i];
      o.hist.assign(h + 1, h + 1 + q.hist_bins);
      o.hist_below = h[0];
      o.hist_above = h[q.hist_bins + 1];
      if (numel > 0) {
        o.hist_lo = recs[i].hist_lo;
        o.hist_hi = recs[i].hist_hi;
      } else if (q.hist_auto_range) {
        o.hist_lo = 0.0;
        o.hist_hi = 1.0;
      } else {
        o.hist_lo = q.hist_lo;
        o.hist_hi = q.hist_hi;
      }
    }
  }
  j.done = true;
  SlotPool::get().release(s);
  j.slot = nullptr;
  return j.out;
}

CudaPendingStats compute_stats_cuda_async(const std::vector<CudaStatsRequest>& requests,
                                          bool exp_hist, uintptr_t stream_id) {
  auto job = std::make_shared<internal::CudaStatsJob>();
  job->req = requests;
  job->exp_hist = exp_hist;
  const std::size_t n = requests.size();
  if (n == 0) {
    job->done = true;
    return CudaPendingStats(job);
  }
  int device = -1;
  for (std::size_t i = 0; i < n; ++i) {
    const CudaStatsRequest& q = requests[i];
    const TensorView& v = q.view;
    if (v.device != DeviceType::kCuda)
      throw_error(ErrorCode::kInvalidArgument,
                  "[compute_stats_cuda] tensor " + std::to_string(i) +
                      " is in host memory; use compute_stats for host tensors");
    if (!cuda_stats_supports(v.dtype))
      throw_error(ErrorCode::kInvalidArgument,
                  std::string("[compute_stats_cuda] dtype ") + dtype_name(v.dtype) +
                      " is not supported by the CUDA kernels (float64, float32, float16, "
                      "bfloat16, float8_e4m3fn, float8_e5m2)");
    for (int64_t d : v.shape)
      if (d < 0) throw_error(ErrorCode::kInvalidArgument, "[compute_stats_cuda] negative dimension");
    if (v.numel() > 0 && v.data == nullptr)
      throw_error(ErrorCode::kInvalidArgument, "[compute_stats_cuda] null data pointer");
    if (device < 0) device = v.device_index;
    if (v.device_index != device)
      throw_error(ErrorCode::kInvalidArgument,
                  "[compute_stats_cuda] all tensors must be on one device, got cuda:" +
                      std::to_string(device) + " and cuda:" + std::to_string(v.device_index));
    if (q.hist_bins < 0 || q.hist_bins > kMaxHistBins)
      throw_error(ErrorCode::kInvalidArgument, "[compute_stats_cuda] hist_bins must be in [0, " +
                                                   std::to_string(kMaxHistBins) + "]");
    if (q.hist_bins > 0 && !q.hist_auto_range &&
        !(std::isfinite(q.hist_lo) && std::isfinite(q.hist_hi) && q.hist_lo < q.hist_hi))
      throw_error(ErrorCode::kInvalidArgument,
                  "[compute_stats_cuda] hist range must be finite with lo < hi");
  }
  internal::DeviceGuard guard(device, kOp);
  const cudaStream_t stream = internal::stream_from_int(stream_id);

  // Work lists: statistics chunks of every non-empty tensor; histogram chunks of those asking.
  std::vector<cd::TvDesc> descs(n);
  std::vector<unsigned> hlist;
  job->hist_offsets.assign(n, 0);
  unsigned long long chunks = 0, hchunks = 0, partials = 0, hist_words = 0;
  int max_bins = 0;
  for (std::size_t i = 0; i < n; ++i) {
    const CudaStatsRequest& q = requests[i];
    cd::TvDesc& d = descs[i];
    std::memset(&d, 0, sizeof(d));
    const std::size_t es = dtype_size(q.view.dtype);
    d.ptr = q.view.data;
    d.numel = static_cast<unsigned long long>(q.view.numel());
    d.chunk_elems = cd::kChunkBytes / es;
    d.dtype = static_cast<int>(q.view.dtype);
    d.nchunks = static_cast<unsigned>((d.numel + d.chunk_elems - 1) / d.chunk_elems);
    d.first_chunk = static_cast<unsigned>(chunks);
    d.partial_off = static_cast<unsigned>(partials);
    chunks += d.nchunks;
    if (d.nchunks > 1) partials += d.nchunks;
    d.hist_bins = q.hist_bins;
    d.hist_auto = q.hist_auto_range ? 1 : 0;
    d.hist_lo = q.hist_lo;
    d.hist_hi = q.hist_hi;
    if (q.hist_bins > 0) {
      d.hist_off = hist_words;
      job->hist_offsets[i] = hist_words;
      hist_words += static_cast<unsigned long long>(q.hist_bins) + 2;
      if (d.numel > 0) {
        d.hist_first_chunk = static_cast<unsigned>(hchunks);
        hchunks += d.nchunks;
        hlist.push_back(static_cast<unsigned>(i));
        max_bins = std::max(max_bins, q.hist_bins);
      }
    }
  }
  if (chunks >= (1ull << 32) - 1)
    throw_error(ErrorCode::kInvalidArgument, "[compute_stats_cuda] too many chunks in one call");

  // Device layout: descs | hist list | partials | records | exp | hist | counters.
  // Host (pinned) layout: descs | hist list | records | exp | hist.
  const std::size_t desc_bytes = align_up(n * sizeof(cd::TvDesc));
  const std::size_t list_bytes = align_up(std::max<std::size_t>(hlist.size(), 1) * sizeof(unsigned));
  const std::size_t part_bytes = align_up(std::max<unsigned long long>(partials, 1) * sizeof(cd::TvAcc));
  const std::size_t rec_bytes = align_up(n * sizeof(cd::TvRecord));
  const std::size_t exp_bytes = exp_hist ? align_up(n * cd::kExpBuckets * 8) : 0;
  const std::size_t hist_bytes = align_up(hist_words * 8);
  const std::size_t cnt_bytes = align_up(n * sizeof(unsigned));
  const std::size_t up_bytes = desc_bytes + list_bytes;
  const std::size_t out_bytes = rec_bytes + exp_bytes + hist_bytes;
  const std::size_t d_part = up_bytes, d_out = d_part + part_bytes;
  const std::size_t dev_need = d_out + out_bytes + cnt_bytes;
  const std::size_t host_need = up_bytes + out_bytes;

  SlotPool& pool = SlotPool::get();
  const DeviceInfo& info = pool.info(device);
  Slot* slot = pool.acquire(device);
  job->slot = slot;  // released by the job on any exit
  grow(*slot, host_need, dev_need, stream);
  auto* h = static_cast<unsigned char*>(slot->host);
  auto* dv = static_cast<unsigned char*>(slot->dev);
  std::memcpy(h, descs.data(), n * sizeof(cd::TvDesc));
  if (!hlist.empty()) std::memcpy(h + desc_bytes, hlist.data(), hlist.size() * sizeof(unsigned));
  job->rec_off = up_bytes;
  job->exp_off = up_bytes + rec_bytes;
  job->hist_off = up_bytes + rec_bytes + exp_bytes;

  cuda_check(cudaMemcpyAsync(dv, h, up_bytes, cudaMemcpyHostToDevice, stream), kOp,
             "cudaMemcpyAsync (descriptors)");
  cuda_check(cudaMemsetAsync(dv + d_out + rec_bytes, 0, exp_bytes + hist_bytes + cnt_bytes, stream),
             kOp, "cudaMemsetAsync");
  auto* d_desc = reinterpret_cast<const cd::TvDesc*>(dv);
  auto* d_list = reinterpret_cast<const unsigned*>(dv + desc_bytes);
  auto* d_partials = reinterpret_cast<cd::TvAcc*>(dv + d_part);
  auto* d_recs = reinterpret_cast<cd::TvRecord*>(dv + d_out);
  auto* d_exp = reinterpret_cast<unsigned long long*>(dv + d_out + rec_bytes);
  auto* d_hist = reinterpret_cast<unsigned long long*>(dv + d_out + rec_bytes + exp_bytes);
  auto* d_cnt = reinterpret_cast<unsigned*>(dv + d_out + out_bytes);
  if (chunks > 0) {
    const unsigned grid = static_cast<unsigned>(
        std::min<unsigned long long>(chunks, static_cast<unsigned long long>(info.sms) *
                                                 static_cast<unsigned long long>(info.stats_blocks_per_sm)));
    cd::stats_kernel<<<grid, cd::kThreads, 0, stream>>>(d_desc, static_cast<int>(n),
                                                         static_cast<unsigned>(chunks), d_partials,
                                                         d_recs, d_exp, d_cnt, exp_hist ? 1 : 0);
    cuda_check(cudaGetLastError(), kOp, "stats_kernel launch");
  }
  if (hchunks > 0) {
    const std::size_t smem = (static_cast<std::size_t>(max_bins) + 2) * sizeof(unsigned);
    const unsigned grid = static_cast<unsigned>(
        std::min<unsigned long long>(hchunks, static_cast<unsigned long long>(info.sms) * 4));
    cd::hist_kernel<<<grid, cd::kThreads, smem, stream>>>(d_desc, d_list,
                                                          static_cast<int>(hlist.size()),
                                                          static_cast<unsigned>(hchunks), d_recs,
                                                          d_hist);
    cuda_check(cudaGetLastError(), kOp, "hist_kernel launch");
  }
  cuda_check(cudaMemcpyAsync(h + up_bytes, dv + d_out, out_bytes, cudaMemcpyDeviceToHost, stream),
             kOp, "cudaMemcpyAsync (records)");
  cuda_check(cudaEventRecord(slot->event, stream), kOp, "cudaEventRecord");
  return CudaPendingStats(job);
}

std::vector<TensorStats> compute_stats_cuda(const std::vector<TensorView>& views,
                                            const StatsOptions& options, uintptr_t stream) {
  std::vector<CudaStatsRequest> req(views.size());
  for (std::size_t i = 0; i < views.size(); ++i) {
    req[i].view = views[i];
    req[i].hist_bins = options.hist_bins;
    req[i].hist_auto_range = options.hist_auto_range;
    req[i].hist_lo = options.hist_lo;
    req[i].hist_hi = options.hist_hi;
  }
  CudaPendingStats p = compute_stats_cuda_async(req, options.exp_hist, stream);
  return p.result();
}

}  // namespace tensorvigil
