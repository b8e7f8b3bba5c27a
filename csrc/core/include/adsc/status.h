// adsc/status.h: status codes of the core. Every core entry point returns a Status; on failure
// adsc::last_error() holds a readable message (thread-local) saying what was expected and what was
// given. The core never throws and never aborts.
#pragma once

namespace adsc {

enum class Status : int {
  kOk = 0,
  kInvalidArgument = 1,  // a bad pointer, size, schedule or option given by the caller
  kInvalidInput = 2,     // the data itself is bad: a partial image, an overlapping span, ...
  kIndexOutOfRange = 3,  // a gather index outside [-1, rows)
  kCudaError = 4,        // the CUDA runtime reported an error
  kNotCompiled = 5,      // the CUDA path was called in a build without CUDA
};

// Name of a status ("ok", "invalid argument", ...).
const char* status_name(Status status) noexcept;

// The message of the last failing call on this thread ("" if none).
const char* last_error() noexcept;

// Records a printf-style message for last_error() and returns `status` (for `return fail(...)`).
Status fail(Status status, const char* format, ...) noexcept
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

}  // namespace adsc

#define ADSC_RETURN_IF_ERROR(expr)                  \
  do {                                              \
    ::adsc::Status adsc_status_ = (expr);           \
    if (adsc_status_ != ::adsc::Status::kOk) return adsc_status_; \
  } while (0)
