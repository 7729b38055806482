#pragma once
// Element sources: each dtype's 16-byte vector unpacked into float (or double) lanes, and a
// loop that visits every element of a chunk with 16-byte loads where the chunk is aligned.
#include <cuda_fp16.h>
#include <stdint.h>

#include "records.cuh"

namespace tensorvigil {
namespace cuda_dev {

__device__ __forceinline__ float fp8_e4m3_to_float(unsigned b) {
  const unsigned s = (b & 0x80u) << 24, e = (b >> 3) & 0xfu, m = b & 7u;
  if (e == 15u && m == 7u) return __uint_as_float(0x7fc00000u);
  if (e == 0u) {
    const float v = static_cast<float>(m) * 0.001953125f;  // m * 2^-9
    return s ? -v : v;
  }
  return __uint_as_float(s | ((e + 120u) << 23) | (m << 20));
}

__device__ __forceinline__ float fp8_e5m2_to_float(unsigned b) {
  const unsigned s = (b & 0x80u) << 24, e = (b >> 2) & 0x1fu, m = b & 3u;
  if (e == 31u) return m ? __uint_as_float(0x7fc00000u) : __uint_as_float(s | 0x7f800000u);
  if (e == 0u) {
    const float v = static_cast<float>(m) * 1.52587890625e-05f;  // m * 2^-16
    return s ? -v : v;
  }
  return __uint_as_float(s | ((e + 112u) << 23) | (m << 21));
}

__device__ __forceinline__ float half_bits_to_float(unsigned h) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(h)));
}

template <int DT>
struct Src;

template <>
struct Src<kF32> {
  using L = float;
  static constexpr int kSize = 4, kPer = 4;
  __device__ static void unpack(const uint4& v, L* o) {
    o[0] = __uint_as_float(v.x);
    o[1] = __uint_as_float(v.y);
    o[2] = __uint_as_float(v.z);
    o[3] = __uint_as_float(v.w);
  }
  __device__ static L at(const unsigned char* p, unsigned i) {
    return __ldg(reinterpret_cast<const float*>(p) + i);
  }
};

template <>
struct Src<kF64> {
  using L = double;
  static constexpr int kSize = 8, kPer = 2;
  __device__ static void unpack(const uint4& v, L* o) {
    o[0] = __hiloint2double(static_cast<int>(v.y), static_cast<int>(v.x));
    o[1] = __hiloint2double(static_cast<int>(v.w), static_cast<int>(v.z));
  }
  __device__ static L at(const unsigned char* p, unsigned i) {
    return __ldg(reinterpret_cast<const double*>(p) + i);
  }
};

template <>
struct Src<kF16> {
  using L = float;
  static constexpr int kSize = 2, kPer = 8;
  __device__ static void unpack(const uint4& v, L* o) {
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      o[2 * k] = half_bits_to_float(w[k] & 0xffffu);
      o[2 * k + 1] = half_bits_to_float(w[k] >> 16);
    }
  }
  __device__ static L at(const unsigned char* p, unsigned i) {
    return half_bits_to_float(__ldg(reinterpret_cast<const unsigned short*>(p) + i));
  }
};

template <>
struct Src<kBF16> {
  using L = float;
  static constexpr int kSize = 2, kPer = 8;
  __device__ static void unpack(const uint4& v, L* o) {
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      o[2 * k] = __uint_as_float(w[k] << 16);
      o[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
  }
  __device__ static L at(const unsigned char* p, unsigned i) {
    return __uint_as_float(static_cast<unsigned>(__ldg(reinterpret_cast<const unsigned short*>(p) + i))
                           << 16);
  }
};

template <int DT>
struct SrcFp8 {
  using L = float;
  static constexpr int kSize = 1, kPer = 16;
  __device__ static float conv(unsigned b) {
    return DT == kE4M3 ? fp8_e4m3_to_float(b) : fp8_e5m2_to_float(b);
  }
  __device__ static void unpack(const uint4& v, L* o) {
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int j = 0; j < 4; ++j) o[4 * k + j] = conv((w[k] >> (8 * j)) & 0xffu);
  }
  __device__ static L at(const unsigned char* p, unsigned i) { return conv(__ldg(p + i)); }
};
template <>
struct Src<kE4M3> : SrcFp8<kE4M3> {};
template <>
struct Src<kE5M2> : SrcFp8<kE5M2> {};

// Calls f(x) for each of the n elements at `base` that this thread owns, and f.flush() after
// each 16-byte vector (and each tail element): 16-byte vectors,
// four in flight per thread, when `base` is 16-byte aligned; element loads otherwise and for
// the tail.
template <int DT, typename F>
__device__ __forceinline__ void for_each_element(const unsigned char* base, unsigned n, F& f) {
  using S = Src<DT>;
  using L = typename S::L;
  const bool aligned = (reinterpret_cast<uintptr_t>(base) & 15u) == 0;
  const unsigned nvec = aligned ? n / S::kPer : 0u;
  const uint4* p = reinterpret_cast<const uint4*>(base);
  unsigned i = threadIdx.x;
  for (; i + 3u * kThreads < nvec; i += 4u * kThreads) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = __ldg(p + i + u * kThreads);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      L x[S::kPer];
      S::unpack(v[u], x);
#pragma unroll
      for (int k = 0; k < S::kPer; ++k) f(x[k]);
      f.flush();
    }
  }
  for (; i < nvec; i += kThreads) {
    L x[S::kPer];
    S::unpack(__ldg(p + i), x);
#pragma unroll
    for (int k = 0; k < S::kPer; ++k) f(x[k]);
    f.flush();
  }
  for (unsigned j = nvec * S::kPer + threadIdx.x; j < n; j += kThreads) {
    f(S::at(base, j));
    f.flush();
  }
}

}  // namespace cuda_dev
}  // namespace tensorvigil
