#pragma once
// Plain records shared by the host launcher and the kernels: tensor descriptors, per-chunk
// partial statistics and the final per-tensor record. Device-only code lives in the other
// headers of this folder; nothing here includes anything outside it.

namespace tensorvigil {
namespace cuda_dev {

// Element types: the numeric values of tensorvigil::DType.
enum : int { kF64 = 1, kF32 = 2, kF16 = 3, kBF16 = 4, kE4M3 = 5, kE5M2 = 6 };

constexpr int kThreads = 256;              // threads per block of both kernels
constexpr int kWarps = kThreads / 32;
constexpr unsigned kChunkBytes = 256u << 10;  // bytes of one tensor per work item
constexpr int kExpBuckets = 256;

// One tensor of a launch. Chunks of all tensors form one global work list: chunk c belongs to
// the last tensor whose first_chunk <= c.
struct TvDesc {
  const void* ptr;
  unsigned long long numel;
  unsigned long long chunk_elems;
  unsigned first_chunk;       // in the statistics work list
  unsigned nchunks;
  unsigned partial_off;       // first partial record of this tensor (nchunks > 1)
  int dtype;
  int hist_bins;              // 0: no histogram
  int hist_auto;              // range from [min, max] of the finite values
  unsigned long long hist_off;  // first of bins + 2 counters: below, bins..., above
  unsigned hist_first_chunk;  // in the histogram work list
  unsigned pad_;
  double hist_lo, hist_hi;    // when !hist_auto
};

// Statistics of a chunk (or of merged chunks), finite values only for moments.
struct TvAcc {
  unsigned long long nfin, nan, posinf, neginf, zeros;
  double min, max, mean, m2, asum;
};

// Final record of one tensor, copied to the host.
struct TvRecord {
  unsigned long long numel, nfin, nan, posinf, neginf, zeros;
  double min, max, mean, m2, abs_sum, abs_max, hist_lo, hist_hi;
};

}  // namespace cuda_dev
}  // namespace tensorvigil
