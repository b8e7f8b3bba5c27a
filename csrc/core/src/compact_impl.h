// Argument checks shared by the host and CUDA compaction paths (internal header).
#pragma once

#include "adsc/compact.h"

namespace adsc {
namespace detail {

inline Status check_gather_params(const GatherRowsParams& p) {
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
  return Status::kOk;
}

inline Status check_scatter_params(const ScatterAddRowsParams& p) {
  if (p.src_rows < 0 || p.dst_rows < 0 || p.row_elems < 0)
    return fail(Status::kInvalidArgument, "scatter_add: sizes must be >= 0");
  if (p.dtype != DType::kFloat32 && p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16 &&
      p.dtype != DType::kFloat64)
    return fail(Status::kInvalidArgument, "scatter_add: unsupported dtype code %d",
                static_cast<int>(p.dtype));
  if (p.src_rows > 0 && (p.index == nullptr || (p.row_elems > 0 && (p.src == nullptr ||
                                                                   p.dst == nullptr))))
    return fail(Status::kInvalidArgument, "scatter_add: src, dst and index must not be null");
  if ((p.src_rows > 1 && p.src_row_stride < p.row_elems) ||
      (p.dst_rows > 1 && p.dst_row_stride < p.row_elems))
    return fail(Status::kInvalidArgument, "scatter_add: row strides must be at least the row size");
  return Status::kOk;
}

}  // namespace detail
}  // namespace adsc
