#pragma once
// The two kernels. stats_kernel: one launch over the chunks of every tensor; each block reduces
// a chunk in registers (sums of deviations from the chunk's first element, in double), writes a
// partial record, and the block that completes a tensor merges its partials in chunk order
// (last-block-done counter). hist_kernel: the fixed-bin histograms, for the tensors that asked,
// once their range is known on the device.
#include <math.h>
#include <stdint.h>

#include "elements.cuh"
#include "records.cuh"
#include "welford.cuh"

namespace tensorvigil {
namespace cuda_dev {

// Exponent bucket of a finite non-zero value: floor(log2|x|) + 127, clamped to [0, 255].
__device__ __forceinline__ unsigned exp_bucket(float v) { return (__float_as_uint(v) >> 23) & 0xffu; }
__device__ __forceinline__ unsigned exp_bucket(double v) {
  const int e = static_cast<int>((static_cast<unsigned long long>(__double_as_longlong(v)) >> 52) & 0x7ff);
  return static_cast<unsigned>(min(max(e - 896, 0), 255));
}

template <typename L>
struct ThreadSums {
  L mn, mx;
  unsigned nfin, nan, posinf, neginf, zeros;
  double s1, s2, sa;
};

// Per-element update. kMasked: the chunk holds NaN/Inf, classify each element; otherwise all
// are assumed finite (a non-finite |x| sum at the end sends the chunk to the masked pass).
// Float inputs (f32, f16, bf16, fp8) accumulate the deviations of one 16-byte vector (4 to 16
// elements) in float, then fold that partial into the double sums (flush(), called by
// for_each_element after each vector): double arithmetic per element was the bottleneck, and
// the float partial of at most 16 terms keeps the relative error of the moments ~1e-7.
template <bool kMasked, typename L>
struct Accumulate {
  ThreadSums<L> t;
  double K;
  L Kl;              // K in the lane type
  L f1, f2, fa;      // partial sums of the current vector (float inputs only)
  unsigned* eh;  // this warp's exponent histogram in shared memory, or null
  static constexpr bool kFloatPartials = sizeof(L) == 4;
  __device__ __forceinline__ void operator()(L v) {
    if (kMasked) {
      if (isnan(v)) {
        ++t.nan;
        return;
      }
      if (isinf(v)) {
        if (v > L(0)) ++t.posinf; else ++t.neginf;
        return;
      }
    }
    ++t.nfin;
    t.mn = min(t.mn, v);
    t.mx = max(t.mx, v);
    t.zeros += (v == L(0));
    if constexpr (kFloatPartials) {
      const L d = v - Kl;
      f1 += d;
      f2 = fmaf(d, d, f2);
      fa += fabsf(v);
    } else {
      const double x = static_cast<double>(v);
      const double d = x - K;
      t.s1 += d;
      t.s2 = fma(d, d, t.s2);
      t.sa += fabs(x);
    }
    if (eh != nullptr && v != L(0)) atomicAdd(&eh[exp_bucket(v)], 1u);
  }
  __device__ __forceinline__ void flush() {
    if constexpr (kFloatPartials) {
      t.s1 += static_cast<double>(f1);
      t.s2 += static_cast<double>(f2);
      t.sa += static_cast<double>(fa);
      f1 = f2 = fa = L(0);
    }
  }
};
template <typename L>
__device__ __forceinline__ L lane_inf();
template <>
__device__ __forceinline__ float lane_inf<float>() { return __int_as_float(0x7f800000); }
template <>
__device__ __forceinline__ double lane_inf<double>() { return __longlong_as_double(0x7ff0000000000000LL); }

template <bool kMasked, int DT>
__device__ ThreadSums<typename Src<DT>::L> run_chunk(const unsigned char* base, unsigned n,
                                                      double K, unsigned* eh) {
  using L = typename Src<DT>::L;
  Accumulate<kMasked, L> a;
  a.t.mn = lane_inf<L>();
  a.t.mx = -lane_inf<L>();
  a.t.nfin = a.t.nan = a.t.posinf = a.t.neginf = a.t.zeros = 0;
  a.t.s1 = a.t.s2 = a.t.sa = 0.0;
  a.K = K;
  a.Kl = static_cast<L>(K);
  a.f1 = a.f2 = a.fa = L(0);
  a.eh = eh;
  for_each_element<DT>(base, n, a);
  a.flush();
  return a.t;
}

struct BlockSums {
  unsigned long long nfin, nan, posinf, neginf, zeros;
  double s1, s2, sa, mn, mx;
};

__device__ __forceinline__ void sums_add(BlockSums& a, const BlockSums& b) {
  a.nfin += b.nfin;
  a.nan += b.nan;
  a.posinf += b.posinf;
  a.neginf += b.neginf;
  a.zeros += b.zeros;
  a.s1 += b.s1;
  a.s2 += b.s2;
  a.sa += b.sa;
  a.mn = fmin(a.mn, b.mn);
  a.mx = fmax(a.mx, b.mx);
}

// Statistics of one chunk, valid in thread 0. `s_exp` (kWarps x 256 counters) or null.
template <int DT>
__device__ TvAcc chunk_stats(const unsigned char* base, unsigned n, unsigned* s_exp) {
  using L = typename Src<DT>::L;
  __shared__ BlockSums scratch[kWarps];
  const L first = Src<DT>::at(base, 0);
  const double K = isfinite(first) ? static_cast<double>(first) : 0.0;
  unsigned* eh = s_exp ? s_exp + (threadIdx.x >> 5) * kExpBuckets : nullptr;
  ThreadSums<L> t = run_chunk<false, DT>(base, n, K, eh);
  if (__syncthreads_or(!isfinite(t.sa))) {
    if (s_exp) {
      for (int w = 0; w < kWarps; ++w) s_exp[w * kExpBuckets + threadIdx.x] = 0u;
      __syncthreads();
    }
    t = run_chunk<true, DT>(base, n, K, eh);
  }
  BlockSums b;
  b.nfin = t.nfin;
  b.nan = t.nan;
  b.posinf = t.posinf;
  b.neginf = t.neginf;
  b.zeros = t.zeros;
  b.s1 = t.s1;
  b.s2 = t.s2;
  b.sa = t.sa;
  b.mn = static_cast<double>(t.mn);
  b.mx = static_cast<double>(t.mx);
  for (int off = 16; off > 0; off >>= 1) {
    BlockSums o;
    o.nfin = __shfl_down_sync(0xffffffffu, b.nfin, off);
    o.nan = __shfl_down_sync(0xffffffffu, b.nan, off);
    o.posinf = __shfl_down_sync(0xffffffffu, b.posinf, off);
    o.neginf = __shfl_down_sync(0xffffffffu, b.neginf, off);
    o.zeros = __shfl_down_sync(0xffffffffu, b.zeros, off);
    o.s1 = __shfl_down_sync(0xffffffffu, b.s1, off);
    o.s2 = __shfl_down_sync(0xffffffffu, b.s2, off);
    o.sa = __shfl_down_sync(0xffffffffu, b.sa, off);
    o.mn = __shfl_down_sync(0xffffffffu, b.mn, off);
    o.mx = __shfl_down_sync(0xffffffffu, b.mx, off);
    sums_add(b, o);
  }
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = b;
  __syncthreads();
  TvAcc r = acc_identity();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) sums_add(b, scratch[w]);
    r.nfin = b.nfin;
    r.nan = b.nan;
    r.posinf = b.posinf;
    r.neginf = b.neginf;
    r.zeros = b.zeros;
    if (b.nfin) {
      const double nb = static_cast<double>(b.nfin);
      r.min = b.mn;
      r.max = b.mx;
      r.asum = b.sa;
      if (b.mn == b.mx) {  // constant: exact, whatever the shift
        r.mean = b.mn;
        r.m2 = 0.0;
      } else {
        r.mean = K + b.s1 / nb;
        r.m2 = fmax(0.0, b.s2 - b.s1 * (b.s1 / nb));
      }
    }
  }
  __syncthreads();  // scratch is reused by the next chunk
  return r;
}

__device__ __forceinline__ TvRecord finalize(const TvAcc& a, unsigned long long numel) {
  TvRecord r;
  r.numel = numel;
  r.nfin = a.nfin;
  r.nan = a.nan;
  r.posinf = a.posinf;
  r.neginf = a.neginf;
  r.zeros = a.zeros;
  const double qnan = __longlong_as_double(0x7ff8000000000000LL);
  if (a.nfin) {
    r.min = a.min;
    r.max = a.max;
    r.mean = a.mean;
    r.m2 = a.m2;
    r.abs_sum = a.asum;
    r.abs_max = fmax(-a.min, a.max);
  } else {
    r.min = r.max = qnan;
    r.mean = r.m2 = r.abs_sum = r.abs_max = 0.0;
  }
  r.hist_lo = r.hist_hi = 0.0;
  return r;
}

__device__ __forceinline__ TvAcc load_partial(const TvAcc* p) {
  TvAcc a;
  a.nfin = __ldcg(&p->nfin);
  a.nan = __ldcg(&p->nan);
  a.posinf = __ldcg(&p->posinf);
  a.neginf = __ldcg(&p->neginf);
  a.zeros = __ldcg(&p->zeros);
  a.min = __ldcg(&p->min);
  a.max = __ldcg(&p->max);
  a.mean = __ldcg(&p->mean);
  a.m2 = __ldcg(&p->m2);
  a.asum = __ldcg(&p->asum);
  return a;
}

// Index of the last entry whose key (first chunk) is <= c.
template <typename Key>
__device__ __forceinline__ int find_owner(int n, unsigned c, Key key) {
  int lo = 0, hi = n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (key(mid) <= c) lo = mid; else hi = mid - 1;
  }
  return lo;
}

struct StatsKey {
  const TvDesc* d;
  __device__ unsigned operator()(int i) const { return d[i].first_chunk; }
};

__global__ void __launch_bounds__(kThreads) stats_kernel(const TvDesc* __restrict__ descs, int ndesc,
                                                         unsigned total_chunks, TvAcc* partials,
                                                         TvRecord* recs,
                                                         unsigned long long* exp_out,
                                                         unsigned* counters, int exp_hist) {
  __shared__ unsigned s_exp_store[kWarps * kExpBuckets];
  __shared__ TvAcc merge_scratch[kWarps];
  __shared__ int s_last;
  unsigned* s_exp = exp_hist ? s_exp_store : nullptr;
  if (s_exp)
    for (int w = 0; w < kWarps; ++w) s_exp[w * kExpBuckets + threadIdx.x] = 0u;
  __syncthreads();
  for (unsigned c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const int ti = find_owner(ndesc, c, StatsKey{descs});
    const TvDesc d = descs[ti];
    const unsigned k = c - d.first_chunk;
    const unsigned long long begin = static_cast<unsigned long long>(k) * d.chunk_elems;
    const unsigned long long left = d.numel - begin;
    const unsigned n = static_cast<unsigned>(left < d.chunk_elems ? left : d.chunk_elems);
    TvAcc a;
    switch (d.dtype) {
      case kF64: a = chunk_stats<kF64>(static_cast<const unsigned char*>(d.ptr) + begin * 8, n, s_exp); break;
      case kF16: a = chunk_stats<kF16>(static_cast<const unsigned char*>(d.ptr) + begin * 2, n, s_exp); break;
      case kBF16: a = chunk_stats<kBF16>(static_cast<const unsigned char*>(d.ptr) + begin * 2, n, s_exp); break;
      case kE4M3: a = chunk_stats<kE4M3>(static_cast<const unsigned char*>(d.ptr) + begin, n, s_exp); break;
      case kE5M2: a = chunk_stats<kE5M2>(static_cast<const unsigned char*>(d.ptr) + begin, n, s_exp); break;
      default: a = chunk_stats<kF32>(static_cast<const unsigned char*>(d.ptr) + begin * 4, n, s_exp); break;
    }
    if (s_exp) {
      __syncthreads();
      unsigned long long s = 0;
      for (int w = 0; w < kWarps; ++w) {
        s += s_exp[w * kExpBuckets + threadIdx.x];
        s_exp[w * kExpBuckets + threadIdx.x] = 0u;
      }
      if (s) atomicAdd(&exp_out[static_cast<unsigned long long>(ti) * kExpBuckets + threadIdx.x], s);
      __syncthreads();
    }
    if (d.nchunks == 1) {
      if (threadIdx.x == 0) recs[ti] = finalize(a, d.numel);
      continue;
    }
    if (threadIdx.x == 0) {
      partials[d.partial_off + k] = a;
      __threadfence();
      const unsigned prev = atomicAdd(&counters[ti], 1u);
      s_last = prev == d.nchunks - 1;
    }
    __syncthreads();
    if (s_last) {
      __threadfence();
      TvAcc m = acc_identity();
      for (unsigned j = threadIdx.x; j < d.nchunks; j += kThreads)
        acc_merge(m, load_partial(partials + d.partial_off + j));
      m = block_merge(m, merge_scratch);
      if (threadIdx.x == 0) recs[ti] = finalize(m, d.numel);
    }
    __syncthreads();
  }
}

// Histogram bin edges exactly as TensorStats::hist_edges (numpy.linspace), without FMA
// contraction so that they equal the host's bit for bit.
struct HistRange {
  int bins;
  double lo, hi, delta, step, scale;
  __device__ double edge(long long i) const {
    if (i >= bins) return hi;
    double y = static_cast<double>(i);
    y = step == 0.0 ? __dmul_rn(__ddiv_rn(y, static_cast<double>(bins)), delta) : __dmul_rn(y, step);
    return __dadd_rn(y, lo);
  }
  // Counter slot of a finite x: 0 below, 1 + bin, bins + 1 above (numpy's edge rule).
  __device__ int slot(double x) const {
    if (!(x >= lo)) return 0;
    if (x > hi) return bins + 1;
    const double f = __dmul_rn(__dsub_rn(x, lo), scale);
    long long idx = f >= static_cast<double>(bins) ? bins - 1 : (f > 0.0 ? static_cast<long long>(f) : 0);
    while (idx > 0 && x < edge(idx)) --idx;
    while (idx < bins - 1 && x >= edge(idx + 1)) ++idx;
    return static_cast<int>(idx) + 1;
  }
};

template <typename L>
struct HistCount {
  HistRange r;
  unsigned* counts;
  __device__ __forceinline__ void operator()(L v) {
    if (isfinite(v)) atomicAdd(&counts[r.slot(static_cast<double>(v))], 1u);
  }
  __device__ __forceinline__ void flush() {}
};

struct HistKey {
  const TvDesc* d;
  const unsigned* list;
  __device__ unsigned operator()(int i) const { return d[list[i]].hist_first_chunk; }
};

template <int DT>
__device__ void hist_chunk(const unsigned char* base, unsigned n, const HistRange& r, unsigned* counts) {
  HistCount<typename Src<DT>::L> h{r, counts};
  for_each_element<DT>(base, n, h);
}

__global__ void __launch_bounds__(kThreads) hist_kernel(const TvDesc* __restrict__ descs,
                                                        const unsigned* __restrict__ list, int nlist,
                                                        unsigned total_chunks, TvRecord* recs,
                                                        unsigned long long* hist_out) {
  extern __shared__ unsigned s_counts[];
  for (unsigned c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    const int li = find_owner(nlist, c, HistKey{descs, list});
    const int ti = static_cast<int>(list[li]);
    const TvDesc d = descs[ti];
    HistRange r;
    r.bins = d.hist_bins;
    if (d.hist_auto) {
      const TvRecord& rec = recs[ti];
      if (rec.nfin == 0 || !isfinite(rec.min) || !isfinite(rec.max)) {
        r.lo = 0.0;
        r.hi = 1.0;
      } else {
        r.lo = rec.min;
        r.hi = rec.max;
        if (r.lo == r.hi) {
          r.lo -= 0.5;
          r.hi += 0.5;
        }
      }
    } else {
      r.lo = d.hist_lo;
      r.hi = d.hist_hi;
    }
    r.delta = __dsub_rn(r.hi, r.lo);
    r.step = __ddiv_rn(r.delta, static_cast<double>(r.bins));
    r.scale = __ddiv_rn(static_cast<double>(r.bins), r.delta);
    const unsigned k = c - d.hist_first_chunk;
    if (k == 0 && threadIdx.x == 0) {
      recs[ti].hist_lo = r.lo;
      recs[ti].hist_hi = r.hi;
    }
    for (int b = threadIdx.x; b < r.bins + 2; b += kThreads) s_counts[b] = 0u;
    __syncthreads();
    const unsigned long long begin = static_cast<unsigned long long>(k) * d.chunk_elems;
    const unsigned long long left = d.numel - begin;
    const unsigned n = static_cast<unsigned>(left < d.chunk_elems ? left : d.chunk_elems);
    const unsigned char* p = static_cast<const unsigned char*>(d.ptr);
    switch (d.dtype) {
      case kF64: hist_chunk<kF64>(p + begin * 8, n, r, s_counts); break;
      case kF16: hist_chunk<kF16>(p + begin * 2, n, r, s_counts); break;
      case kBF16: hist_chunk<kBF16>(p + begin * 2, n, r, s_counts); break;
      case kE4M3: hist_chunk<kE4M3>(p + begin, n, r, s_counts); break;
      case kE5M2: hist_chunk<kE5M2>(p + begin, n, r, s_counts); break;
      default: hist_chunk<kF32>(p + begin * 4, n, r, s_counts); break;
    }
    __syncthreads();
    for (int b = threadIdx.x; b < r.bins + 2; b += kThreads)
      if (s_counts[b]) atomicAdd(&hist_out[d.hist_off + b], static_cast<unsigned long long>(s_counts[b]));
    __syncthreads();
  }
}

}  // namespace cuda_dev
}  // namespace tensorvigil
