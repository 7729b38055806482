#pragma once
/// \file stats/reduce.h
/// Fused single-pass statistics over CPU tensors (SIMD, threads).
#include <vector>

#include "tensorvigil/stats/stats.h"
#include "tensorvigil/tensor_view.h"

namespace tensorvigil {

struct StatsOptions {
  int hist_bins = 0;          ///< 0: no fixed-bin histogram; else 1..kMaxHistBins.
  bool hist_auto_range = true;///< Range = [min, max] of finite values (costs a second pass).
  double hist_lo = 0.0;       ///< Used when !hist_auto_range; requires hist_lo < hist_hi.
  double hist_hi = 0.0;
  bool exp_hist = false;      ///< Also fill the exponent (log2) histogram.
  int num_threads = 0;        ///< 0: the library default (set_num_threads), 1: calling thread only.
};

/// Statistics of one contiguous CPU tensor. Thread-safe; does not touch Python.
/// One chunk (<= 262,144 elements) without a histogram runs on the calling thread without
/// allocation; larger tensors are split into chunks across the pool and merged exactly.
/// Throws Error(kInvalidArgument) for a bad option, Error(kUnsupported) for a CUDA view
/// (see stats/reduce_cuda.h).
TensorStats compute_stats(const TensorView& view, const StatsOptions& options = {});

/// Statistics of many tensors, threads across and within tensors (small tensors are batched,
/// a few batches per thread). Same order as `views`; results do not depend on thread count.
std::vector<TensorStats> compute_stats_many(const std::vector<TensorView>& views,
                                            const StatsOptions& options = {});

/// Default number of threads for the reductions (initially min(hardware threads, 8)).
int get_num_threads();
void set_num_threads(int n);

}  // namespace tensorvigil
