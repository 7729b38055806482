#include "tensorvigil/error.h"

namespace tensorvigil {

const char* error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument: return "InvalidArgument";
    case ErrorCode::kNotFound: return "NotFound";
    case ErrorCode::kDataLoss: return "DataLoss";
    case ErrorCode::kIo: return "Io";
    case ErrorCode::kUnsupported: return "Unsupported";
    case ErrorCode::kFailedPrecondition: return "FailedPrecondition";
  }
  return "Unknown";
}

void throw_error(ErrorCode code, const std::string& message) { throw Error(code, message); }

}  // namespace tensorvigil
