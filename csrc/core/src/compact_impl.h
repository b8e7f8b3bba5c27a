// Argument checks shared by the host and CUDA compaction paths (internal header).
#pragma once

#include "adsc/compact.h"
#include "checks.h"

namespace adsc {
namespace detail {

// error_flag: the CUDA path's flag (device int32, nullable), a buffer of the call too.
inline Status check_compact_params(const CompactTokensParams& p, const int32_t* error_flag = nullptr) {
  if (p.src_rows < 0 || p.dst_rows < 0 || p.row_bytes < 0)
    return fail(Status::kInvalidArgument, "compact: sizes must be >= 0 (src_rows=%lld, "
                "dst_rows=%lld, row_bytes=%lld)", static_cast<long long>(p.src_rows),
                static_cast<long long>(p.dst_rows), static_cast<long long>(p.row_bytes));
  if (p.dst_rows > 0 && p.index == nullptr)
    return fail(Status::kInvalidArgument, "compact: index must not be null");
  if (p.dst_rows > 0 && p.row_bytes > 0 && p.dst == nullptr)
    return fail(Status::kInvalidArgument, "compact: dst must not be null");
  if (p.src_rows > 0 && p.row_bytes > 0 && p.src == nullptr)
    return fail(Status::kInvalidArgument, "compact: src must not be null");
  if ((p.src_rows > 1 && p.src_row_stride < p.row_bytes) ||
      (p.dst_rows > 1 && p.dst_row_stride < p.row_bytes))
    return fail(Status::kInvalidArgument, "compact: row strides (%lld, %lld bytes) must be at "
                "least the row size (%lld bytes)", static_cast<long long>(p.src_row_stride),
                static_cast<long long>(p.dst_row_stride), static_cast<long long>(p.row_bytes));
  const int64_t isize = p.index_is_int64 ? 8 : 4;
  return BufferSet("compact")
      .rows("src", p.src, p.src_rows, p.src_row_stride, p.row_bytes)
      .rows("dst", p.dst, p.dst_rows, p.dst_row_stride, p.row_bytes, BufferSet::kWritten)
      .array("index", p.index, p.dst_rows, isize)
      .array("error_flag", error_flag, 1, 4, BufferSet::kWritten)
      .check();
}

inline int dtype_bytes(DType dtype) {
  return dtype == DType::kFloat64 ? 8 : dtype == DType::kFloat32 ? 4 : 2;
}

inline Status check_scatter_params(const ScatterAddRowsParams& p,
                                   const int32_t* error_flag = nullptr) {
  if (p.src_rows < 0 || p.dst_rows < 0 || p.row_elems < 0)
    return fail(Status::kInvalidArgument, "scatter_add: sizes must be >= 0");
  const int32_t dtype = static_cast<int32_t>(p.dtype);
  if (dtype != static_cast<int32_t>(DType::kFloat32) && dtype != static_cast<int32_t>(DType::kFloat16) &&
      dtype != static_cast<int32_t>(DType::kBFloat16) && dtype != static_cast<int32_t>(DType::kFloat64))
    return fail(Status::kInvalidArgument, "scatter_add: unsupported dtype code %d", dtype);
  if (p.src_rows > 0 && (p.index == nullptr || (p.row_elems > 0 && (p.src == nullptr ||
                                                                   p.dst == nullptr))))
    return fail(Status::kInvalidArgument, "scatter_add: src, dst and index must not be null");
  if ((p.src_rows > 1 && p.src_row_stride < p.row_elems) ||
      (p.dst_rows > 1 && p.dst_row_stride < p.row_elems))
    return fail(Status::kInvalidArgument, "scatter_add: row strides must be at least the row size");
  const int64_t esize = dtype_bytes(p.dtype);
  constexpr int64_t kMaxElems = std::numeric_limits<int64_t>::max() / 8;
  if (p.row_elems > kMaxElems || p.src_row_stride > kMaxElems || p.dst_row_stride > kMaxElems)
    return fail(Status::kInvalidArgument, "scatter_add: row sizes and strides must be below 2^60 "
                "elements");
  // dst is only written where an index points, but every row may be: its whole extent counts.
  return BufferSet("scatter_add")
      .rows("src", p.src, p.src_rows, p.src_row_stride * esize, p.row_elems * esize, false,
            static_cast<uintptr_t>(esize))
      .rows("dst", p.dst, p.dst_rows, p.dst_row_stride * esize, p.row_elems * esize,
            BufferSet::kWritten, static_cast<uintptr_t>(esize))
      .array("index", p.index, p.src_rows, p.index_is_int64 ? 8 : 4)
      .array("error_flag", error_flag, 1, 4, BufferSet::kWritten)
      .check();
}

}  // namespace detail
}  // namespace adsc
