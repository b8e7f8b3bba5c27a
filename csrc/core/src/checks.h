// Argument checks shared by every entry point of the core (internal header): pointer alignment,
// the byte extent of strided rows without overflow, and overlap of extents (BufferSet: the one
// helper every entry point uses for its buffers).
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

// A typed pointer (nullable) must be aligned to its type's alignment.
inline Status check_aligned(const char* function, const char* what, const void* p,
                            uintptr_t alignment) {
  if (p != nullptr && !is_aligned(p, alignment))
    return fail(Status::kInvalidArgument, "%s: %s must be aligned to %d bytes (the alignment of "
                "its type), got address %p", function, what, static_cast<int>(alignment), p);
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

// Every buffer of one call, checked the same way in every entry point (the rule adsc.h states):
// each typed pointer aligned to its type, each extent inside the address space, and each buffer
// the call writes disjoint from every other buffer of the call, read or written. Buffers are
// added with their sizes as the call declares them (already checked to be >= 0); the first
// problem is kept and check() reports it:
//
//   return BufferSet("compact").rows("src", p.src, ...).rows("dst", p.dst, ..., kWritten)
//                              .array("index", p.index, p.dst_rows, 4).check();
class BufferSet {
 public:
  static constexpr bool kWritten = true;

  explicit BufferSet(const char* function) : function_(function) {}

  // `rows` rows of `row_bytes` bytes at a stride of `stride` bytes (rows of bytes need no
  // alignment unless one is given).
  BufferSet& rows(const char* name, const void* base, int64_t rows, int64_t stride,
                  int64_t row_bytes, bool written = false, uintptr_t alignment = 1) {
    return add(name, base, rows, stride, row_bytes, written, alignment);
  }
  // `count` contiguous elements of `elem_bytes` bytes, aligned to `alignment` (default: the
  // element size, right for the scalar types the ABI uses).
  BufferSet& array(const char* name, const void* base, int64_t count, int64_t elem_bytes,
                   bool written = false, uintptr_t alignment = 0) {
    return add(name, base, count, elem_bytes, elem_bytes, written,
               alignment ? alignment : static_cast<uintptr_t>(elem_bytes));
  }

  Status check() const {
    if (status_ != Status::kOk) return status_;
    for (int i = 0; i < n_; ++i)
      ADSC_RETURN_IF_ERROR(check_aligned(function_, items_[i].name, items_[i].base,
                                         items_[i].alignment));
    for (int i = 0; i < n_; ++i) {
      if (!items_[i].written) continue;
      for (int j = 0; j < n_; ++j)
        if (j != i && (!items_[j].written || j > i) && overlaps(items_[i].extent, items_[j].extent))
          return fail(Status::kInvalidArgument, "%s: %s and %s overlap in memory; a buffer the "
                      "call writes must not share bytes with another buffer of the call",
                      function_, items_[i].name, items_[j].name);
    }
    return Status::kOk;
  }

 private:
  struct Item {
    const char* name;
    const void* base;
    Extent extent;
    bool written;
    uintptr_t alignment;
  };
  static constexpr int kMaxItems = 16;

  BufferSet& add(const char* name, const void* base, int64_t rows, int64_t stride,
                 int64_t row_bytes, bool written, uintptr_t alignment) {
    if (status_ != Status::kOk) return *this;
    if (n_ == kMaxItems) {  // a programming error of the core, reported rather than ignored
      status_ = fail(Status::kInvalidArgument, "%s: too many buffers to check", function_);
      return *this;
    }
    Item& item = items_[n_++];
    item = Item{name, base, Extent{}, written, alignment};
    status_ = row_extent(function_, name, base, rows, stride, row_bytes, &item.extent);
    return *this;
  }

  const char* function_;
  Item items_[kMaxItems];
  int n_ = 0;
  Status status_ = Status::kOk;
};

}  // namespace detail
}  // namespace adsc
