#pragma once
/// \file internal/bytes.h
/// Little-endian field writer and bounds-checked reader for the on-disk structures.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "tensorvigil/error.h"

namespace tensorvigil::internal {

class ByteWriter {
 public:
  template <typename T>
  void put(T v) {
    static_assert(std::is_trivially_copyable_v<T>);
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    buf_.insert(buf_.end(), p, p + sizeof(T));  // host is little-endian (checked in format.cpp)
  }
  void put_bytes(const void* p, std::size_t n) {
    const auto* b = static_cast<const uint8_t*>(p);
    buf_.insert(buf_.end(), b, b + n);
  }
  std::vector<uint8_t>& bytes() { return buf_; }

 private:
  std::vector<uint8_t> buf_;
};

/// Reads fields from [p, p + n); any read past the end throws DataLoss naming `where`.
class ByteReader {
 public:
  /// `where` names the structure in error messages; it must outlive the reader (it is not
  /// copied: a reader is made per decoded record).
  ByteReader(const uint8_t* p, std::size_t n, const std::string& where)
      : p_(p), n_(n), where_(where.c_str()) {}
  ByteReader(const uint8_t* p, std::size_t n, const char* where) : p_(p), n_(n), where_(where) {}
  template <typename T>
  T get() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, p_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  const uint8_t* take(std::size_t k) {
    need(k);
    const uint8_t* r = p_ + pos_;
    pos_ += k;
    return r;
  }
  std::size_t remaining() const { return n_ - pos_; }
  std::size_t pos() const { return pos_; }

 private:
  void need(std::size_t k) {
    if (k > n_ - pos_)
      throw_error(ErrorCode::kDataLoss, std::string("[") + where_ + "] record is truncated (needs " +
                                            std::to_string(k) + " more bytes at offset " +
                                            std::to_string(pos_) + " of " + std::to_string(n_) +
                                            ")");
  }
  const uint8_t* p_;
  std::size_t n_;
  std::size_t pos_ = 0;
  const char* where_;
};

}  // namespace tensorvigil::internal
