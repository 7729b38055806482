#include "tensorvigil/store/codec.h"

#define ZSTD_STATIC_LINKING_ONLY  // ZSTD_c_literalCompressionMode (a parameter, no static-only symbol)
#include <zstd.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <climits>
#include <cstring>
#include <memory>
#include <string>

#include "tensorvigil/error.h"
#include "tensorvigil/internal/bytes.h"
#include "tensorvigil/internal/thread_pool.h"
#include "tensorvigil/store/crc32c.h"

namespace tensorvigil::store {

namespace {

// Scalar loops from element `start` on (the SIMD paths handle a prefix).
template <std::size_t K>
void shuffle_fixed(const uint8_t* in, uint8_t* out, std::size_t count, std::size_t start = 0) {
  for (std::size_t i = start; i < count; ++i)
    for (std::size_t b = 0; b < K; ++b) out[b * count + i] = in[i * K + b];
}
template <std::size_t K>
void unshuffle_fixed(const uint8_t* in, uint8_t* out, std::size_t count, std::size_t start = 0) {
  for (std::size_t i = start; i < count; ++i)
    for (std::size_t b = 0; b < K; ++b) out[i * K + b] = in[b * count + i];
}

template <std::size_t K>
std::size_t shuffle_simd_prefix(const uint8_t* in, uint8_t* out, std::size_t count);
template <std::size_t K>
std::size_t unshuffle_simd_prefix(const uint8_t* in, uint8_t* out, std::size_t count);

#if defined(__x86_64__)
bool has_ssse3() {
  static const bool v = __builtin_cpu_supports("ssse3");
  return v;
}

// 4-byte elements, 16 at a time: group each vector's bytes by plane (pshufb), then transpose
// the 4x4 matrix of 32-bit groups. The 4x4 byte transpose is its own inverse, so unshuffle uses
// the same mask after the inverse 32-bit transpose.
__attribute__((target("ssse3"))) std::size_t shuffle4_simd(const uint8_t* in, uint8_t* out,
                                                             std::size_t count) {
  const __m128i mask = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  std::size_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const uint8_t* p = in + i * 4;
    __m128i v0 = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), mask);
    __m128i v1 = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)), mask);
    __m128i v2 = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32)), mask);
    __m128i v3 = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 48)), mask);
    __m128i t0 = _mm_unpacklo_epi32(v0, v1), t1 = _mm_unpackhi_epi32(v0, v1);
    __m128i t2 = _mm_unpacklo_epi32(v2, v3), t3 = _mm_unpackhi_epi32(v2, v3);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm_unpacklo_epi64(t0, t2));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + count + i), _mm_unpackhi_epi64(t0, t2));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2 * count + i), _mm_unpacklo_epi64(t1, t3));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 3 * count + i), _mm_unpackhi_epi64(t1, t3));
  }
  return i;
}

__attribute__((target("ssse3"))) std::size_t unshuffle4_simd(const uint8_t* in, uint8_t* out,
                                                               std::size_t count) {
  const __m128i mask = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  std::size_t i = 0;
  for (; i + 16 <= count; i += 16) {
    __m128i p0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    __m128i p1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + count + i));
    __m128i p2 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 2 * count + i));
    __m128i p3 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + 3 * count + i));
    __m128i t0 = _mm_unpacklo_epi32(p0, p1), t1 = _mm_unpacklo_epi32(p2, p3);
    __m128i t2 = _mm_unpackhi_epi32(p0, p1), t3 = _mm_unpackhi_epi32(p2, p3);
    uint8_t* q = out + i * 4;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm_shuffle_epi8(_mm_unpacklo_epi64(t0, t1), mask));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm_shuffle_epi8(_mm_unpackhi_epi64(t0, t1), mask));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32), _mm_shuffle_epi8(_mm_unpacklo_epi64(t2, t3), mask));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 48), _mm_shuffle_epi8(_mm_unpackhi_epi64(t2, t3), mask));
  }
  return i;
}

// 2-byte elements, 16 at a time.
__attribute__((target("ssse3"))) std::size_t shuffle2_simd(const uint8_t* in, uint8_t* out,
                                                             std::size_t count) {
  const __m128i mask = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  std::size_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const uint8_t* p = in + i * 2;
    __m128i v0 = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), mask);
    __m128i v1 = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)), mask);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm_unpacklo_epi64(v0, v1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + count + i), _mm_unpackhi_epi64(v0, v1));
  }
  return i;
}

__attribute__((target("ssse3"))) std::size_t unshuffle2_simd(const uint8_t* in, uint8_t* out,
                                                               std::size_t count) {
  const __m128i mask = _mm_setr_epi8(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  std::size_t i = 0;
  for (; i + 16 <= count; i += 16) {
    __m128i p0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i));
    __m128i p1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + count + i));
    uint8_t* q = out + i * 2;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm_shuffle_epi8(_mm_unpacklo_epi64(p0, p1), mask));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm_shuffle_epi8(_mm_unpackhi_epi64(p0, p1), mask));
  }
  return i;
}
#endif

struct CCtxDeleter {
  void operator()(ZSTD_CCtx* c) const { ZSTD_freeCCtx(c); }
};
struct DCtxDeleter {
  void operator()(ZSTD_DCtx* c) const { ZSTD_freeDCtx(c); }
};

ZSTD_CCtx* thread_cctx() {
  thread_local std::unique_ptr<ZSTD_CCtx, CCtxDeleter> ctx(ZSTD_createCCtx());
  return ctx.get();
}
ZSTD_DCtx* thread_dctx() {
  thread_local std::unique_ptr<ZSTD_DCtx, DCtxDeleter> ctx(ZSTD_createDCtx());
  return ctx.get();
}

template <std::size_t K>
std::size_t shuffle_simd_prefix(const uint8_t* in, uint8_t* out, std::size_t count) {
#if defined(__x86_64__)
  if (has_ssse3()) return K == 4 ? shuffle4_simd(in, out, count) : shuffle2_simd(in, out, count);
#endif
  return 0;
}
template <std::size_t K>
std::size_t unshuffle_simd_prefix(const uint8_t* in, uint8_t* out, std::size_t count) {
#if defined(__x86_64__)
  if (has_ssse3()) return K == 4 ? unshuffle4_simd(in, out, count) : unshuffle2_simd(in, out, count);
#endif
  return 0;
}
}  // namespace

namespace {
// One body for both directions: kShuffle moves byte b of element i to b * count + i.
template <bool kShuffle>
void transpose_bytes(const uint8_t* in, uint8_t* out, std::size_t n, std::size_t elem) {
  std::size_t count = elem > 1 ? n / elem : 0;
  switch (elem) {
    case 0:
    case 1:
      break;
    case 2:
      if (kShuffle)
        shuffle_fixed<2>(in, out, count, shuffle_simd_prefix<2>(in, out, count));
      else
        unshuffle_fixed<2>(in, out, count, unshuffle_simd_prefix<2>(in, out, count));
      break;
    case 4:
      if (kShuffle)
        shuffle_fixed<4>(in, out, count, shuffle_simd_prefix<4>(in, out, count));
      else
        unshuffle_fixed<4>(in, out, count, unshuffle_simd_prefix<4>(in, out, count));
      break;
    case 8:
      if (kShuffle)
        shuffle_fixed<8>(in, out, count);
      else
        unshuffle_fixed<8>(in, out, count);
      break;
    default:
      for (std::size_t i = 0; i < count; ++i)
        for (std::size_t b = 0; b < elem; ++b) {
          if (kShuffle)
            out[b * count + i] = in[i * elem + b];
          else
            out[i * elem + b] = in[b * count + i];
        }
  }
  std::size_t done = count * elem;  // trailing bytes (and elem <= 1) are copied as they are
  std::memcpy(out + done, in + done, n - done);
}
}  // namespace

void byte_shuffle(const uint8_t* in, uint8_t* out, std::size_t n, std::size_t elem) {
  transpose_bytes<true>(in, out, n, elem);
}

void byte_unshuffle(const uint8_t* in, uint8_t* out, std::size_t n, std::size_t elem) {
  transpose_bytes<false>(in, out, n, elem);
}

namespace {
bool planes_split(Codec c, std::size_t elem) { return c == Codec::kShuffleZstd && elem > 1; }

/// Pseudo-level: (almost) no match search, Huffman-coded literals. Byte planes of floats (the
/// exponent plane above all) are low-entropy without long repeats; entropy coding alone
/// compresses them better than level 1 and about five times faster.
constexpr int kEntropyOnly = INT_MIN;

/// zstd-compresses [src, src + n) into dst (capacity cap); 0 when it does not pay.
std::size_t zstd_or_zero(const uint8_t* src, std::size_t n, int level, uint8_t* dst,
                         std::size_t cap) {
  ZSTD_CCtx* ctx = thread_cctx();
  ZSTD_CCtx_reset(ctx, ZSTD_reset_session_and_parameters);
  if (level == kEntropyOnly) {
    ZSTD_CCtx_setParameter(ctx, ZSTD_c_compressionLevel, -500);
    // Negative levels skip literal compression unless told otherwise.
    if (ZSTD_isError(ZSTD_CCtx_setParameter(ctx, ZSTD_c_literalCompressionMode, ZSTD_ps_enable)))
      return 0;
  } else {
    ZSTD_CCtx_setParameter(ctx, ZSTD_c_compressionLevel, level);
  }
  ZSTD_CCtx_setParameter(ctx, ZSTD_c_checksumFlag, 0);
  ZSTD_CCtx_setParameter(ctx, ZSTD_c_contentSizeFlag, 1);
  std::size_t r = ZSTD_compress2(ctx, dst, cap, src, n);
  return ZSTD_isError(r) || r >= n ? 0 : r;
}

// A byte plane whose first kSampleBytes do not compress below kSampleKeep of their size is
// stored verbatim without compressing the rest: for float mantissa planes (close to random)
// this skips most of the zstd work at a negligible cost in ratio.
constexpr std::size_t kSampleBytes = 8192;
constexpr double kSampleKeep = 0.97;
}  // namespace

std::size_t chunk_bound(Codec c, std::size_t raw_len, std::size_t elem) {
  if (c == Codec::kRaw) return raw_len;
  if (planes_split(c, elem)) {
    std::size_t plane = raw_len / elem;
    return std::max(raw_len, 4 * elem + elem * ZSTD_compressBound(plane));
  }
  return std::max<std::size_t>(raw_len, ZSTD_compressBound(raw_len));
}

std::size_t encode_chunk(Codec c, const uint8_t* raw, std::size_t raw_len, std::size_t elem,
                         int level, uint8_t* out) {
  if (c == Codec::kRaw || raw_len == 0) {
    std::memcpy(out, raw, raw_len);
    return raw_len;
  }
  if (!planes_split(c, elem)) {
    std::size_t r = zstd_or_zero(raw, raw_len, level, out, chunk_bound(c, raw_len, elem));
    if (r) return r;
    std::memcpy(out, raw, raw_len);  // incompressible: verbatim
    return raw_len;
  }
  // shuffle-zstd: elem u32 plane lengths, then each plane (zstd frame, or verbatim when its
  // stored length equals the plane length).
  thread_local std::vector<uint8_t> scratch;
  if (scratch.size() < raw_len) scratch.resize(raw_len);
  byte_shuffle(raw, scratch.data(), raw_len, elem);
  const std::size_t plane = raw_len / elem;
  std::size_t pos = 4 * elem;
  for (std::size_t p = 0; p < elem; ++p) {
    const uint8_t* src = scratch.data() + p * plane;
    // Choose, on a sample, between entropy coding alone and zstd `level` (with matches).
    const std::size_t sample = std::min(plane, kSampleBytes);
    const std::size_t cap = ZSTD_compressBound(plane);
    std::size_t se = zstd_or_zero(src, sample, kEntropyOnly, out + pos, cap);
    std::size_t sm = zstd_or_zero(src, sample, level, out + pos, cap);
    auto better = [](std::size_t a, std::size_t b) { return a && (!b || a <= b); };
    int mode = better(se, sm) ? kEntropyOnly : level;
    std::size_t best = better(se, sm) ? se : sm;
    bool try_it = best != 0 && static_cast<double>(best) < kSampleKeep * static_cast<double>(sample);
    std::size_t r = 0;
    if (try_it) r = zstd_or_zero(src, plane, mode, out + pos, cap);
    if (!r) {
      std::memcpy(out + pos, src, plane);
      r = plane;
    }
    uint32_t len = static_cast<uint32_t>(r);
    std::memcpy(out + 4 * p, &len, 4);
    pos += r;
  }
  if (pos >= raw_len) {  // nothing gained: the whole chunk verbatim (unshuffled)
    std::memcpy(out, raw, raw_len);
    return raw_len;
  }
  return pos;
}

void decode_chunk(Codec c, const uint8_t* stored, std::size_t stored_len, std::size_t elem,
                  uint8_t* raw, std::size_t raw_len, const char* where) {
  if (stored_len == raw_len) {  // verbatim
    std::memcpy(raw, stored, raw_len);
    return;
  }
  auto fail = [&](const std::string& what) {
    throw_error(ErrorCode::kDataLoss, std::string("[") + where + "] " + what);
  };
  if (c == Codec::kRaw || stored_len > raw_len)
    fail("chunk length " + std::to_string(stored_len) + " does not match " + std::to_string(raw_len));
  if (!planes_split(c, elem)) {
    std::size_t r = ZSTD_decompressDCtx(thread_dctx(), raw, raw_len, stored, stored_len);
    if (ZSTD_isError(r) || r != raw_len)
      fail(std::string("zstd chunk does not decode: ") +
           (ZSTD_isError(r) ? ZSTD_getErrorName(r) : "wrong size"));
    return;
  }
  if (raw_len % elem != 0) fail("chunk length is not a multiple of the element size");
  const std::size_t plane = raw_len / elem;
  if (stored_len < 4 * elem) fail("plane table is truncated");
  thread_local std::vector<uint8_t> scratch;
  if (scratch.size() < raw_len) scratch.resize(raw_len);
  std::size_t pos = 4 * elem;
  for (std::size_t p = 0; p < elem; ++p) {
    uint32_t len;
    std::memcpy(&len, stored + 4 * p, 4);
    if (len > stored_len - pos) fail("plane " + std::to_string(p) + " overruns the chunk");
    uint8_t* dst = scratch.data() + p * plane;
    if (len == plane) {
      std::memcpy(dst, stored + pos, plane);
    } else {
      std::size_t r = ZSTD_decompressDCtx(thread_dctx(), dst, plane, stored + pos, len);
      if (ZSTD_isError(r) || r != plane)
        fail("zstd plane " + std::to_string(p) + " does not decode: " +
             (ZSTD_isError(r) ? ZSTD_getErrorName(r) : "wrong size"));
    }
    pos += len;
  }
  if (pos != stored_len) fail("plane lengths do not add up to the chunk length");
  byte_unshuffle(scratch.data(), raw, raw_len, elem);
}

std::vector<uint8_t> encode_payload(Codec c, const uint8_t* raw, std::size_t n, std::size_t elem,
                                    int level, std::size_t chunk_size) {
  std::size_t nch = num_chunks_for(n, chunk_size);
  std::size_t hdr = container_header_size(nch);
  std::vector<uint8_t> out(hdr);
  std::vector<uint8_t> tmp(chunk_bound(c, chunk_size, elem));
  uint32_t cs = static_cast<uint32_t>(chunk_size), nc = static_cast<uint32_t>(nch);
  std::memcpy(out.data(), &cs, 4);
  std::memcpy(out.data() + 4, &nc, 4);
  for (std::size_t i = 0; i < nch; ++i) {
    std::size_t len = i + 1 < nch ? chunk_size : n - i * chunk_size;
    std::size_t s = encode_chunk(c, raw + i * chunk_size, len, elem, level, tmp.data());
    uint32_t sl = static_cast<uint32_t>(s), crc = crc32c(tmp.data(), s);
    std::memcpy(out.data() + 8 + 8 * i, &sl, 4);
    std::memcpy(out.data() + 12 + 8 * i, &crc, 4);
    out.insert(out.end(), tmp.data(), tmp.data() + s);
  }
  return out;
}

void decode_payload(Codec c, const uint8_t* payload, std::size_t payload_len, std::size_t elem,
                    uint8_t* raw, std::size_t raw_len, const char* where, int threads) {
  internal::ByteReader r(payload, payload_len, where);
  uint32_t chunk_size = r.get<uint32_t>();
  uint32_t nch = r.get<uint32_t>();
  if (chunk_size == 0 || chunk_size > kMaxChunkSize)
    throw_error(ErrorCode::kDataLoss,
                std::string("[") + where + "] bad chunk size " + std::to_string(chunk_size));
  if (nch != num_chunks_for(raw_len, chunk_size))
    throw_error(ErrorCode::kDataLoss, std::string("[") + where + "] chunk count " +
                                          std::to_string(nch) + " does not match the shape");
  uint64_t pos = container_header_size(nch);
  if (pos > payload_len)  // checked before sizing anything by nch
    throw_error(ErrorCode::kDataLoss, std::string("[") + where + "] chunk table is truncated");
  std::vector<uint64_t> offs(nch + 1);
  std::vector<uint32_t> lens(nch), crcs(nch);
  for (uint32_t i = 0; i < nch; ++i) {
    lens[i] = r.get<uint32_t>();
    crcs[i] = r.get<uint32_t>();
    offs[i] = pos;
    pos += lens[i];
  }
  if (pos != payload_len)
    throw_error(ErrorCode::kDataLoss, std::string("[") + where + "] chunk lengths sum to " +
                                          std::to_string(pos) + " but the payload has " +
                                          std::to_string(payload_len) + " bytes");
  auto one = [&](std::size_t i) {
    const uint8_t* s = payload + offs[i];
    if (crc32c(s, lens[i]) != crcs[i])
      throw_error(ErrorCode::kDataLoss, std::string("[") + where + "] checksum mismatch in chunk " +
                                            std::to_string(i));
    std::size_t len = i + 1 < nch ? chunk_size : raw_len - i * static_cast<std::size_t>(chunk_size);
    decode_chunk(c, s, lens[i], elem, raw + i * static_cast<std::size_t>(chunk_size), len, where);
  };
  if (threads > 1 && nch > 1)
    internal::ThreadPool::global().parallel_for(nch, one, threads);
  else
    for (std::size_t i = 0; i < nch; ++i) one(i);
}

}  // namespace tensorvigil::store
