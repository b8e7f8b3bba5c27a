// Host implementation of the paged KV write, and the argument checks both paths share.
#include <cstring>

#include "adsc/paged_kv.h"
#include "paged_kv_impl.h"

namespace adsc {

Status write_paged_kv_cpu(const PagedKVParams& p) noexcept {
  ADSC_RETURN_IF_ERROR(detail::check_paged_kv_params(p));
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const int64_t slot = p.slot_mapping[t];
    if (slot < -1 || slot >= p.num_slots)
      return fail(Status::kIndexOutOfRange, "write_paged_kv: slot_mapping[%lld] = %lld is out of "
                  "range: expected -1 (padding) or 0 <= slot < %lld (num_blocks * block_size)",
                  static_cast<long long>(t), static_cast<long long>(slot),
                  static_cast<long long>(p.num_slots));
  }
  if (p.row_bytes == 0) return Status::kOk;  // key, value and the caches may be NULL
  const size_t n = static_cast<size_t>(p.row_bytes);
  for (int64_t t = 0; t < p.num_tokens; ++t) {
    const int64_t slot = p.slot_mapping[t];
    if (slot < 0) continue;
    std::memcpy(static_cast<char*>(p.key_cache) + slot * p.cache_stride,
                static_cast<const char*>(p.key) + t * p.key_stride, n);
    std::memcpy(static_cast<char*>(p.value_cache) + slot * p.cache_stride,
                static_cast<const char*>(p.value) + t * p.value_stride, n);
  }
  return Status::kOk;
}

}  // namespace adsc
