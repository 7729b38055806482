#pragma once
/// \file error.h
/// The one error type of the core. Bindings map each ErrorCode to one Python class
/// (python/bindings/bind_errors.cpp); docs/FORMAT.md lists the DataLoss cases.
#include <stdexcept>
#include <string>

namespace tensorvigil {

/// Error categories. Stable: Python exception classes are chosen by these.
enum class ErrorCode : int {
  kInvalidArgument = 1,  ///< Caller passed a bad value (unknown dtype, negative step, ...).
  kNotFound = 2,         ///< A run, rank, step or tensor does not exist.
  kDataLoss = 3,         ///< Stored bytes are corrupt, truncated or foreign.
  kIo = 4,               ///< The operating system refused an I/O operation.
  kUnsupported = 5,      ///< Valid request this build cannot serve (e.g. CUDA when off).
  kFailedPrecondition = 6,  ///< Object in the wrong state (writer closed, lock held).
};

/// Name of an error code ("InvalidArgument", ...).
const char* error_code_name(ErrorCode code);

/// Exception thrown by every core function. Messages start with the operation in brackets,
/// e.g. "[shard_reader.open] bad magic in 'x.tvs'".
class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

[[noreturn]] void throw_error(ErrorCode code, const std::string& message);

}  // namespace tensorvigil
