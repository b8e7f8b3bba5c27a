// Argument checks of the paged KV write shared by the host and CUDA paths (internal header).
#pragma once

#include "adsc/paged_kv.h"

namespace adsc {
namespace detail {

inline Status check_paged_kv_params(const PagedKVParams& p) {
  if (p.num_tokens < 0 || p.num_slots < 0 || p.row_bytes < 0)
    return fail(Status::kInvalidArgument, "write_paged_kv: sizes must be >= 0 (num_tokens=%lld, "
                "num_slots=%lld, row_bytes=%lld)", static_cast<long long>(p.num_tokens),
                static_cast<long long>(p.num_slots), static_cast<long long>(p.row_bytes));
  if (p.num_tokens > 0 && (p.slot_mapping == nullptr || p.key == nullptr || p.value == nullptr))
    return fail(Status::kInvalidArgument,
                "write_paged_kv: key, value and slot_mapping must not be null");
  if (p.num_tokens > 0 && (p.key_cache == nullptr || p.value_cache == nullptr))
    return fail(Status::kInvalidArgument,
                "write_paged_kv: key_cache and value_cache must not be null");
  if ((p.num_tokens > 1 && (p.key_stride < p.row_bytes || p.value_stride < p.row_bytes)) ||
      (p.num_slots > 1 && p.cache_stride < p.row_bytes))
    return fail(Status::kInvalidArgument, "write_paged_kv: strides (key %lld, value %lld, cache "
                "%lld bytes) must be at least the row size (%lld bytes)",
                static_cast<long long>(p.key_stride), static_cast<long long>(p.value_stride),
                static_cast<long long>(p.cache_stride), static_cast<long long>(p.row_bytes));
  return Status::kOk;
}

}  // namespace detail
}  // namespace adsc
