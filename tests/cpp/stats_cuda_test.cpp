// CUDA statistics against the CPU kernels on the same bytes (built only with TV_ENABLE_CUDA;
// every test skips without a device). Counts, min/max, abs_max and histograms must be equal;
// moments agree to 2e-6 relative (float inputs: float partials over each 16-byte vector, then double).
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "tensorvigil/device.h"
#include "tensorvigil/error.h"
#include "tensorvigil/stats/reduce.h"
#include "tensorvigil/stats/reduce_cuda.h"

namespace tv = tensorvigil;

namespace {

#define REQUIRE_GPU()                                          \
  do {                                                         \
    if (!tv::cuda_available()) GTEST_SKIP() << "no CUDA device"; \
  } while (0)

// Random bytes of `n` elements of `dt`, with some NaN/Inf when `special`.
std::vector<uint8_t> make_bytes(tv::DType dt, std::size_t n, uint64_t seed, bool special) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.5, 2.0);
  const std::size_t es = tv::dtype_size(dt);
  std::vector<uint8_t> b(n * es);
  for (std::size_t i = 0; i < n; ++i) {
    double v = nd(rng);
    if (rng() % 17 == 0) v = 0.0;
    if (special && rng() % 97 == 0) v = (rng() % 3 == 0) ? NAN : (rng() % 2 ? INFINITY : -INFINITY);
    uint8_t* p = b.data() + i * es;
    switch (dt) {
      case tv::DType::kFloat64: std::memcpy(p, &v, 8); break;
      case tv::DType::kFloat32: {
        float f = static_cast<float>(v * 1e3);
        std::memcpy(p, &f, 4);
        break;
      }
      case tv::DType::kBFloat16: {
        float f = static_cast<float>(v);
        uint32_t u;
        std::memcpy(&u, &f, 4);
        uint16_t h = static_cast<uint16_t>(u >> 16);
        std::memcpy(p, &h, 2);
        break;
      }
      case tv::DType::kFloat16: {
        // Random finite halves over a wide exponent range (subnormals included).
        uint16_t h = static_cast<uint16_t>(((rng() & 1) << 15) | ((rng() % 31) << 10) | (rng() & 0x3ff));
        if (v == 0.0) h = 0;
        if (std::isnan(v)) h = 0x7e00;
        if (std::isinf(v)) h = v > 0 ? 0x7c00 : 0xfc00;
        std::memcpy(p, &h, 2);
        break;
      }
      default:  // fp8: every bit pattern (NaN, and Inf for e5m2, included)
        *p = static_cast<uint8_t>(special ? rng() : (rng() & 0x77));
        break;
    }
  }
  return b;
}

struct DevBuf {
  void* p = nullptr;
  explicit DevBuf(const std::vector<uint8_t>& h, std::size_t offset = 0) {
    EXPECT_EQ(cudaMalloc(&p, h.size() + offset + 16), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(static_cast<uint8_t*>(p) + offset, h.data(), h.size(), cudaMemcpyHostToDevice),
              cudaSuccess);
  }
  ~DevBuf() { cudaFree(p); }
};

// Relative tolerance of the moments: float inputs accumulate float partials of <= 16 terms.
constexpr double kTol = 2e-6;

void expect_same(const tv::TensorStats& g, const tv::TensorStats& c, const std::string& what) {
  SCOPED_TRACE(what);
  EXPECT_EQ(g.numel, c.numel);
  EXPECT_EQ(g.nan, c.nan);
  EXPECT_EQ(g.posinf, c.posinf);
  EXPECT_EQ(g.neginf, c.neginf);
  EXPECT_EQ(g.zeros, c.zeros);
  if (std::isnan(c.min)) {
    EXPECT_TRUE(std::isnan(g.min));
    EXPECT_TRUE(std::isnan(g.max));
  } else {
    EXPECT_EQ(g.min, c.min);
    EXPECT_EQ(g.max, c.max);
  }
  EXPECT_EQ(g.abs_max, c.abs_max);
  const double scale = c.finite() ? std::fabs(c.mean) + c.std() : 0.0;  // std() is NaN when empty
  EXPECT_NEAR(g.mean, c.mean, kTol * scale + 1e-300);
  EXPECT_NEAR(g.m2, c.m2, kTol * c.m2 + 1e-300);
  EXPECT_NEAR(g.abs_sum, c.abs_sum, kTol * c.abs_sum + 1e-300);
  EXPECT_EQ(g.hist, c.hist);
  EXPECT_EQ(g.hist_below, c.hist_below);
  EXPECT_EQ(g.hist_above, c.hist_above);
  EXPECT_EQ(g.hist_lo, c.hist_lo);
  EXPECT_EQ(g.hist_hi, c.hist_hi);
  EXPECT_EQ(g.exp_hist, c.exp_hist);
}

const tv::DType kDtypes[] = {tv::DType::kFloat32, tv::DType::kFloat64, tv::DType::kFloat16,
                             tv::DType::kBFloat16, tv::DType::kFloat8E4M3, tv::DType::kFloat8E5M2};

void run_mixed(const tv::StatsOptions& opt, const std::vector<std::size_t>& sizes, bool special) {
  std::vector<std::vector<uint8_t>> host;
  std::vector<std::unique_ptr<DevBuf>> dev;
  std::vector<tv::TensorView> dviews, hviews;
  uint64_t seed = 1;
  for (tv::DType dt : kDtypes) {
    for (std::size_t n : sizes) {
      host.push_back(make_bytes(dt, n, seed++, special));
      // Every third tensor starts one element past a 16-byte boundary (unaligned path).
      const std::size_t off = (seed % 3 == 0) ? tv::dtype_size(dt) : 0;
      dev.push_back(std::make_unique<DevBuf>(host.back(), off));
      tv::TensorView h;
      h.data = host.back().data();
      h.dtype = dt;
      h.shape = std::vector<int64_t>(1, static_cast<int64_t>(n));
      hviews.push_back(h);
      tv::TensorView d = h;
      d.data = static_cast<uint8_t*>(dev.back()->p) + off;
      d.device = tv::DeviceType::kCuda;
      dviews.push_back(d);
    }
  }
  std::vector<tv::TensorStats> g = tv::compute_stats_cuda(dviews, opt, 0);
  ASSERT_EQ(g.size(), hviews.size());
  for (std::size_t i = 0; i < hviews.size(); ++i)
    expect_same(g[i], tv::compute_stats(hviews[i], opt),
                std::string(tv::dtype_name(hviews[i].dtype)) + " n=" +
                    std::to_string(hviews[i].numel()));
}

}  // namespace

TEST(StatsCuda, MixedDtypesAndSizesMatchCpu) {
  REQUIRE_GPU();
  tv::StatsOptions opt;
  opt.exp_hist = true;
  run_mixed(opt, {0, 1, 7, 1000, 65537, 300001, (1u << 20) + 3}, true);
}

TEST(StatsCuda, AllFiniteFastPath) {
  REQUIRE_GPU();
  run_mixed({}, {5, 4096, 1u << 18, (1u << 21) + 17}, false);
}

TEST(StatsCuda, AutoRangeHistogram) {
  REQUIRE_GPU();
  tv::StatsOptions opt;
  opt.hist_bins = 64;
  opt.exp_hist = true;
  run_mixed(opt, {0, 1, 100, 200003}, true);
}

TEST(StatsCuda, FixedRangeHistogram) {
  REQUIRE_GPU();
  tv::StatsOptions opt;
  opt.hist_bins = 4096;
  opt.hist_auto_range = false;
  opt.hist_lo = -1.0;
  opt.hist_hi = 1.5;
  run_mixed(opt, {3, 70000}, true);
}

TEST(StatsCuda, ManySmallTensors) {
  REQUIRE_GPU();
  std::vector<std::size_t> sizes;
  std::mt19937 rng(7);
  for (int i = 0; i < 100; ++i) sizes.push_back(rng() % 3000);
  tv::StatsOptions opt;
  opt.exp_hist = true;
  run_mixed(opt, sizes, true);
}

TEST(StatsCuda, ConstantTensorIsExact) {
  REQUIRE_GPU();
  std::vector<float> ones(1000003, 1.0f);
  std::vector<uint8_t> b(ones.size() * 4);
  std::memcpy(b.data(), ones.data(), b.size());
  DevBuf d(b);
  tv::TensorView v;
  v.data = d.p;
  v.shape = std::vector<int64_t>(1, static_cast<int64_t>(ones.size()));
  v.device = tv::DeviceType::kCuda;
  tv::TensorStats s = tv::compute_stats_cuda({v})[0];
  EXPECT_EQ(s.mean, 1.0);
  EXPECT_EQ(s.m2, 0.0);
  EXPECT_EQ(s.abs_sum, static_cast<double>(ones.size()));
}

TEST(StatsCuda, AsyncResultIsIdempotent) {
  REQUIRE_GPU();
  std::vector<uint8_t> b = make_bytes(tv::DType::kFloat32, 1 << 20, 3, true);
  DevBuf d(b);
  tv::CudaStatsRequest q;
  q.view.data = d.p;
  q.view.shape = std::vector<int64_t>(1, 1 << 20);
  q.view.device = tv::DeviceType::kCuda;
  tv::CudaPendingStats p = tv::compute_stats_cuda_async({q, q}, false, 0);
  const auto& a = p.result();
  EXPECT_TRUE(p.ready());
  const auto& c = p.result();
  ASSERT_EQ(a.size(), 2u);
  EXPECT_EQ(&a, &c);
  EXPECT_EQ(a[0].mean, a[1].mean);  // deterministic
}

TEST(StatsCuda, RejectsHostViewsAndIntegerDtypes) {
  REQUIRE_GPU();
  std::vector<float> x(4, 1.0f);
  tv::TensorView v;
  v.data = x.data();
  v.shape = std::vector<int64_t>(1, 4);
  EXPECT_THROW(tv::compute_stats_cuda({v}), tv::Error);
  v.device = tv::DeviceType::kCuda;
  v.dtype = tv::DType::kInt32;
  try {
    tv::compute_stats_cuda({v});
    FAIL();
  } catch (const tv::Error& e) {
    EXPECT_EQ(e.code(), tv::ErrorCode::kInvalidArgument);
  }
}
