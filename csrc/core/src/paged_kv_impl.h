// Argument checks of the paged KV write shared by the host and CUDA paths (internal header).
#pragma once

#include "adsc/paged_kv.h"
#include "checks.h"

namespace adsc {
namespace detail {

// error_flag: the CUDA path's flag (device int32, nullable), a buffer of the call too.
inline Status check_paged_kv_params(const PagedKVParams& p, const int32_t* error_flag = nullptr) {
  constexpr const char* kFn = "write_paged_kv";
  if (p.num_tokens < 0 || p.num_slots < 0 || p.row_bytes < 0)
    return fail(Status::kInvalidArgument, "write_paged_kv: sizes must be >= 0 (num_tokens=%lld, "
                "num_slots=%lld, row_bytes=%lld)", static_cast<long long>(p.num_tokens),
                static_cast<long long>(p.num_slots), static_cast<long long>(p.row_bytes));
  if (p.num_tokens > 0 && p.slot_mapping == nullptr)
    return fail(Status::kInvalidArgument, "write_paged_kv: slot_mapping must not be null");
  const bool copies = p.num_tokens > 0 && p.row_bytes > 0;
  if (copies && (p.key == nullptr || p.value == nullptr))
    return fail(Status::kInvalidArgument, "write_paged_kv: key and value must not be null");
  // With no slots every token must be skipped (-1), so the caches are never touched.
  if (copies && p.num_slots > 0 && (p.key_cache == nullptr || p.value_cache == nullptr))
    return fail(Status::kInvalidArgument,
                "write_paged_kv: key_cache and value_cache must not be null");
  if ((p.num_tokens > 1 && (p.key_stride < p.row_bytes || p.value_stride < p.row_bytes)) ||
      (p.num_slots > 1 && p.cache_stride < p.row_bytes))
    return fail(Status::kInvalidArgument, "write_paged_kv: strides (key %lld, value %lld, cache "
                "%lld bytes) must be at least the row size (%lld bytes)",
                static_cast<long long>(p.key_stride), static_cast<long long>(p.value_stride),
                static_cast<long long>(p.cache_stride), static_cast<long long>(p.row_bytes));
  return BufferSet(kFn)
      .rows("key", p.key, p.num_tokens, p.key_stride, p.row_bytes)
      .rows("value", p.value, p.num_tokens, p.value_stride, p.row_bytes)
      .rows("key_cache", p.key_cache, p.num_slots, p.cache_stride, p.row_bytes, BufferSet::kWritten)
      .rows("value_cache", p.value_cache, p.num_slots, p.cache_stride, p.row_bytes,
            BufferSet::kWritten)
      .array("slot_mapping", p.slot_mapping, p.num_tokens, 8)
      .array("error_flag", error_flag, 1, 4, BufferSet::kWritten)
      .check();
}

}  // namespace detail
}  // namespace adsc
