// Argument checks shared by every entry point of the core (internal header): pointer alignment,
// the byte extent of strided rows without overflow, and overlap of two extents.
#pragma once

#include <cstdint>
#include <limits>

#include "adsc/status.h"

namespace adsc {
namespace detail {

// [begin, end) of the bytes a strided row buffer covers; empty when it has no bytes.
struct Extent {
  uintptr_t begin = 0, end = 0;
  bool empty() const { return begin == end; }
};

inline bool is_aligned(const void* p, uintptr_t alignment) {
  return (reinterpret_cast<uintptr_t>(p) & (alignment - 1)) == 0;
}

// A typed pointer (nullable) must be aligned to its element size.
inline Status check_aligned(const char* function, const char* what, const void* p,
                            uintptr_t alignment) {
  if (p != nullptr && !is_aligned(p, alignment))
    return fail(Status::kInvalidArgument, "%s: %s must be aligned to %d bytes (its element "
                "type), got address %p", function, what, static_cast<int>(alignment), p);
  return Status::kOk;
}

// The extent of `rows` rows of `row_bytes` bytes, row r at base + r * stride (bytes), checked
// so that no offset the kernels compute overflows int64 or wraps the address space. Sizes must
// already be known >= 0 and stride >= row_bytes when rows > 1.
inline Status row_extent(const char* function, const char* what, const void* base, int64_t rows,
                         int64_t stride, int64_t row_bytes, Extent* out) {
  *out = Extent{};
  if (rows == 0 || row_bytes == 0 || base == nullptr) return Status::kOk;
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  // (rows - 1) * stride + row_bytes <= kMax, tested without computing the product.
  const bool fits = rows == 1 || (stride > 0 && rows - 1 <= (kMax - row_bytes) / stride);
  const uintptr_t begin = reinterpret_cast<uintptr_t>(base);
  const int64_t bytes = fits ? (rows - 1) * (rows == 1 ? 0 : stride) + row_bytes : 0;
  if (!fits || static_cast<uint64_t>(bytes) > std::numeric_limits<uintptr_t>::max() - begin)
    return fail(Status::kInvalidArgument, "%s: %s of %lld rows x %lld bytes at a stride of %lld "
                "bytes does not fit the address space", function, what,
                static_cast<long long>(rows), static_cast<long long>(row_bytes),
                static_cast<long long>(stride));
  out->begin = begin;
  out->end = begin + static_cast<uintptr_t>(bytes);
  return Status::kOk;
}

inline bool overlaps(const Extent& a, const Extent& b) {
  return !a.empty() && !b.empty() && a.begin < b.end && b.begin < a.end;
}

inline Status check_no_overlap(const char* function, const char* written, const Extent& w,
                               const char* other, const Extent& o) {
  if (overlaps(w, o))
    return fail(Status::kInvalidArgument, "%s: %s and %s overlap in memory; the buffer written "
                "must not share bytes with another buffer of the call", function, written, other);
  return Status::kOk;
}

}  // namespace detail
}  // namespace adsc
