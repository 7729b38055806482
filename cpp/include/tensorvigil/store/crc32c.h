#pragma once
/// \file store/crc32c.h
/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), as used by every checksum of the
/// format. Uses the SSE4.2 instruction when the CPU has it.
#include <cstddef>
#include <cstdint>

namespace tensorvigil::store {
/// Extends `crc` (0 to start) with `n` bytes. crc32c("123456789") == 0xE3069283.
uint32_t crc32c(const void* data, std::size_t n, uint32_t crc = 0);
}  // namespace tensorvigil::store
