#include "adsc/status.h"

#include <cstdarg>
#include <cstdio>

namespace adsc {
namespace {
thread_local char g_last_error[1024] = "";
}  // namespace

const char* status_name(Status status) noexcept {
  switch (status) {
    case Status::kOk: return "ok";
    case Status::kInvalidArgument: return "invalid argument";
    case Status::kInvalidInput: return "invalid input";
    case Status::kIndexOutOfRange: return "index out of range";
    case Status::kCudaError: return "CUDA error";
    case Status::kNotCompiled: return "not compiled";
  }
  return "unknown status";
}

const char* last_error() noexcept { return g_last_error; }

Status fail(Status status, const char* format, ...) noexcept {
  va_list args;
  va_start(args, format);
  std::vsnprintf(g_last_error, sizeof(g_last_error), format, args);
  va_end(args);
  return status;
}

}  // namespace adsc
