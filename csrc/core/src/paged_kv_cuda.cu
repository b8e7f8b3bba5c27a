// CUDA paged KV write: one launch writes K and V. A 2-D block copies rows with the widest vector
// the addresses allow (x: a row's vectors, y: tokens), like compaction but scattering by slot.
#include <cuda_runtime.h>

#include <cstdint>

#include "adsc/paged_kv.h"
#include "paged_kv_impl.h"
#include "cuda_util.cuh"

namespace adsc {
namespace {

template <int Bytes>
__global__ void write_paged_kv_kernel(const char* __restrict__ key,    // [T, row] stride key_stride
                                      const char* __restrict__ value,  // [T, row] stride value_stride
                                      int64_t key_stride, int64_t value_stride,
                                      char* __restrict__ key_cache,    // [slots, row] stride cache_stride
                                      char* __restrict__ value_cache,
                                      int64_t cache_stride, int64_t num_tokens, int64_t num_slots,
                                      int64_t vecs_per_row,
                                      const int64_t* __restrict__ slot_mapping,  // [T]
                                      int32_t* error_flag) {
  using V = typename detail::Vec<Bytes>::type;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; t < num_tokens;
       t += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t slot = slot_mapping[t];
    if (slot < 0 || slot >= num_slots) {
      if (slot != -1 && threadIdx.x == 0 && error_flag != nullptr) atomicExch(error_flag, 1);
      continue;
    }
    const V* k = reinterpret_cast<const V*>(key + t * key_stride);
    const V* v = reinterpret_cast<const V*>(value + t * value_stride);
    V* kc = reinterpret_cast<V*>(key_cache + slot * cache_stride);
    V* vc = reinterpret_cast<V*>(value_cache + slot * cache_stride);
    for (int64_t c = threadIdx.x; c < vecs_per_row; c += blockDim.x) {
      kc[c] = k[c];
      vc[c] = v[c];
    }
  }
}

template <int Bytes>
void launch(const PagedKVParams& p, int32_t* error_flag, cudaStream_t stream) {
  const int64_t vecs = p.row_bytes / Bytes;
  const dim3 block = detail::row_block(vecs);
  write_paged_kv_kernel<Bytes><<<detail::row_grid(p.num_tokens, block), block, 0, stream>>>(
      static_cast<const char*>(p.key), static_cast<const char*>(p.value), p.key_stride,
      p.value_stride, static_cast<char*>(p.key_cache), static_cast<char*>(p.value_cache),
      p.cache_stride, p.num_tokens, p.num_slots, vecs, p.slot_mapping, error_flag);
}

}  // namespace

Status write_paged_kv_cuda(const PagedKVParams& p, int32_t* error_flag,
                           adsc_stream_t stream) noexcept {
  ADSC_RETURN_IF_ERROR(detail::check_paged_kv_params(p, error_flag));
  if (p.num_tokens == 0 || p.row_bytes == 0) return Status::kOk;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const uintptr_t bits =
      reinterpret_cast<uintptr_t>(p.key) | reinterpret_cast<uintptr_t>(p.value) |
      reinterpret_cast<uintptr_t>(p.key_cache) | reinterpret_cast<uintptr_t>(p.value_cache) |
      static_cast<uintptr_t>(p.key_stride) | static_cast<uintptr_t>(p.value_stride) |
      static_cast<uintptr_t>(p.cache_stride) | static_cast<uintptr_t>(p.row_bytes);
  switch (detail::vector_bytes(bits)) {
    case 16: launch<16>(p, error_flag, s); break;
    case 8: launch<8>(p, error_flag, s); break;
    case 4: launch<4>(p, error_flag, s); break;
    case 2: launch<2>(p, error_flag, s); break;
    default: launch<1>(p, error_flag, s); break;
  }
  return detail::launch_status("write_paged_kv_cuda");
}

}  // namespace adsc
