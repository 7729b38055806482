#pragma once
/// \file store/codec.h
/// The chunked payload container shared by every codec (docs/FORMAT.md §6):
///   u32 chunk_size | u32 num_chunks | num_chunks x {u32 stored_len, u32 crc32c} | chunk data
/// A chunk is stored compressed or verbatim when that is not smaller, flagged by stored_len ==
/// chunk's raw length. zstd: one zstd frame. shuffle-zstd (elements of 2+ bytes): the chunk is
/// byte-shuffled into `elem` planes, stored as `elem` u32 plane lengths followed by each plane,
/// a zstd frame or verbatim (plane length == raw_len / elem). The frame's payload_crc covers the
/// chunk table; each chunk has its own CRC-32C.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "tensorvigil/store/format.h"

namespace tensorvigil::store {

/// Byte-shuffles `n` bytes of `elem`-sized elements: out[b * count + i] = in[i * elem + b].
/// Trailing bytes that do not fill an element are copied as they are.
void byte_shuffle(const uint8_t* in, uint8_t* out, std::size_t n, std::size_t elem);
void byte_unshuffle(const uint8_t* in, uint8_t* out, std::size_t n, std::size_t elem);

/// Size of the container header (chunk table included) for `num_chunks` chunks.
inline std::size_t container_header_size(std::size_t num_chunks) { return 8 + 8 * num_chunks; }

/// Number of chunks for `nbytes` of raw data.
inline std::size_t num_chunks_for(std::size_t nbytes, std::size_t chunk_size) {
  return (nbytes + chunk_size - 1) / chunk_size;
}

/// Worst-case stored size of one chunk of `raw_len` bytes of `elem`-byte elements with codec `c`.
std::size_t chunk_bound(Codec c, std::size_t raw_len, std::size_t elem);

/// Encodes one chunk into `out` (capacity chunk_bound). Returns the stored length; equals
/// raw_len when the chunk is stored verbatim. `level` is the zstd level. Thread-safe (uses a
/// thread-local compression context).
std::size_t encode_chunk(Codec c, const uint8_t* raw, std::size_t raw_len, std::size_t elem,
                         int level, uint8_t* out);

/// Decodes a stored chunk into `raw` (exactly raw_len bytes). DataLoss on malformed input.
void decode_chunk(Codec c, const uint8_t* stored, std::size_t stored_len, std::size_t elem,
                  uint8_t* raw, std::size_t raw_len, const char* where);

/// Encodes a whole buffer into a container in one call (single thread; used by tests and small
/// tensors). The result is the full payload.
std::vector<uint8_t> encode_payload(Codec c, const uint8_t* raw, std::size_t n, std::size_t elem,
                                    int level, std::size_t chunk_size = kDefaultChunkSize);

/// Decodes a full container payload into `raw` (exactly raw_len bytes), checking every chunk's
/// CRC-32C. DataLoss naming `where` on any mismatch. Chunks decode on `threads` threads.
void decode_payload(Codec c, const uint8_t* payload, std::size_t payload_len, std::size_t elem,
                    uint8_t* raw, std::size_t raw_len, const char* where, int threads = 1);

}  // namespace tensorvigil::store
