// Fused single-pass CPU statistics. A tensor is cut into chunks (thread tasks) and chunks into
// cache-sized blocks; each block is read from memory once and every statistic is taken from it
// while it sits in L1. Moments use a per-block shift (previous block's mean) so that sums of
// deviations stay small when |mean| >> std; blocks merge with Chan's update in double.
//
// Accuracy (every dtype): all sums accumulate in double. float32, float16 and bfloat16 elements
// are classified and min/max taken in float lanes (exact), then widened exactly to double; the
// deviation from the shift (a float), its square and |x| are summed in double lanes (8 lanes x
// <= 512 terms per 4096-element block, then Chan over blocks). float8, integers and bool are
// converted to double (exact, int64 up to 2^53) and take the same double path as float64. So
// mean, var, l1 and l2 match a float64 (NumPy) reference computed from the same values to a few
// 1e-16 relative (measured <= 3e-16 for the mean relative to |mean| + std, <= 3e-14 for var,
// l1, l2); the tests assert 1e-11. Float lanes for the sums would be ~1.5x faster for 16-bit
// inputs but only ~1e-7 accurate, and the double lanes still keep float16/bfloat16 above half
// the read bandwidth on two threads (benchmarks/bench_stats.py).
//
// Small tensors: compute_stats of one chunk without a histogram runs on the calling thread with
// no task list, no pool dispatch and no heap allocation; compute_stats_many groups tiny tensors
// into a few batches per thread (or none when the total is tiny).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "tensorvigil/error.h"
#include "tensorvigil/internal/thread_pool.h"
#include "tensorvigil/stats/reduce.h"

#if defined(__x86_64__) || defined(_M_X64)
#define TV_X86 1
#include <immintrin.h>
#define TV_AVX2 __attribute__((target("avx2,fma,f16c")))
// Keeps loop-carried vector accumulators in registers (an empty asm that reads and writes them).
#define TV_PIN_REGS(a, b, c, d, e, f) asm("" : "+x"(a), "+x"(b), "+x"(c), "+x"(d), "+x"(e), "+x"(f))
#else
#define TV_X86 0
#endif

namespace tensorvigil {
namespace internal {
void stats_set_simd(bool enabled);
bool stats_simd_active();
}  // namespace internal

namespace {

constexpr std::size_t kBlock = 4096;      // elements per block (16 KiB of float32)
constexpr std::size_t kChunkBlocks = 64;  // blocks per thread task
constexpr std::size_t kChunk = kBlock * kChunkBlocks;
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---------------------------------------------------------------------------------------------
// Run-time configuration.

bool cpu_has_avx2() {
#if TV_X86
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

std::atomic<bool> g_simd_enabled{true};
std::atomic<int> g_num_threads{0};

// Cached: std::thread::hardware_concurrency() reads /sys on glibc (~8 us per call).
int default_num_threads() {
  static const int n = [] {
    unsigned hw = std::thread::hardware_concurrency();
    if (hw == 0) hw = 2;
    return static_cast<int>(std::min(hw, 8u));
  }();
  return n;
}

bool use_avx2() { return g_simd_enabled.load(std::memory_order_relaxed) && cpu_has_avx2(); }

// ---------------------------------------------------------------------------------------------
// Per-block sums of deviations from a shift K (finite elements only).

struct BlockSums {
  uint64_t nfin = 0, nan = 0, posinf = 0, neginf = 0, zeros = 0;
  double s1 = 0, s2 = 0, asum = 0;
  double min = kInf, max = -kInf, amax = 0;
  void add(const BlockSums& o) {
    nfin += o.nfin;
    nan += o.nan;
    posinf += o.posinf;
    neginf += o.neginf;
    zeros += o.zeros;
    s1 += o.s1;
    s2 += o.s2;
    asum += o.asum;
    min = std::min(min, o.min);
    max = std::max(max, o.max);
    amax = std::max(amax, o.amax);
  }
};

// Exact scalar kernel: reference semantics for every other path.
template <typename T>
void block_scalar(const T* x, std::size_t n, double K, BlockSums& b) {
  for (std::size_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(x[i]);
    if (std::isnan(v)) {
      ++b.nan;
    } else if (std::isinf(v)) {
      if (v > 0)
        ++b.posinf;
      else
        ++b.neginf;
    } else {
      ++b.nfin;
      if (v == 0) ++b.zeros;
      b.min = std::min(b.min, v);
      b.max = std::max(b.max, v);
      const double a = std::fabs(v), d = v - K;
      b.amax = std::max(b.amax, a);
      b.asum += a;
      b.s1 += d;
      b.s2 += d * d;
    }
  }
}

template <typename T>
double first_finite(const T* x, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(x[i]);
    if (std::isfinite(v)) return v;
  }
  return 0.0;
}

// Adds 1 to table[idx[k]] for every k, spread over kCopies interleaved tables of `stride`
// counters so that runs of equal indices do not serialise on one memory location.
constexpr int kCopies = 8;
inline void count_indices(const int32_t* idx, std::size_t n, uint32_t* table, int stride) {
  const std::size_t s = static_cast<std::size_t>(stride);
  std::size_t k = 0;
  for (; k + kCopies <= n; k += kCopies) {
    ++table[static_cast<std::size_t>(idx[k])];
    ++table[s + static_cast<std::size_t>(idx[k + 1])];
    ++table[2 * s + static_cast<std::size_t>(idx[k + 2])];
    ++table[3 * s + static_cast<std::size_t>(idx[k + 3])];
    ++table[4 * s + static_cast<std::size_t>(idx[k + 4])];
    ++table[5 * s + static_cast<std::size_t>(idx[k + 5])];
    ++table[6 * s + static_cast<std::size_t>(idx[k + 6])];
    ++table[7 * s + static_cast<std::size_t>(idx[k + 7])];
  }
  for (; k < n; ++k) ++table[static_cast<std::size_t>(idx[k])];
}

#if TV_X86
// ---------------------------------------------------------------------------------------------
// AVX2 kernels for float32, float16 and bfloat16. Elements are classified and min/max taken in
// float lanes (exact); every sum (deviations, squares, |x|) accumulates in double lanes.

TV_AVX2 inline __m256d cvt_lo(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
TV_AVX2 inline __m256d cvt_hi(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }
TV_AVX2 inline double hsum_pd(__m256d v) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}
TV_AVX2 inline float hmin_ps(__m256 v) {
  __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_min_ps(m, _mm_movehl_ps(m, m));
  m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
TV_AVX2 inline float hmax_ps(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
TV_AVX2 inline uint64_t hsum_epi32(__m256i v) {
  alignas(32) int32_t t[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), v);
  uint64_t s = 0;
  for (int i = 0; i < 8; ++i) s += static_cast<uint32_t>(t[i]);
  return s;
}
TV_AVX2 inline uint32_t hmax_epu32(__m256i v) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4e));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xb1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(m));
}
inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Element sources for the float kernels: 8 elements -> 8 float lanes. Half and bfloat16 are
// widened in registers (F16C; bf16 is a 16-bit shift), so they are read from memory once.
enum class Src { kF32, kF16, kBF16 };

template <Src S>
struct Elem;
template <>
struct Elem<Src::kF32> {
  using T = float;
  TV_AVX2 static __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  TV_AVX2 static void load2(const float* p, __m256& a, __m256& b) {
    a = load(p);
    b = load(p + 8);
  }
  static float scalar(float v) { return v; }
};
template <>
struct Elem<Src::kF16> {
  using T = uint16_t;
  TV_AVX2 static __m256 load(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  TV_AVX2 static void load2(const uint16_t* p, __m256& a, __m256& b) {
    a = load(p);
    b = load(p + 8);
  }
  static float scalar(uint16_t v) { return half_to_float(v); }
};
template <>
struct Elem<Src::kBF16> {
  using T = uint16_t;
  TV_AVX2 static __m256 load(const uint16_t* p) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  // 16 elements in two unpacks; the lane order changes, which no statistic depends on.
  TV_AVX2 static void load2(const uint16_t* p, __m256& a, __m256& b) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i z = _mm256_setzero_si256();
    a = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v));
    b = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v));
  }
  static float scalar(uint16_t v) { return bf16_to_float(v); }
};
// Fast path over n (multiple of 16) elements, assumed finite. A NaN/Inf anywhere makes the
// |x| sum non-finite, and then the caller re-runs the block with the masked kernel.
// Classification (zeros), min and max are exact in float lanes. Every sum is taken in double
// lanes: each element is widened (exactly) to double before the shift K (a float, so x - K is
// exact in double for all but extreme exponent spreads), the square and the |x| are summed, so
// the block sums carry double rounding only (~1e-16 per addition). A float product d * d never
// appears, so nothing can overflow or underflow for finite float inputs.
template <Src S>
TV_AVX2 __attribute__((noinline)) bool f32_fast(const typename Elem<S>::T* x, std::size_t n,
                                                float K, BlockSums& b) {
  const __m256 fzero = _mm256_setzero_ps();
  const __m256d kv = _mm256_set1_pd(static_cast<double>(K));
  const __m256d absd = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffLL));
  __m256 mn = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256i zc = _mm256_setzero_si256();
  __m256d S1 = _mm256_setzero_pd(), S2a = S1, S2b = S1, SA = S1;
  // One half-step: 8 elements, as one float vector v and two double vectors a0, a1 (the same
  // elements, widened exactly). The empty asm pins the accumulators to registers: without it
  // GCC spills some of them, and a loop-carried chain through memory runs the loop at half
  // speed.
  auto half = [&](__m256 v, __m256d a0, __m256d a1, __m256d& S2) TV_AVX2 {
    // x == 0 is true for both signed zeros (NaN lanes never reach this result).
    zc = _mm256_sub_epi32(zc, _mm256_castps_si256(_mm256_cmp_ps(v, fzero, _CMP_EQ_OQ)));
    mn = _mm256_min_ps(mn, v);
    mx = _mm256_max_ps(mx, v);
    const __m256d d0 = _mm256_sub_pd(a0, kv), d1 = _mm256_sub_pd(a1, kv);
    S1 = _mm256_add_pd(S1, _mm256_add_pd(d0, d1));
    S2 = _mm256_fmadd_pd(d1, d1, _mm256_fmadd_pd(d0, d0, S2));
    SA = _mm256_add_pd(SA, _mm256_add_pd(_mm256_and_pd(a0, absd), _mm256_and_pd(a1, absd)));
    TV_PIN_REGS(S1, S2, SA, mn, mx, zc);
  };
  for (std::size_t j = 0; j < n; j += 16) {
    if constexpr (S == Src::kF32) {
      // Widened straight from memory: no lane extracts.
      const float* p = x + j;
      half(_mm256_loadu_ps(p), _mm256_cvtps_pd(_mm_loadu_ps(p)),
           _mm256_cvtps_pd(_mm_loadu_ps(p + 4)), S2a);
      half(_mm256_loadu_ps(p + 8), _mm256_cvtps_pd(_mm_loadu_ps(p + 8)),
           _mm256_cvtps_pd(_mm_loadu_ps(p + 12)), S2b);
    } else {
      __m256 x0, x1;
      Elem<S>::load2(x + j, x0, x1);
      half(x0, cvt_lo(x0), cvt_hi(x0), S2a);
      half(x1, cvt_lo(x1), cvt_hi(x1), S2b);
    }
  }
  const double asum = hsum_pd(SA);
  if (!std::isfinite(asum)) return false;
  const double lo = hmin_ps(mn), hi = hmax_ps(mx);
  b.nfin += n;
  b.zeros += hsum_epi32(zc);
  b.min = std::min(b.min, lo);
  b.max = std::max(b.max, hi);
  b.amax = std::max(b.amax, std::max(-lo, hi));
  b.s1 += hsum_pd(S1);
  b.s2 += hsum_pd(_mm256_add_pd(S2a, S2b));
  b.asum += asum;
  return true;
}

// Masked path for blocks holding NaN/Inf, for the rest of a block below 16 elements and for
// small tensors (n a multiple of 8). Non-finite lanes are replaced by K before the widening, so
// their deviation is exactly 0; sums in double lanes as in f32_fast.
template <Src S>
TV_AVX2 void f32_masked(const typename Elem<S>::T* x, std::size_t n, float K, BlockSums& b) {
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
  const __m256i infb = _mm256_set1_epi32(0x7f800000);
  const __m256i ninfb = _mm256_set1_epi32(static_cast<int>(0xff800000u));
  const __m256i zero = _mm256_setzero_si256();
  const __m256 pinf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256 kf = _mm256_set1_ps(K);
  const __m256d kv = _mm256_set1_pd(static_cast<double>(K));
  __m256 mn = pinf, mx = ninf;
  __m256i amax = zero, zc = zero, cf = zero, cn = zero, ci = zero, cni = zero;
  __m256d S1 = _mm256_setzero_pd(), S2 = S1, SA = S1;
  for (std::size_t i = 0; i < n; i += 8) {
    const __m256 v = Elem<S>::load(x + i);
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i ab = _mm256_and_si256(bits, absmask);
    const __m256i fin = _mm256_cmpgt_epi32(infb, ab);
    cf = _mm256_sub_epi32(cf, fin);
    cn = _mm256_sub_epi32(cn, _mm256_cmpgt_epi32(ab, infb));
    ci = _mm256_sub_epi32(ci, _mm256_cmpeq_epi32(ab, infb));
    cni = _mm256_sub_epi32(cni, _mm256_cmpeq_epi32(bits, ninfb));
    zc = _mm256_sub_epi32(zc, _mm256_cmpeq_epi32(ab, zero));
    const __m256 finps = _mm256_castsi256_ps(fin);
    mn = _mm256_min_ps(mn, _mm256_blendv_ps(pinf, v, finps));
    mx = _mm256_max_ps(mx, _mm256_blendv_ps(ninf, v, finps));
    const __m256i abf = _mm256_and_si256(ab, fin);
    amax = _mm256_max_epu32(amax, abf);
    const __m256 xf = _mm256_blendv_ps(kf, v, finps);
    const __m256d d0 = _mm256_sub_pd(cvt_lo(xf), kv), d1 = _mm256_sub_pd(cvt_hi(xf), kv);
    S1 = _mm256_add_pd(S1, _mm256_add_pd(d0, d1));
    S2 = _mm256_add_pd(S2, _mm256_fmadd_pd(d1, d1, _mm256_mul_pd(d0, d0)));
    const __m256 af = _mm256_castsi256_ps(abf);
    SA = _mm256_add_pd(SA, _mm256_add_pd(cvt_lo(af), cvt_hi(af)));
  }
  const uint64_t nfin = hsum_epi32(cf), ninf_all = hsum_epi32(ci), nneg = hsum_epi32(cni);
  b.nfin += nfin;
  b.nan += hsum_epi32(cn);
  b.posinf += ninf_all - nneg;
  b.neginf += nneg;
  b.zeros += hsum_epi32(zc);
  if (nfin) {
    b.min = std::min(b.min, static_cast<double>(hmin_ps(mn)));
    b.max = std::max(b.max, static_cast<double>(hmax_ps(mx)));
    b.amax = std::max(b.amax, static_cast<double>(bits_to_float(hmax_epu32(amax))));
    b.s1 += hsum_pd(S1);
    b.s2 += hsum_pd(S2);
    b.asum += hsum_pd(SA);
  }
}

template <Src S>
TV_AVX2 void block_f32_avx2(const typename Elem<S>::T* x, std::size_t n, float K, BlockSums& b) {
  const std::size_t nf = n & ~static_cast<std::size_t>(15);
  if (nf && !f32_fast<S>(x, nf, K, b)) f32_masked<S>(x, nf, K, b);
  const std::size_t nm = n & ~static_cast<std::size_t>(7);
  if (nm > nf) f32_masked<S>(x + nf, nm - nf, K, b);
  if (n > nm) {
    float tail[8];
    for (std::size_t i = nm; i < n; ++i) tail[i - nm] = Elem<S>::scalar(x[i]);
    block_scalar(tail, n - nm, static_cast<double>(K), b);
  }
}

// Double lanes: fast path with a NaN/Inf check, exact scalar kernel for blocks holding them.
TV_AVX2 void block_f64_avx2(const double* x, std::size_t n, double K, BlockSums& b) {
  const std::size_t nv = n & ~static_cast<std::size_t>(7);
  if (nv) {
    const __m256d absmask = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffLL));
    const __m256d inf = _mm256_set1_pd(kInf);
    const __m256d zero = _mm256_setzero_pd();
    const __m256d kv = _mm256_set1_pd(K);
    __m256d mn = inf, mx = _mm256_set1_pd(-kInf), am = zero, bad = zero;
    __m256d a1 = zero, b1 = zero, a2 = zero, b2 = zero, aa = zero, ba = zero;
    __m256i zc = _mm256_setzero_si256();
    for (std::size_t i = 0; i < nv; i += 8) {
      const __m256d x0 = _mm256_loadu_pd(x + i), x1 = _mm256_loadu_pd(x + i + 4);
      const __m256d ab0 = _mm256_and_pd(x0, absmask), ab1 = _mm256_and_pd(x1, absmask);
      bad = _mm256_or_pd(bad, _mm256_cmp_pd(ab0, inf, _CMP_NLT_UQ));
      bad = _mm256_or_pd(bad, _mm256_cmp_pd(ab1, inf, _CMP_NLT_UQ));
      zc = _mm256_sub_epi64(zc, _mm256_castpd_si256(_mm256_cmp_pd(x0, zero, _CMP_EQ_OQ)));
      zc = _mm256_sub_epi64(zc, _mm256_castpd_si256(_mm256_cmp_pd(x1, zero, _CMP_EQ_OQ)));
      mn = _mm256_min_pd(mn, _mm256_min_pd(x0, x1));
      mx = _mm256_max_pd(mx, _mm256_max_pd(x0, x1));
      am = _mm256_max_pd(am, _mm256_max_pd(ab0, ab1));
      const __m256d d0 = _mm256_sub_pd(x0, kv), d1 = _mm256_sub_pd(x1, kv);
      a1 = _mm256_add_pd(a1, d0);
      b1 = _mm256_add_pd(b1, d1);
      a2 = _mm256_fmadd_pd(d0, d0, a2);
      b2 = _mm256_fmadd_pd(d1, d1, b2);
      aa = _mm256_add_pd(aa, ab0);
      ba = _mm256_add_pd(ba, ab1);
    }
    if (_mm256_movemask_pd(bad)) {
      block_scalar(x, nv, K, b);
    } else {
      alignas(32) double t[4];
      alignas(32) int64_t z[4];
      _mm256_store_si256(reinterpret_cast<__m256i*>(z), zc);
      b.nfin += nv;
      b.zeros += static_cast<uint64_t>(z[0] + z[1] + z[2] + z[3]);
      _mm256_store_pd(t, mn);
      b.min = std::min({b.min, t[0], t[1], t[2], t[3]});
      _mm256_store_pd(t, mx);
      b.max = std::max({b.max, t[0], t[1], t[2], t[3]});
      _mm256_store_pd(t, am);
      b.amax = std::max({b.amax, t[0], t[1], t[2], t[3]});
      b.s1 += hsum_pd(_mm256_add_pd(a1, b1));
      b.s2 += hsum_pd(_mm256_add_pd(a2, b2));
      b.asum += hsum_pd(_mm256_add_pd(aa, ba));
    }
  }
  if (n > nv) block_scalar(x + nv, n - nv, K, b);
}

TV_AVX2 void f16_to_f32_avx2(const uint16_t* src, std::size_t n, float* dst) {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  for (; i < n; ++i) dst[i] = half_to_float(src[i]);
}

TV_AVX2 void bf16_to_f32_avx2(const uint16_t* src, std::size_t n, float* dst) {
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i w =
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_slli_epi32(w, 16));
  }
  for (; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}

// Raw exponent-field histogram of float32 values; lane j counts into copy j of kCopies tables
// of 256 (separate copies break store-to-load chains when many values share an exponent).
TV_AVX2 void exp_raw_f32_avx2(const float* x, std::size_t n, uint32_t* raw, int32_t* ibuf,
                              const char* pf, std::size_t pf_bytes) {
  const __m256i m = _mm256_set1_epi32(0xff);
  const __m256i lane_off = _mm256_setr_epi32(0, 256, 512, 768, 1024, 1280, 1536, 1792);
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    if (i * 8 < pf_bytes) _mm_prefetch(pf + i * 8, _MM_HINT_T0);
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i));
    _mm256_storeu_si256(
        reinterpret_cast<__m256i*>(ibuf + i),
        _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 23), m), lane_off));
  }
  for (; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    ibuf[i] = static_cast<int32_t>(((u >> 23) & 0xff) + 256 * (i % 8));
  }
  std::size_t k = 0;
  for (; k + 4 <= n; k += 4) {
    ++raw[ibuf[k]];
    ++raw[ibuf[k + 1]];
    ++raw[ibuf[k + 2]];
    ++raw[ibuf[k + 3]];
  }
  for (; k < n; ++k) ++raw[ibuf[k]];
}
#endif  // TV_X86

// ---------------------------------------------------------------------------------------------
// Fixed-bin histogram with numpy.histogram semantics.

struct HistPlan {
  int bins = 0;
  double lo = 0, hi = 1, denom = 1;
  std::vector<double> edges;  // bins + 1
  // Float fast path: t = (x - lo_f) * scale_f is within delta of the exact bin coordinate.
  bool float_ok = false;
  float lo_f = 0, scale_f = 0, delta = 0;
  std::vector<float> fthr;  // bins + 1

  void init(int nbins, double l, double h) {
    bins = nbins;
    lo = l;
    hi = h;
    denom = h - l;
    TensorStats tmp;
    tmp.hist.assign(static_cast<std::size_t>(nbins), 0);
    tmp.hist_lo = l;
    tmp.hist_hi = h;
    edges = tmp.hist_edges();
    const double scale = static_cast<double>(nbins) / denom;
    const double u = std::ldexp(1.0, -24);
    const double d = 8.0 * u * (scale * std::max(std::fabs(l), std::fabs(h)) + nbins + 1.0);
    float_ok = std::isfinite(scale) && std::isfinite(d) && d < 0.05 && std::fabs(l) < 1e37 &&
               std::fabs(h) < 1e37 && scale < 1e37;
    lo_f = static_cast<float>(l);
    scale_f = static_cast<float>(scale);
    // fma(x, scale, -lo * scale) rounds once, plus the rounding of lo * scale itself.
    delta = static_cast<float>(d + 4.0 * u * std::fabs(static_cast<double>(lo_f) * scale_f));
    // Float thresholds: for a float x, x >= edges[k] <=> x >= fthr[k] (k < bins), and
    // x > hi <=> x >= fthr[bins].
    fthr.resize(static_cast<std::size_t>(nbins) + 1);
    for (int k = 0; k <= nbins; ++k) {
      const double e = edges[static_cast<std::size_t>(k)];
      float f = static_cast<float>(e);
      if (k < nbins) {
        if (static_cast<double>(f) < e)
          f = std::nextafter(f, std::numeric_limits<float>::infinity());
      } else if (static_cast<double>(f) <= e) {
        f = std::nextafter(f, std::numeric_limits<float>::infinity());
      }
      fthr[static_cast<std::size_t>(k)] = f;
    }
  }

  // Slot of a finite x in the counters: 0 below the range, 1 + bin, bins + 1 above. Mirrors
  // numpy's arithmetic, then settles the result against the exact edges.
  int classify(double x) const {
    if (!(x >= lo)) return 0;
    if (x > hi) return bins + 1;
    double f = (x - lo) / denom * static_cast<double>(bins);
    int64_t idx = f >= static_cast<double>(bins) ? bins - 1 : static_cast<int64_t>(f);
    if (idx < 0) idx = 0;
    while (idx > 0 && x < edges[static_cast<std::size_t>(idx)]) --idx;
    while (idx < bins - 1 && x >= edges[static_cast<std::size_t>(idx) + 1]) ++idx;
    return static_cast<int>(idx) + 1;
  }
};

// kCopies interleaved tables of (bins + 3) counters: below, bins, above, ignored (NaN/Inf).
struct HistCounts {
  int stride = 0;
  std::vector<uint32_t> c;
  void init(int bins) {
    stride = bins + 3;
    c.assign(static_cast<std::size_t>(stride) * kCopies, 0);
  }
  void add(const int32_t* idx, std::size_t n) { count_indices(idx, n, c.data(), stride); }
  // Indices that already include their copy's offset.
  void add_flat(const int32_t* idx, std::size_t n) {
    uint32_t* t = c.data();
    std::size_t k = 0;
    for (; k + 4 <= n; k += 4) {
      ++t[idx[k]];
      ++t[idx[k + 1]];
      ++t[idx[k + 2]];
      ++t[idx[k + 3]];
    }
    for (; k < n; ++k) ++t[idx[k]];
  }
  uint64_t get(int slot) const {
    uint64_t s = 0;
    for (int r = 0; r < kCopies; ++r) s += c[static_cast<std::size_t>(r * stride + slot)];
    return s;
  }
};

template <typename T>
void hist_scalar(const T* x, std::size_t n, const HistPlan& p, int32_t* ibuf, HistCounts& hc) {
  for (std::size_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(x[i]);
    ibuf[i] = std::isfinite(v) ? p.classify(v) : p.bins + 2;
  }
  hc.add(ibuf, n);
}

#if TV_X86
// Slot coordinate t = (x - lo) * scale + 1 in float lanes, clamped to [0.5, bins + 1.5], so
// that trunc(t -/+ delta) is the slot (0 below, 1 + bin, bins + 1 above) when both agree. A
// lane where they differ sits within delta of edge k and is settled exactly by comparing x with
// the float threshold of that edge (a gather). Lane j of every vector counts into copy j.
// kMasked: the block may hold NaN/Inf (unknown, or known to).
// pf/pf_bytes: the next block, fetched into cache meanwhile (memory is otherwise idle here).
template <bool kMasked>
TV_AVX2 void hist_f32_avx2(const float* x, std::size_t n, const HistPlan& p, int32_t* ibuf,
                           HistCounts& hc, const char* pf, std::size_t pf_bytes) {
  if (!p.float_ok) {
    for (std::size_t o = 0; o < pf_bytes; o += 64) _mm_prefetch(pf + o, _MM_HINT_T0);
    return hist_scalar(x, n, p, ibuf, hc);
  }
  const int stride = hc.stride;
  const __m256i absmask = _mm256_set1_epi32(0x7fffffff);
  const __m256i infb = _mm256_set1_epi32(0x7f800000);
  const __m256 sc = _mm256_set1_ps(p.scale_f);
  const __m256 off = _mm256_set1_ps(1.0f - p.lo_f * p.scale_f);
  const __m256 dl = _mm256_set1_ps(p.delta);
  const __m256 cmin = _mm256_set1_ps(0.5f);
  const __m256 cmax = _mm256_set1_ps(static_cast<float>(p.bins) + 1.5f);
  const __m256i kmax = _mm256_set1_epi32(p.bins);
  const __m256i zero = _mm256_setzero_si256(), one = _mm256_set1_epi32(1);
  const __m256i lane_off =
      _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(stride));
  const __m256i ignore = _mm256_add_epi32(lane_off, _mm256_set1_epi32(p.bins + 2));
  const float* thr = p.fthr.data();
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    if (i * 8 < pf_bytes) _mm_prefetch(pf + i * 8, _MM_HINT_T0);
    const __m256 v = _mm256_loadu_ps(x + i);
    __m256 t = _mm256_fmadd_ps(v, sc, off);
    t = _mm256_min_ps(_mm256_max_ps(t, cmin), cmax);
    const __m256i a = _mm256_cvttps_epi32(_mm256_sub_ps(t, dl));
    const __m256i b = _mm256_cvttps_epi32(_mm256_add_ps(t, dl));
    __m256i idx = _mm256_add_epi32(a, lane_off);
    int unsure = ~_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(a, b))) & 0xff;
    __m256i fin = zero;
    if (kMasked) {
      fin = _mm256_cmpgt_epi32(infb, _mm256_and_si256(_mm256_castps_si256(v), absmask));
      unsure &= _mm256_movemask_ps(_mm256_castsi256_ps(fin));
    }
    if (unsure) {
      // Edge k = b - 1 in [0, bins]; slot = k + (x >= thr[k]).
      __m256i k = _mm256_sub_epi32(b, one);
      k = _mm256_min_epi32(_mm256_max_epi32(k, zero), kmax);
      const __m256 th = _mm256_i32gather_ps(thr, k, 4);
      const __m256i ge = _mm256_castps_si256(_mm256_cmp_ps(v, th, _CMP_GE_OQ));
      const __m256i fixed = _mm256_sub_epi32(_mm256_add_epi32(k, lane_off), ge);
      idx = _mm256_blendv_epi8(idx, fixed, _mm256_cmpeq_epi32(a, b) ^ _mm256_set1_epi32(-1));
    }
    if (kMasked) idx = _mm256_blendv_epi8(ignore, idx, fin);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ibuf + i), idx);
  }
  for (; i < n; ++i) {
    const double v = static_cast<double>(x[i]);
    ibuf[i] = (std::isfinite(v) ? p.classify(v) : p.bins + 2) + static_cast<int>(i % 8) * stride;
  }
  hc.add_flat(ibuf, n);
}
#endif

// ---------------------------------------------------------------------------------------------
// Chunk driver: converts each block if needed, then runs the moment, exponent and histogram
// kernels on it while it is in cache.

struct Plan {
  bool moments = true;  // false: histogram-only second pass (auto range)
  bool exp_hist = false;
  const HistPlan* hist = nullptr;
};

enum class Lane { kF32, kF64 };

const double* fp8_table(DType dt) {
  static const std::vector<double> e4m3 = [] {
    std::vector<double> t(256);
    for (int i = 0; i < 256; ++i) t[i] = fp8_e4m3_to_float(static_cast<uint8_t>(i));
    return t;
  }();
  static const std::vector<double> e5m2 = [] {
    std::vector<double> t(256);
    for (int i = 0; i < 256; ++i) t[i] = fp8_e5m2_to_float(static_cast<uint8_t>(i));
    return t;
  }();
  return dt == DType::kFloat8E4M3 ? e4m3.data() : e5m2.data();
}

template <typename S>
void cast_block(const void* base, std::size_t off, std::size_t n, double* out) {
  const S* s = static_cast<const S*>(base) + off;
  for (std::size_t i = 0; i < n; ++i) out[i] = static_cast<double>(s[i]);
}

void to_double(DType dt, const void* base, std::size_t off, std::size_t n, double* out) {
  switch (dt) {
    case DType::kFloat64:
      cast_block<double>(base, off, n, out);
      break;
    case DType::kFloat32:
      cast_block<float>(base, off, n, out);
      break;
    case DType::kFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(base) + off;
      for (std::size_t i = 0; i < n; ++i) out[i] = half_to_float(s[i]);
      break;
    }
    case DType::kBFloat16: {
      const uint16_t* s = static_cast<const uint16_t*>(base) + off;
      for (std::size_t i = 0; i < n; ++i) out[i] = bf16_to_float(s[i]);
      break;
    }
    case DType::kFloat8E4M3:
    case DType::kFloat8E5M2: {
      const double* t = fp8_table(dt);
      const uint8_t* s = static_cast<const uint8_t*>(base) + off;
      for (std::size_t i = 0; i < n; ++i) out[i] = t[s[i]];
      break;
    }
    case DType::kInt8:
      cast_block<int8_t>(base, off, n, out);
      break;
    case DType::kInt16:
      cast_block<int16_t>(base, off, n, out);
      break;
    case DType::kInt32:
      cast_block<int32_t>(base, off, n, out);
      break;
    case DType::kInt64:
      cast_block<int64_t>(base, off, n, out);
      break;
    case DType::kUInt8:
      cast_block<uint8_t>(base, off, n, out);
      break;
    case DType::kBool: {
      const uint8_t* s = static_cast<const uint8_t*>(base) + off;
      for (std::size_t i = 0; i < n; ++i) out[i] = s[i] ? 1.0 : 0.0;
      break;
    }
  }
}

struct ChunkState {
  TensorStats out;
  // Chan accumulators of the blocks; the mean is kept relative to `base` (the first shift) so
  // that block means differ by small, exactly representable amounts when |mean| >> std.
  uint64_t n = 0;
  double base = 0, mean_rel = 0, m2 = 0;
  double shift = 0;
  bool has_shift = false;
  std::vector<uint32_t> exp_raw;  // kCopies x 256 (float lanes) or 2048 (double lanes)
  HistCounts hc;

  double mean() const { return base + mean_rel; }

  void fold(const BlockSums& b, double K) {
    out.nan += b.nan;
    out.posinf += b.posinf;
    out.neginf += b.neginf;
    out.zeros += b.zeros;
    if (!b.nfin) return;
    out.min = std::fmin(out.min, b.min);
    out.max = std::fmax(out.max, b.max);
    out.abs_max = std::max(out.abs_max, b.amax);
    out.abs_sum += b.asum;
    const bool constant = b.min == b.max;  // exact whatever the shift
    if (n == 0) base = constant ? b.min : K;
    const double nb = static_cast<double>(b.nfin);
    const double mb = constant ? b.min - base : (K - base) + b.s1 / nb;
    double m2b = std::isfinite(b.s2) ? std::max(0.0, b.s2 - b.s1 * (b.s1 / nb)) : kInf;
    if (constant) m2b = 0.0;
    if (n == 0) {
      mean_rel = mb;
      m2 = m2b;
    } else {
      const double nt = static_cast<double>(n) + nb;
      const double fb = nb / nt;
      const double delta = mb - mean_rel;
      mean_rel = std::isfinite(delta) ? mean_rel + delta * fb : (1.0 - fb) * mean_rel + fb * mb;
      const double t = delta * std::sqrt(static_cast<double>(n) * fb);
      m2 = m2 + m2b + t * t;
    }
    n += b.nfin;
    const double next = base + mb;
    if (std::isfinite(next)) {
      shift = next;
      has_shift = true;
    }
  }
};

// Moments of one block in double lanes, re-run with the block's own mean as shift when the
// first shift cost too many digits.
void moments_f64(const double* x, std::size_t n, ChunkState& st, bool avx2) {
  double K = st.has_shift ? st.shift : first_finite(x, n);
  auto run = [&](double k, BlockSums& b) {
#if TV_X86
    if (avx2) return block_f64_avx2(x, n, k, b);
#endif
    block_scalar(x, n, k, b);
  };
  BlockSums b;
  run(K, b);
  if (b.nfin && b.min != b.max) {
    // Near the double limit a shifted sum can overflow where the plain one does not.
    if (!std::isfinite(b.s1) && K != 0.0) {
      K = 0.0;
      b = BlockSums{};
      run(K, b);
    }
    const double nb = static_cast<double>(b.nfin);
    const double mb = K + b.s1 / nb;
    const double m2b = b.s2 - b.s1 * (b.s1 / nb);
    if ((!std::isfinite(b.s2) || m2b * 1e4 < b.s2) && std::isfinite(mb) && mb != K) {
      BlockSums b2;
      run(mb, b2);
      st.fold(b2, mb);
      return;
    }
  }
  st.fold(b, K);
}

#if TV_X86
// Float32/16/bf16 blocks: float-lane classification, double-lane sums. The shift is the
// previous block's mean rounded to float (the first finite element for the first block), so
// x - K is exact in double; a block whose sums lost more than ~3 digits to a poor shift is
// re-run with its own mean (rare: the first block of data with |mean| >> std).
template <Src S>
TV_AVX2 void moments_f32(const typename Elem<S>::T* x, std::size_t n, ChunkState& st,
                         double* dbuf) {
  double Kd = st.has_shift ? st.shift : 0.0;
  if (!st.has_shift) {
    for (std::size_t i = 0; i < n; ++i) {
      const double v = Elem<S>::scalar(x[i]);
      if (std::isfinite(v)) {
        Kd = v;
        break;
      }
    }
  }
  if (!(std::fabs(Kd) < 3e38)) Kd = 0.0;
  const float K = static_cast<float>(Kd);
  BlockSums b;
  block_f32_avx2<S>(x, n, K, b);
  if (!b.nfin) return st.fold(b, K);
  if (!std::isfinite(b.s1) || !std::isfinite(b.s2) || !std::isfinite(b.asum)) {
    // Cannot happen for finite float inputs (|x - K|^2 * 4096 < 1e78); kept as a safety net.
    for (std::size_t i = 0; i < n; ++i) dbuf[i] = static_cast<double>(Elem<S>::scalar(x[i]));
    return moments_f64(dbuf, n, st, true);
  }
  if (b.min != b.max) {
    const double nb = static_cast<double>(b.nfin);
    const double m2b = b.s2 - b.s1 * (b.s1 / nb);
    if (m2b * 1e3 < b.s2) {
      const double mb = static_cast<double>(K) + b.s1 / nb;
      const float K2 = static_cast<float>(mb);
      if (K2 != K && std::isfinite(K2)) {
        BlockSums b2;
        block_f32_avx2<S>(x, n, K2, b2);
        return st.fold(b2, K2);
      }
    }
  }
  st.fold(b, K);
}
#endif

void exp_raw_f64(const double* x, std::size_t n, uint32_t* raw) {
  for (std::size_t i = 0; i < n; ++i) {
    uint64_t u;
    std::memcpy(&u, x + i, 8);
    ++raw[(u >> 52) & 0x7ff];
  }
}

// Folds a raw exponent-field histogram into the public buckets (floor(log2|x|) + bias).
void finish_exp(const std::vector<uint32_t>& raw, Lane lane, uint64_t zeros,
                std::vector<uint64_t>& out) {
  out.assign(kExpHistBuckets, 0);
  if (lane == Lane::kF32) {
    for (int e = 0; e < 255; ++e) {
      uint64_t c = 0;
      for (int r = 0; r < kCopies; ++r) c += raw[static_cast<std::size_t>(r * 256 + e)];
      // Exponent field e holds floor(log2|x|) = e - 127; e = 0 is subnormals (clamped) + zeros.
      out[static_cast<std::size_t>(e)] += c;
    }
  } else {
    for (int e = 0; e < 2047; ++e) {
      const uint64_t c = raw[static_cast<std::size_t>(e)];
      if (!c) continue;
      int k = e - 1023 + kExpHistBias;
      k = std::min(std::max(k, 0), kExpHistBuckets - 1);
      out[static_cast<std::size_t>(k)] += c;
    }
  }
  out[0] -= zeros;
}

struct Thread_buffers {
  std::vector<float> f;
  std::vector<double> d;
  std::vector<int32_t> i;
  Thread_buffers() : f(kBlock), d(kBlock), i(kBlock) {}
};

TensorStats run_chunk(const TensorView& v, std::size_t begin, std::size_t end, const Plan& plan) {
  static thread_local Thread_buffers buf;
  const bool avx2 = use_avx2();
  const DType dt = v.dtype;
  const bool f32_lane =
      avx2 && (dt == DType::kFloat32 || dt == DType::kFloat16 || dt == DType::kBFloat16);
  const Lane lane = f32_lane ? Lane::kF32 : Lane::kF64;
  ChunkState st;
  st.out.numel = end - begin;
  if (plan.exp_hist) st.exp_raw.assign(lane == Lane::kF32 ? kCopies * 256 : 2048, 0);
  if (plan.hist) st.hc.init(plan.hist->bins);

  for (std::size_t b0 = begin; b0 < end; b0 += kBlock) {
    const std::size_t n = std::min(kBlock, end - b0);
#if TV_X86
    if (f32_lane) {
      const bool extra = plan.exp_hist || plan.hist;
      const float* x = nullptr;
      if (dt == DType::kFloat32) {
        x = static_cast<const float*>(v.data) + b0;
        if (plan.moments) moments_f32<Src::kF32>(x, n, st, buf.d.data());
      } else {
        const uint16_t* s = static_cast<const uint16_t*>(v.data) + b0;
        const bool half = dt == DType::kFloat16;
        if (plan.moments) {
          if (half)
            moments_f32<Src::kF16>(s, n, st, buf.d.data());
          else
            moments_f32<Src::kBF16>(s, n, st, buf.d.data());
        }
        if (extra) {  // the block is in L1 now; widen it once for the histogram kernels
          if (half)
            f16_to_f32_avx2(s, n, buf.f.data());
          else
            bf16_to_f32_avx2(s, n, buf.f.data());
          x = buf.f.data();
        }
      }
      // The next block of this chunk is prefetched by the first histogram kernel.
      const std::size_t esz = dt == DType::kFloat32 ? 4 : 2;
      const char* pf = static_cast<const char*>(v.data) + (b0 + n) * esz;
      std::size_t pf_bytes = std::min(kBlock, end - (b0 + n)) * esz;
      if (plan.exp_hist) {
        exp_raw_f32_avx2(x, n, st.exp_raw.data(), buf.i.data(), pf, pf_bytes);
        pf_bytes = 0;
      }
      if (plan.hist) {
        // After the moments pass the block's NaN/Inf count is known; skip the mask if none.
        const bool clean = plan.moments && st.out.nan + st.out.posinf + st.out.neginf == 0;
        if (clean)
          hist_f32_avx2<false>(x, n, *plan.hist, buf.i.data(), st.hc, pf, pf_bytes);
        else
          hist_f32_avx2<true>(x, n, *plan.hist, buf.i.data(), st.hc, pf, pf_bytes);
      }
      continue;
    }
#endif
    const double* x;
    if (dt == DType::kFloat64) {
      x = static_cast<const double*>(v.data) + b0;
    } else {
      to_double(dt, v.data, b0, n, buf.d.data());
      x = buf.d.data();
    }
    if (plan.moments) moments_f64(x, n, st, avx2);
    if (plan.exp_hist) exp_raw_f64(x, n, st.exp_raw.data());
    if (plan.hist) hist_scalar(x, n, *plan.hist, buf.i.data(), st.hc);
  }

  TensorStats& out = st.out;
  if (plan.moments) {
    out.mean = st.n ? st.mean() : 0.0;
    out.m2 = st.n ? st.m2 : 0.0;
    if (!st.n) out.min = out.max = kNaN;
  }
  if (plan.exp_hist) finish_exp(st.exp_raw, lane, out.zeros, out.exp_hist);
  if (plan.hist) {
    const HistPlan& p = *plan.hist;
    out.hist.resize(static_cast<std::size_t>(p.bins));
    for (int i = 0; i < p.bins; ++i) out.hist[static_cast<std::size_t>(i)] = st.hc.get(i + 1);
    out.hist_below = st.hc.get(0);
    out.hist_above = st.hc.get(p.bins + 1);
    out.hist_lo = p.lo;
    out.hist_hi = p.hi;
  }
  return std::move(out);
}

// ---------------------------------------------------------------------------------------------
// Validation, task lists and merging.

void validate(const StatsOptions& o) {
  if (o.hist_bins < 0 || o.hist_bins > kMaxHistBins)
    throw_error(ErrorCode::kInvalidArgument, "[compute_stats] hist_bins must be in [0, " +
                                                 std::to_string(kMaxHistBins) + "], got " +
                                                 std::to_string(o.hist_bins));
  if (o.hist_bins > 0 && !o.hist_auto_range) {
    if (!std::isfinite(o.hist_lo) || !std::isfinite(o.hist_hi) || !(o.hist_lo < o.hist_hi))
      throw_error(ErrorCode::kInvalidArgument,
                  "[compute_stats] hist range must be finite with lo < hi, got [" +
                      std::to_string(o.hist_lo) + ", " + std::to_string(o.hist_hi) + "]");
  }
  if (o.num_threads < 0)
    throw_error(ErrorCode::kInvalidArgument, "[compute_stats] num_threads must be >= 0");
}

void validate(const TensorView& v) {
  if (v.device != DeviceType::kCpu)
    throw_error(ErrorCode::kUnsupported,
                "[compute_stats] CUDA tensors are not supported by the CPU reduction; copy the "
                "tensor to host memory (CUDA statistics come with the CUDA backend)");
  for (int64_t d : v.shape)
    if (d < 0)
      throw_error(ErrorCode::kInvalidArgument, "[compute_stats] negative dimension in shape");
  dtype_size(v.dtype);  // throws on an invalid code
  if (v.numel() > 0 && v.data == nullptr)
    throw_error(ErrorCode::kInvalidArgument, "[compute_stats] null data pointer");
}

// numpy.histogram's range rule for hist_auto_range; [0, 1] when there is no finite value.
void auto_range(const TensorStats& s, double& lo, double& hi) {
  if (s.finite() == 0 || !std::isfinite(s.min) || !std::isfinite(s.max)) {
    lo = 0.0;
    hi = 1.0;
    return;
  }
  lo = s.min;
  hi = s.max;
  if (lo == hi) {
    lo -= 0.5;
    hi += 0.5;
  }
}

struct Task {
  std::size_t view, begin, end;
  TensorStats* dst;  // where run_chunk's result goes
};

int resolve_threads(int requested) {
  int t = requested > 0 ? requested : get_num_threads();
  if (t > 1 && internal::ThreadPool::global().size() < t)
    internal::ThreadPool::set_global_threads(t);
  return t;
}

// Scheduling weight of a task: its elements plus a fixed cost (setup, merge) in elements.
constexpr std::size_t kTaskOverhead = 256;
// Below this total weight (~10 us of work) the pool is not woken: a wake-up costs more.
constexpr std::size_t kSerialWeight = 1 << 15;

// Runs every task, grouping consecutive small tasks into batches of similar weight so that
// many tiny tensors cost one pool dispatch, not one per tensor. Results do not depend on the
// grouping or the thread count (each task is computed the same way, into its own record).
void run_tasks(const std::vector<TensorView>& views, const std::vector<Task>& tasks,
               const std::vector<Plan>& plans, int threads) {
  std::size_t total = 0;
  for (const Task& t : tasks) total += (t.end - t.begin) + kTaskOverhead;
  auto run_one = [&](const Task& t) {
    *t.dst = run_chunk(views[t.view], t.begin, t.end, plans[t.view]);
  };
  if (threads <= 1 || tasks.size() <= 1 || total <= kSerialWeight) {
    for (const Task& t : tasks) run_one(t);
    return;
  }
  // About 4 batches per thread for balance, none lighter than a quarter of a chunk.
  const std::size_t target =
      std::max<std::size_t>(total / (4 * static_cast<std::size_t>(threads)), kChunk / 4);
  std::vector<std::size_t> starts;  // batch b = tasks [starts[b], starts[b + 1])
  std::size_t w = target;
  for (std::size_t i = 0; i < tasks.size(); ++i) {
    if (w >= target) {
      starts.push_back(i);
      w = 0;
    }
    w += (tasks[i].end - tasks[i].begin) + kTaskOverhead;
  }
  starts.push_back(tasks.size());
  const std::size_t nb = starts.size() - 1;
  auto fn = [&](std::size_t b) {
    for (std::size_t i = starts[b]; i < starts[b + 1]; ++i) run_one(tasks[i]);
  };
  if (nb <= 1) {
    fn(0);
  } else {
    internal::ThreadPool::global().parallel_for(nb, fn, threads);
  }
}

}  // namespace

namespace internal {
void stats_set_simd(bool enabled) { g_simd_enabled.store(enabled); }
bool stats_simd_active() { return use_avx2(); }
}  // namespace internal

std::vector<TensorStats> compute_stats_many(const std::vector<TensorView>& views,
                                            const StatsOptions& options) {
  validate(options);
  for (const TensorView& v : views) validate(v);
  const int threads = resolve_threads(options.num_threads);
  const bool want_hist = options.hist_bins > 0;
  const bool two_pass = want_hist && options.hist_auto_range;

  std::vector<TensorStats> out(views.size());
  if (options.exp_hist)
    for (TensorStats& o : out) o.exp_hist.assign(kExpHistBuckets, 0);

  // One task per chunk. A one-chunk tensor's task writes its record in place; the chunks of a
  // larger tensor write partial records that merge in chunk order below.
  std::vector<Task> tasks;
  tasks.reserve(views.size());
  std::size_t nparts = 0;
  for (std::size_t i = 0; i < views.size(); ++i) {
    const std::size_t n = static_cast<std::size_t>(views[i].numel());
    if (n > kChunk) nparts += (n + kChunk - 1) / kChunk;
  }
  std::vector<TensorStats> partial(nparts);
  std::size_t k = 0;
  for (std::size_t i = 0; i < views.size(); ++i) {
    const std::size_t n = static_cast<std::size_t>(views[i].numel());
    if (n == 0) continue;
    if (n <= kChunk) {
      tasks.push_back({i, 0, n, &out[i]});
    } else {
      for (std::size_t b = 0; b < n; b += kChunk)
        tasks.push_back({i, b, std::min(n, b + kChunk), &partial[k++]});
    }
  }

  std::vector<HistPlan> hplans(want_hist ? views.size() : 0);
  std::vector<Plan> plans(views.size());
  for (std::size_t i = 0; i < views.size(); ++i) {
    plans[i].exp_hist = options.exp_hist;
    if (want_hist && !two_pass) {
      hplans[i].init(options.hist_bins, options.hist_lo, options.hist_hi);
      plans[i].hist = &hplans[i];
    }
  }

  run_tasks(views, tasks, plans, threads);
  for (const Task& t : tasks)
    if (t.dst != &out[t.view]) out[t.view].merge(*t.dst);

  if (want_hist) {
    for (std::size_t i = 0; i < views.size(); ++i) {
      if (two_pass) {
        double lo, hi;
        auto_range(out[i], lo, hi);
        hplans[i].init(options.hist_bins, lo, hi);
        plans[i].hist = &hplans[i];
      }
      plans[i].moments = false;
      plans[i].exp_hist = false;
      if (out[i].hist.empty()) {  // empty tensor, or histogram still to be taken
        out[i].hist.assign(static_cast<std::size_t>(options.hist_bins), 0);
        out[i].hist_lo = hplans[i].lo;
        out[i].hist_hi = hplans[i].hi;
        out[i].hist_below = out[i].hist_above = 0;
      }
    }
    if (two_pass) {
      // Histogram-only pass: every task writes a partial record, added to the histograms.
      std::vector<TensorStats> hp(tasks.size());
      for (std::size_t j = 0; j < tasks.size(); ++j) tasks[j].dst = &hp[j];
      run_tasks(views, tasks, plans, threads);
      for (std::size_t j = 0; j < tasks.size(); ++j) {
        TensorStats& o = out[tasks[j].view];
        const TensorStats& p = hp[j];
        for (std::size_t q = 0; q < o.hist.size(); ++q) o.hist[q] += p.hist[q];
        o.hist_below += p.hist_below;
        o.hist_above += p.hist_above;
      }
    }
  }
  return out;
}

TensorStats compute_stats(const TensorView& view, const StatsOptions& options) {
  validate(options);
  validate(view);
  const std::size_t n = static_cast<std::size_t>(view.numel());
  if (options.hist_bins == 0 && n <= kChunk) {
    // One chunk, no histogram: the calling thread, no task list, no thread pool, no heap
    // allocation (except the exponent histogram when asked for). Same result as the general
    // path, which runs the same chunk kernel.
    Plan plan;
    plan.exp_hist = options.exp_hist;
    return run_chunk(view, 0, n, plan);
  }
  std::vector<TensorView> one{view};
  return std::move(compute_stats_many(one, options)[0]);
}

int get_num_threads() {
  const int n = g_num_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : default_num_threads();
}

void set_num_threads(int n) { g_num_threads.store(n > 0 ? n : 0, std::memory_order_relaxed); }

}  // namespace tensorvigil
