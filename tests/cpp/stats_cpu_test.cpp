// Fused CPU statistics against a scalar long-double reference. Every float dtype accumulates in
// double, so moments of float32/float16/bfloat16 inputs must match a float64 reference to ~1e-12
// (kAcc below; the mean relative to |mean| + std).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "tensorvigil/error.h"
#include "tensorvigil/stats/reduce.h"
#include "tensorvigil/stats/stats.h"

namespace tensorvigil::internal {
void stats_set_simd(bool enabled);
bool stats_simd_active();
}  // namespace tensorvigil::internal

namespace tv = tensorvigil;

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

struct Ref {
  uint64_t numel = 0, nan = 0, posinf = 0, neginf = 0, zeros = 0, n = 0;
  double min = kNaN, max = kNaN, mean = 0, var = kNaN, abs_sum = 0, abs_max = 0, l2 = 0;
  std::vector<uint64_t> hist;
  uint64_t below = 0, above = 0;
  std::vector<uint64_t> exp_hist;
};

// Two-pass long-double reference over values already converted to double.
Ref reference(const std::vector<double>& v, int bins = 0, double lo = 0, double hi = 1) {
  Ref r;
  r.numel = v.size();
  long double s = 0, as = 0, sq = 0;
  double mn = kInf, mx = -kInf;
  r.exp_hist.assign(tv::kExpHistBuckets, 0);
  for (double x : v) {
    if (std::isnan(x)) {
      ++r.nan;
      continue;
    }
    if (std::isinf(x)) {
      (x > 0 ? r.posinf : r.neginf)++;
      continue;
    }
    ++r.n;
    if (x == 0)
      ++r.zeros;
    else {
      int e;
      std::frexp(x, &e);
      int k = std::min(std::max(e - 1 + tv::kExpHistBias, 0), tv::kExpHistBuckets - 1);
      ++r.exp_hist[static_cast<size_t>(k)];
    }
    s += x;
    as += std::fabs(x);
    sq += static_cast<long double>(x) * x;
    mn = std::min(mn, x);
    mx = std::max(mx, x);
    r.abs_max = std::max(r.abs_max, std::fabs(x));
  }
  if (r.n) {
    long double m = s / r.n, q = 0;
    for (double x : v)
      if (std::isfinite(x)) q += (x - m) * (x - m);
    r.mean = static_cast<double>(m);
    r.var = static_cast<double>(q / r.n);
    r.min = mn;
    r.max = mx;
  }
  r.abs_sum = static_cast<double>(as);
  r.l2 = static_cast<double>(std::sqrt(sq));
  if (bins) {
    tv::TensorStats t;
    t.hist.assign(bins, 0);
    t.hist_lo = lo;
    t.hist_hi = hi;
    std::vector<double> e = t.hist_edges();
    r.hist.assign(bins, 0);
    for (double x : v) {
      if (!std::isfinite(x)) continue;
      if (x < lo) {
        ++r.below;
        continue;
      }
      if (x > hi) {
        ++r.above;
        continue;
      }
      int b = bins - 1;
      while (b > 0 && x < e[b]) --b;  // linear search: independent of the kernel's arithmetic
      ++r.hist[b];
    }
  }
  return r;
}

bool close(double a, double b, double rtol, double atol = 0) {
  if (std::isnan(a) || std::isnan(b)) return std::isnan(a) && std::isnan(b);
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::fabs(a - b) <= atol + rtol * std::fabs(b);
}

void expect_match(const tv::TensorStats& s, const Ref& r, double rtol, const char* what) {
  SCOPED_TRACE(what);
  EXPECT_EQ(s.numel, r.numel);
  EXPECT_EQ(s.nan, r.nan);
  EXPECT_EQ(s.posinf, r.posinf);
  EXPECT_EQ(s.neginf, r.neginf);
  EXPECT_EQ(s.zeros, r.zeros);
  EXPECT_EQ(s.finite(), r.n);
  EXPECT_TRUE(close(s.min, r.min, 0)) << s.min << " vs " << r.min;
  EXPECT_TRUE(close(s.max, r.max, 0)) << s.max << " vs " << r.max;
  EXPECT_TRUE(close(s.abs_max, r.abs_max, 0)) << s.abs_max << " vs " << r.abs_max;
  const double scale = std::sqrt(std::isnan(r.var) ? 0 : r.var) + 1e-300;
  EXPECT_TRUE(close(s.mean, r.mean, rtol, rtol * scale)) << s.mean << " vs " << r.mean;
  if (r.n)
    EXPECT_TRUE(close(s.var(), r.var, rtol, 1e-300)) << s.var() << " vs " << r.var;
  else
    EXPECT_TRUE(std::isnan(s.var()));
  EXPECT_TRUE(close(s.abs_sum, r.abs_sum, rtol)) << s.abs_sum << " vs " << r.abs_sum;
  if (std::isfinite(r.l2)) {
    EXPECT_TRUE(close(s.l2(), r.l2, rtol)) << s.l2() << " vs " << r.l2;
  }
}

// Accuracy of every float dtype's moments against the float64 (long double) reference.
constexpr double kAcc = 1e-11;

uint16_t float_to_half(float f) {  // round-to-nearest-even, good enough for test data
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  int32_t e = static_cast<int32_t>((x >> 23) & 0xff) - 127 + 15;
  uint32_t m = x & 0x7fffffu;
  if (((x >> 23) & 0xff) == 0xff) return static_cast<uint16_t>(sign | 0x7c00u | (m ? 0x200u : 0));
  if (e >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
  if (e <= 0) {
    if (e < -10) return static_cast<uint16_t>(sign);
    m |= 0x800000u;
    uint32_t shift = static_cast<uint32_t>(14 - e);
    uint32_t h = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (static_cast<uint32_t>(e) << 10) | (m >> 13);
  uint32_t rem = m & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1))) ++h;
  return static_cast<uint16_t>(sign | h);
}

tv::TensorView view_of(const void* p, tv::DType dt, std::vector<int64_t> shape) {
  tv::TensorView v;
  v.data = p;
  v.dtype = dt;
  v.shape = std::move(shape);
  return v;
}

std::vector<float> random_floats(size_t n, uint32_t seed, double mean = 0.3, double sd = 2.0) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> d(mean, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(d(rng));
  return v;
}

// Runs every test twice: with the SIMD kernels (when the CPU has them) and the generic ones.
class StatsCpu : public ::testing::TestWithParam<bool> {
 protected:
  void SetUp() override { tv::internal::stats_set_simd(GetParam()); }
  void TearDown() override { tv::internal::stats_set_simd(true); }
};

TEST_P(StatsCpu, Float32RandomMatchesReference) {
  for (size_t n : {1u, 7u, 8u, 127u, 128u, 129u, 4095u, 4096u, 4097u, 100003u, 600001u}) {
    auto v = random_floats(n, static_cast<uint32_t>(n));
    std::vector<double> d(v.begin(), v.end());
    tv::StatsOptions o;
    o.exp_hist = true;
    auto s =
        tv::compute_stats(view_of(v.data(), tv::DType::kFloat32, {static_cast<int64_t>(n)}), o);
    Ref r = reference(d);
    expect_match(s, r, kAcc, "f32");
    EXPECT_EQ(s.exp_hist, r.exp_hist);
  }
}

TEST_P(StatsCpu, LargeMeanSmallSpread) {
  // |mean| >> std: shifted sums must keep the variance accurate.
  for (double mean : {1e3, 1e5, -3e6}) {
    auto v = random_floats(300000, 11, mean, 1.0);
    std::vector<double> d(v.begin(), v.end());
    auto s = tv::compute_stats(view_of(v.data(), tv::DType::kFloat32, {300000}));
    expect_match(s, reference(d), kAcc, "f32 large mean");
    std::vector<double> w(300000);
    std::mt19937 rng(5);
    std::normal_distribution<double> nd(mean * 10, 1e-3);  // |mean| / std up to 3e10
    for (auto& x : w) x = nd(rng);
    auto s64 = tv::compute_stats(view_of(w.data(), tv::DType::kFloat64, {300000}));
    expect_match(s64, reference(w), 1e-8, "f64 large mean");
  }
}

TEST_P(StatsCpu, SortedAndStructuredData) {
  std::vector<float> v(200000);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i) * 0.5f - 1000.f;
  std::vector<double> d(v.begin(), v.end());
  auto s = tv::compute_stats(view_of(v.data(), tv::DType::kFloat32, {200000}));
  expect_match(s, reference(d), kAcc, "sorted");
}

TEST_P(StatsCpu, Float64AndExtremes) {
  std::mt19937 rng(3);
  std::normal_distribution<double> nd(0, 1);
  std::vector<double> v(50000);
  for (auto& x : v) x = nd(rng) * 1e300;
  auto s = tv::compute_stats(view_of(v.data(), tv::DType::kFloat64, {50000}));
  EXPECT_TRUE(std::isinf(s.m2));  // sum of squares overflows double, like numpy's var
  EXPECT_TRUE(close(s.mean, reference(v).mean, 1e-9, 1e288));
  EXPECT_TRUE(close(s.abs_sum, reference(v).abs_sum, 1e-9));
  // float32 values whose squares overflow float but not double.
  std::vector<float> f(10000);
  for (size_t i = 0; i < f.size(); ++i) f[i] = static_cast<float>(nd(rng) * 1e36);
  std::vector<double> fd(f.begin(), f.end());
  auto sf = tv::compute_stats(view_of(f.data(), tv::DType::kFloat32, {10000}));
  expect_match(sf, reference(fd), kAcc, "f32 huge");
  // Tiny float32 values whose squares underflow float.
  for (size_t i = 0; i < f.size(); ++i) f[i] = static_cast<float>(nd(rng) * 1e-30);
  fd.assign(f.begin(), f.end());
  sf = tv::compute_stats(view_of(f.data(), tv::DType::kFloat32, {10000}));
  expect_match(sf, reference(fd), kAcc, "f32 tiny");
}

TEST_P(StatsCpu, NanInfZeros) {
  auto v = random_floats(20000, 9);
  std::mt19937 rng(1);
  for (int i = 0; i < 300; ++i) {
    size_t k = rng() % v.size();
    switch (i % 4) {
      case 0:
        v[k] = std::numeric_limits<float>::quiet_NaN();
        break;
      case 1:
        v[k] = std::numeric_limits<float>::infinity();
        break;
      case 2:
        v[k] = -std::numeric_limits<float>::infinity();
        break;
      case 3:
        v[k] = (i & 8) ? -0.0f : 0.0f;
        break;
    }
  }
  std::vector<double> d(v.begin(), v.end());
  tv::StatsOptions o;
  o.exp_hist = true;
  o.hist_bins = 33;
  auto s = tv::compute_stats(view_of(v.data(), tv::DType::kFloat32, {20000}), o);
  Ref r = reference(d, 33, s.hist_lo, s.hist_hi);
  expect_match(s, r, kAcc, "nan/inf");
  EXPECT_EQ(s.exp_hist, r.exp_hist);
  EXPECT_EQ(s.hist, r.hist);
  EXPECT_EQ(s.hist_lo, r.min);
  EXPECT_EQ(s.hist_hi, r.max);

  std::vector<float> all_nan(1000, std::numeric_limits<float>::quiet_NaN());
  auto sn = tv::compute_stats(view_of(all_nan.data(), tv::DType::kFloat32, {1000}), o);
  EXPECT_EQ(sn.nan, 1000u);
  EXPECT_EQ(sn.finite(), 0u);
  EXPECT_TRUE(std::isnan(sn.min));
  EXPECT_TRUE(std::isnan(sn.var()));
  EXPECT_EQ(sn.mean, 0.0);
  EXPECT_EQ(sn.hist_lo, 0.0);
  EXPECT_EQ(sn.hist_hi, 1.0);

  std::vector<float> zeros(5000, 0.0f);
  auto sz = tv::compute_stats(view_of(zeros.data(), tv::DType::kFloat32, {5000}), o);
  EXPECT_EQ(sz.zeros, 5000u);
  EXPECT_EQ(sz.min, 0.0);
  EXPECT_EQ(sz.var(), 0.0);
  EXPECT_EQ(sz.hist_lo, -0.5);
  EXPECT_EQ(sz.hist[16], 5000u);
  for (auto c : sz.exp_hist) EXPECT_EQ(c, 0u);
}

TEST_P(StatsCpu, EveryDtype) {
  const size_t n = 9001;
  auto f = random_floats(n, 4, 0.5, 3.0);
  std::vector<double> ref;
  auto check = [&](const void* p, tv::DType dt, double rtol) {
    tv::StatsOptions o;
    o.exp_hist = true;
    o.hist_bins = 16;
    o.hist_auto_range = false;
    o.hist_lo = -4;
    o.hist_hi = 6;
    auto s = tv::compute_stats(view_of(p, dt, {static_cast<int64_t>(n)}), o);
    Ref r = reference(ref, 16, -4, 6);
    expect_match(s, r, rtol, tv::dtype_name(dt));
    EXPECT_EQ(s.hist, r.hist) << tv::dtype_name(dt);
    EXPECT_EQ(s.hist_below, r.below);
    EXPECT_EQ(s.hist_above, r.above);
    EXPECT_EQ(s.exp_hist, r.exp_hist) << tv::dtype_name(dt);
  };
  {
    std::vector<double> v(f.begin(), f.end());
    ref = v;
    check(v.data(), tv::DType::kFloat64, 1e-12);
  }
  {
    std::vector<uint16_t> h(n);
    ref.resize(n);
    for (size_t i = 0; i < n; ++i) {
      h[i] = float_to_half(f[i]);
      ref[i] = tv::half_to_float(h[i]);
    }
    check(h.data(), tv::DType::kFloat16, kAcc);
    std::vector<uint16_t> b(n);
    for (size_t i = 0; i < n; ++i) {
      uint32_t u;
      std::memcpy(&u, &f[i], 4);
      b[i] = static_cast<uint16_t>(u >> 16);
      ref[i] = tv::bf16_to_float(b[i]);
    }
    check(b.data(), tv::DType::kBFloat16, kAcc);
  }
  {
    std::vector<uint8_t> q(n);
    for (size_t i = 0; i < n; ++i) {
      q[i] = static_cast<uint8_t>(i * 37);
      ref[i] = tv::fp8_e4m3_to_float(q[i]);
    }
    check(q.data(), tv::DType::kFloat8E4M3, 1e-12);
    for (size_t i = 0; i < n; ++i) ref[i] = tv::fp8_e5m2_to_float(q[i]);
    check(q.data(), tv::DType::kFloat8E5M2, 1e-12);
  }
  auto ints = [&](auto tag, tv::DType dt, double scale) {
    using T = decltype(tag);
    std::vector<T> x(n);
    for (size_t i = 0; i < n; ++i) {
      x[i] = static_cast<T>(std::lround(f[i] * scale));
      ref[i] = static_cast<double>(x[i]);
    }
    check(x.data(), dt, 1e-12);
  };
  ints(int8_t{}, tv::DType::kInt8, 1.0);
  ints(int16_t{}, tv::DType::kInt16, 1000.0);
  ints(int32_t{}, tv::DType::kInt32, 1e6);
  ints(int64_t{}, tv::DType::kInt64, 1e9);
  {
    std::vector<uint8_t> x(n);
    for (size_t i = 0; i < n; ++i) {
      x[i] = static_cast<uint8_t>(i % 7);
      ref[i] = x[i];
    }
    check(x.data(), tv::DType::kUInt8, 1e-12);
    for (size_t i = 0; i < n; ++i) {
      x[i] = f[i] > 0;
      ref[i] = x[i];
    }
    check(x.data(), tv::DType::kBool, 1e-12);
  }
}

TEST_P(StatsCpu, EmptyAndScalar) {
  float one = 2.5f;
  tv::StatsOptions o;
  o.hist_bins = 4;
  o.exp_hist = true;
  auto s0 = tv::compute_stats(view_of(&one, tv::DType::kFloat32, {}), o);
  EXPECT_EQ(s0.numel, 1u);
  EXPECT_EQ(s0.mean, 2.5);
  EXPECT_EQ(s0.var(), 0.0);
  EXPECT_EQ(s0.hist_lo, 2.0);
  EXPECT_EQ(s0.hist_hi, 3.0);
  EXPECT_EQ(s0.hist[2], 1u);
  EXPECT_EQ(s0.exp_hist[1 + tv::kExpHistBias], 1u);
  auto se = tv::compute_stats(view_of(nullptr, tv::DType::kFloat32, {3, 0}), o);
  EXPECT_EQ(se.numel, 0u);
  EXPECT_TRUE(std::isnan(se.min));
  EXPECT_TRUE(std::isnan(se.var()));
  EXPECT_EQ(se.hist.size(), 4u);
  EXPECT_EQ(se.exp_hist.size(), static_cast<size_t>(tv::kExpHistBuckets));
  EXPECT_EQ(se.l2(), 0.0);
}

TEST_P(StatsCpu, HistogramEdges) {
  // Values exactly on edges: [0, 10] with 10 bins, the last bin closed.
  std::vector<float> v;
  for (int i = -2; i <= 12; ++i) v.push_back(static_cast<float>(i));
  v.push_back(9.999999f);
  v.push_back(std::nextafter(0.0f, -1.0f));
  tv::StatsOptions o;
  o.hist_bins = 10;
  o.hist_auto_range = false;
  o.hist_lo = 0;
  o.hist_hi = 10;
  auto s = tv::compute_stats(
      view_of(v.data(), tv::DType::kFloat32, {static_cast<int64_t>(v.size())}), o);
  std::vector<uint64_t> want = {1, 1, 1, 1, 1, 1, 1, 1, 1, 3};
  EXPECT_EQ(s.hist, want);
  EXPECT_EQ(s.hist_below, 3u);
  EXPECT_EQ(s.hist_above, 2u);
  auto e = s.hist_edges();
  ASSERT_EQ(e.size(), 11u);
  EXPECT_EQ(e[0], 0.0);
  EXPECT_EQ(e[10], 10.0);
  // Random data against edge search, for awkward ranges.
  auto r = random_floats(50000, 77, 0.0, 1.0);
  std::vector<double> d(r.begin(), r.end());
  for (auto range :
       {std::pair<double, double>{-1, 1}, {-0.3, 0.7000001}, {1e6, 1e6 + 1}, {-1e-3, 1e-3}}) {
    for (int bins : {1, 3, 64, 4096}) {
      o.hist_bins = bins;
      o.hist_lo = range.first;
      o.hist_hi = range.second;
      auto h = tv::compute_stats(view_of(r.data(), tv::DType::kFloat32, {50000}), o);
      Ref ref = reference(d, bins, range.first, range.second);
      EXPECT_EQ(h.hist, ref.hist) << bins << " bins over " << range.first;
      EXPECT_EQ(h.hist_below, ref.below);
      EXPECT_EQ(h.hist_above, ref.above);
    }
  }
}

TEST_P(StatsCpu, MergeOfPartsEqualsWhole) {
  auto v = random_floats(300001, 21, 5.0, 0.1);
  std::vector<double> d(v.begin(), v.end());
  tv::StatsOptions o;
  o.hist_bins = 20;
  o.hist_auto_range = false;
  o.hist_lo = 4.5;
  o.hist_hi = 5.5;
  o.exp_hist = true;
  auto whole = tv::compute_stats(view_of(v.data(), tv::DType::kFloat32, {300001}), o);
  const size_t cuts[] = {0, 1, 1000, 77777, 200000, 300001};
  tv::TensorStats left, right;
  std::vector<tv::TensorStats> parts;
  for (int i = 0; i + 1 < 6; ++i)
    parts.push_back(tv::compute_stats(view_of(v.data() + cuts[i], tv::DType::kFloat32,
                                              {static_cast<int64_t>(cuts[i + 1] - cuts[i])}),
                                      o));
  for (auto& p : parts) left.merge(p);
  // Associativity: ((p0 p1)(p2 (p3 p4))).
  tv::TensorStats a = parts[0], b = parts[3];
  a.merge(parts[1]);
  b.merge(parts[4]);
  tv::TensorStats c = parts[2];
  c.merge(b);
  a.merge(c);
  for (const auto* m : {&left, &a}) {
    EXPECT_EQ(m->numel, whole.numel);
    EXPECT_EQ(m->min, whole.min);
    EXPECT_EQ(m->max, whole.max);
    EXPECT_TRUE(close(m->mean, whole.mean, 1e-12));
    EXPECT_TRUE(close(m->var(), whole.var(), kAcc));
    EXPECT_TRUE(close(m->abs_sum, whole.abs_sum, 1e-9));
    EXPECT_EQ(m->hist, whole.hist);
    EXPECT_EQ(m->hist_below, whole.hist_below);
    EXPECT_EQ(m->exp_hist, whole.exp_hist);
  }
  expect_match(left, reference(d), kAcc, "merged");
  tv::TensorStats other = parts[0];
  tv::StatsOptions o2 = o;
  o2.hist_bins = 21;
  auto mismatched = tv::compute_stats(view_of(v.data(), tv::DType::kFloat32, {10}), o2);
  EXPECT_THROW(other.merge(mismatched), tv::Error);
  try {
    other.merge(mismatched);
  } catch (const tv::Error& e) {
    EXPECT_EQ(e.code(), tv::ErrorCode::kInvalidArgument);
  }
}

TEST_P(StatsCpu, ThreadsGiveIdenticalResults) {
  auto v = random_floats(3'000'000, 8, -1.0, 4.0);
  tv::StatsOptions o;
  o.hist_bins = 64;
  o.exp_hist = true;
  o.num_threads = 1;
  auto s1 = tv::compute_stats(view_of(v.data(), tv::DType::kFloat32, {3'000'000}), o);
  o.num_threads = 4;
  auto s4 = tv::compute_stats(view_of(v.data(), tv::DType::kFloat32, {3'000'000}), o);
  EXPECT_EQ(s1.mean, s4.mean);
  EXPECT_EQ(s1.m2, s4.m2);
  EXPECT_EQ(s1.abs_sum, s4.abs_sum);
  EXPECT_EQ(s1.hist, s4.hist);
  EXPECT_EQ(s1.exp_hist, s4.exp_hist);
  std::vector<double> d(v.begin(), v.end());
  expect_match(s4, reference(d), kAcc, "threads");
}

TEST_P(StatsCpu, ManyTensors) {
  std::vector<std::vector<float>> data;
  std::vector<tv::TensorView> views;
  for (int i = 0; i < 40; ++i)
    data.push_back(random_floats(static_cast<size_t>(1) << (i % 20), i, i, 1 + i));
  data.push_back({});
  for (auto& d : data)
    views.push_back(view_of(d.data(), tv::DType::kFloat32, {static_cast<int64_t>(d.size())}));
  tv::StatsOptions o;
  o.hist_bins = 8;
  auto all = tv::compute_stats_many(views, o);
  ASSERT_EQ(all.size(), views.size());
  for (size_t i = 0; i < views.size(); ++i) {
    auto one = tv::compute_stats(views[i], o);
    EXPECT_EQ(all[i].numel, one.numel);
    EXPECT_EQ(all[i].mean, one.mean);
    EXPECT_EQ(all[i].hist, one.hist);
    std::vector<double> d(data[i].begin(), data[i].end());
    expect_match(all[i], reference(d), kAcc, "many");
  }
}

// float32/float16/bfloat16 moments against float64 over random sizes (every kernel path: the
// 16-element fast loop, the masked rest, the scalar tail, several blocks and chunks) and data
// shapes: zero mean, |mean| >> std, mixed scales, NaN/Inf sprinkled in.
TEST_P(StatsCpu, FloatInputsMatchFloat64) {
  std::mt19937 rng(2024);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::normal_distribution<double> nd(0.0, 1.0);
  for (int trial = 0; trial < 60; ++trial) {
    // Sizes from 1 to ~600K, log-uniform, plus the block/chunk boundaries now and then.
    size_t n = static_cast<size_t>(std::exp(unit(rng) * std::log(600000.0))) + 1;
    if (trial % 10 == 3) n = 4096 * (1 + trial % 3) + trial % 2;
    if (trial % 10 == 7) n = 262144 + 15;
    std::vector<double> src(n);
    const int style = trial % 5;
    const double scale = std::pow(10.0, unit(rng) * 8 - 4);
    for (auto& x : src) {
      const double z = nd(rng);
      switch (style) {
        case 0:  // zero-centred
          x = z * scale;
          break;
        case 1:  // |mean| / std = 1e4
          x = 1e4 + z;
          break;
        case 2:  // |mean| / std = 3e8
          x = -3e6 * scale + z * 1e-2 * scale;
          break;
        case 3:  // 1% outliers
          x = (z + 0.5) * scale * (unit(rng) < 0.01 ? 1e3 : 1.0);
          break;
        default:  // all positive, skewed
          x = z * z * scale;
          break;
      }
    }
    if (style == 0 && n > 1) {  // exactly zero-mean in double before rounding
      double m = 0;
      for (double x : src) m += x;
      m /= static_cast<double>(n);
      for (auto& x : src) x -= m;
    }
    std::vector<float> f(src.begin(), src.end());
    if (trial % 4 == 1)
      for (int k = 0; k < 3; ++k) {
        f[rng() % n] = std::numeric_limits<float>::quiet_NaN();
        f[rng() % n] = -std::numeric_limits<float>::infinity();
      }
    const int64_t len = static_cast<int64_t>(n);
    std::vector<double> ref(f.begin(), f.end());
    SCOPED_TRACE("trial " + std::to_string(trial) + " n " + std::to_string(n));
    expect_match(tv::compute_stats(view_of(f.data(), tv::DType::kFloat32, {len})), reference(ref),
                 kAcc, "f32");
    std::vector<uint16_t> h(n), b(n);
    for (size_t i = 0; i < n; ++i) {
      h[i] = float_to_half(f[i]);
      uint32_t u;
      std::memcpy(&u, &f[i], 4);
      b[i] = static_cast<uint16_t>(u >> 16);  // truncation: still a bf16 value
    }
    for (size_t i = 0; i < n; ++i) ref[i] = tv::half_to_float(h[i]);
    Ref rh = reference(ref);
    if (std::isfinite(rh.var))
      expect_match(tv::compute_stats(view_of(h.data(), tv::DType::kFloat16, {len})), rh, kAcc,
                   "f16");
    for (size_t i = 0; i < n; ++i) ref[i] = tv::bf16_to_float(b[i]);
    expect_match(tv::compute_stats(view_of(b.data(), tv::DType::kBFloat16, {len})), reference(ref),
                 kAcc, "bf16");
  }
}

// The one-chunk fast path of compute_stats (no thread pool, no task list) gives exactly the
// record of the general path, for every size it covers.
TEST_P(StatsCpu, SmallTensorPathMatchesGeneralPath) {
  auto v = random_floats(262144 + 1, 31, 2.0, 0.5);
  for (size_t n : {0u, 1u, 7u, 8u, 15u, 16u, 17u, 100u, 4096u, 4097u, 262144u, 262145u}) {
    for (bool exp : {false, true}) {
      tv::StatsOptions o;
      o.exp_hist = exp;
      auto view = view_of(v.data(), tv::DType::kFloat32, {static_cast<int64_t>(n)});
      auto one = tv::compute_stats(view, o);
      auto many = tv::compute_stats_many({view, view}, o);
      for (const auto& m : many) {
        EXPECT_EQ(m.numel, one.numel) << n;
        EXPECT_EQ(m.zeros, one.zeros);
        EXPECT_TRUE(close(m.min, one.min, 0) && close(m.max, one.max, 0));
        EXPECT_EQ(m.mean, one.mean) << n;
        EXPECT_EQ(m.m2, one.m2) << n;
        EXPECT_EQ(m.abs_sum, one.abs_sum) << n;
        EXPECT_EQ(m.abs_max, one.abs_max);
        EXPECT_EQ(m.exp_hist, one.exp_hist);
        EXPECT_TRUE(m.hist.empty());
      }
      EXPECT_EQ(one.exp_hist.size(), exp ? static_cast<size_t>(tv::kExpHistBuckets) : 0u);
    }
  }
}

// Many tiny tensors (a training step's biases and scalars): batched across threads, results in
// order and equal to one call per tensor, whatever the thread count.
TEST_P(StatsCpu, ManyTinyTensors) {
  std::vector<std::vector<float>> data;
  std::vector<tv::TensorView> views;
  for (int i = 0; i < 1000; ++i) data.push_back(random_floats(1 + i % 13, i, i * 0.1, 1.0));
  for (auto& d : data)
    views.push_back(view_of(d.data(), tv::DType::kFloat32, {static_cast<int64_t>(d.size())}));
  views.push_back(view_of(nullptr, tv::DType::kFloat32, {0}));
  for (int threads : {1, 2, 4}) {
    tv::StatsOptions o;
    o.num_threads = threads;
    auto all = tv::compute_stats_many(views, o);
    ASSERT_EQ(all.size(), views.size());
    for (size_t i = 0; i < views.size(); ++i) {
      auto one = tv::compute_stats(views[i]);
      EXPECT_EQ(all[i].numel, one.numel);
      EXPECT_EQ(all[i].mean, one.mean);
      EXPECT_EQ(all[i].m2, one.m2);
    }
    std::vector<double> d(data[500].begin(), data[500].end());
    expect_match(all[500], reference(d), kAcc, "tiny");
  }
}

TEST_P(StatsCpu, BadArguments) {
  float x = 1;
  auto v = view_of(&x, tv::DType::kFloat32, {1});
  tv::StatsOptions o;
  o.hist_bins = -1;
  EXPECT_THROW(tv::compute_stats(v, o), tv::Error);
  o.hist_bins = tv::kMaxHistBins + 1;
  EXPECT_THROW(tv::compute_stats(v, o), tv::Error);
  o.hist_bins = 4;
  o.hist_auto_range = false;
  o.hist_lo = 1;
  o.hist_hi = 1;
  EXPECT_THROW(tv::compute_stats(v, o), tv::Error);
  o.hist_hi = kNaN;
  EXPECT_THROW(tv::compute_stats(v, o), tv::Error);
  v.device = tv::DeviceType::kCuda;
  try {
    tv::compute_stats(v);
    FAIL();
  } catch (const tv::Error& e) {
    EXPECT_EQ(e.code(), tv::ErrorCode::kUnsupported);
  }
}

INSTANTIATE_TEST_SUITE_P(Kernels, StatsCpu, ::testing::Values(true, false),
                         [](const ::testing::TestParamInfo<bool>& i) {
                           return i.param ? "simd" : "generic";
                         });

TEST(StatsThreads, NumThreadsSetting) {
  int before = tv::get_num_threads();
  EXPECT_GE(before, 1);
  tv::set_num_threads(3);
  EXPECT_EQ(tv::get_num_threads(), 3);
  tv::set_num_threads(0);
  EXPECT_EQ(tv::get_num_threads(), before);
}

}  // namespace
