#pragma once
// Mergeable accumulator of the kernels: Chan's parallel update, exactly as TensorStats::merge
// (cpp/src/stats/stats.cpp), so chunk, warp and block merges agree with the CPU record.
#include <math.h>

#include "records.cuh"

namespace tensorvigil {
namespace cuda_dev {

__device__ inline TvAcc acc_identity() {
  TvAcc a;
  a.nfin = a.nan = a.posinf = a.neginf = a.zeros = 0;
  a.min = __longlong_as_double(0x7ff0000000000000LL);   // +inf
  a.max = __longlong_as_double((long long)0xfff0000000000000ULL);  // -inf
  a.mean = a.m2 = a.asum = 0.0;
  return a;
}

__device__ inline void acc_merge(TvAcc& a, const TvAcc& b) {
  if (b.nfin != 0) {
    if (a.nfin == 0) {
      a.mean = b.mean;
      a.m2 = b.m2;
    } else {
      const double n = static_cast<double>(a.nfin + b.nfin);
      const double fa = static_cast<double>(a.nfin) / n, fb = static_cast<double>(b.nfin) / n;
      const double delta = b.mean - a.mean;
      a.mean = isfinite(delta) ? a.mean + delta * fb : fa * a.mean + fb * b.mean;
      const double t = delta * sqrt(static_cast<double>(a.nfin) * fb);
      a.m2 = a.m2 + b.m2 + t * t;
    }
  }
  a.nfin += b.nfin;
  a.nan += b.nan;
  a.posinf += b.posinf;
  a.neginf += b.neginf;
  a.zeros += b.zeros;
  a.min = fmin(a.min, b.min);
  a.max = fmax(a.max, b.max);
  a.asum += b.asum;
}

__device__ inline TvAcc acc_shfl_down(const TvAcc& a, int off) {
  TvAcc b;
  b.nfin = __shfl_down_sync(0xffffffffu, a.nfin, off);
  b.nan = __shfl_down_sync(0xffffffffu, a.nan, off);
  b.posinf = __shfl_down_sync(0xffffffffu, a.posinf, off);
  b.neginf = __shfl_down_sync(0xffffffffu, a.neginf, off);
  b.zeros = __shfl_down_sync(0xffffffffu, a.zeros, off);
  b.min = __shfl_down_sync(0xffffffffu, a.min, off);
  b.max = __shfl_down_sync(0xffffffffu, a.max, off);
  b.mean = __shfl_down_sync(0xffffffffu, a.mean, off);
  b.m2 = __shfl_down_sync(0xffffffffu, a.m2, off);
  b.asum = __shfl_down_sync(0xffffffffu, a.asum, off);
  return b;
}

// Merges every thread's record in a fixed order (lane tree, then warps in order); the result
// is valid in thread 0. `scratch` holds kWarps records. Deterministic.
__device__ inline TvAcc block_merge(TvAcc a, TvAcc* scratch) {
  for (int off = 16; off > 0; off >>= 1) {
    TvAcc b = acc_shfl_down(a, off);
    acc_merge(a, b);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // scratch may still be read by a previous merge
  if (lane == 0) scratch[warp] = a;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) acc_merge(a, scratch[w]);
  }
  return a;
}

}  // namespace cuda_dev
}  // namespace tensorvigil
