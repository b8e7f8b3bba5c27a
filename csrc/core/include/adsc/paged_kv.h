// adsc/paged_kv.h: writes a stage's new K/V rows into a paged KV cache.
//
// A paged cache is [num_blocks, block_size, num_kv_heads, head_dim] (FlashAttention's paged
// layout), seen here as num_slots = num_blocks * block_size slots of row_bytes each; token t goes
// to slot slot_mapping[t] = block * block_size + offset (-1: a padding token, not written). The
// slot mapping comes from the caller's block tables: with ADSC each stage has its own pool, sized
// by that stage's token counts. A slot outside [-1, num_slots) is an error: the CPU path reports it
// before writing; the CUDA path skips that token and raises *error_flag (when not null).
#pragma once

#include <cstdint>

#include "adsc/common.h"
#include "adsc/status.h"

namespace adsc {

struct PagedKVParams {
  const void* key = nullptr;        // [num_tokens, row_bytes], token stride key_stride (bytes)
  const void* value = nullptr;      // [num_tokens, row_bytes], token stride value_stride (bytes)
  int64_t key_stride = 0;
  int64_t value_stride = 0;
  void* key_cache = nullptr;        // [num_slots, row_bytes], slot stride cache_stride (bytes)
  void* value_cache = nullptr;      // [num_slots, row_bytes], slot stride cache_stride (bytes)
  int64_t cache_stride = 0;
  int64_t num_tokens = 0;
  int64_t num_slots = 0;
  int64_t row_bytes = 0;            // num_kv_heads * head_dim * element size
  const int64_t* slot_mapping = nullptr;  // [num_tokens]
};

Status write_paged_kv_cpu(const PagedKVParams& params) noexcept;
Status write_paged_kv_cuda(const PagedKVParams& params, int32_t* error_flag,
                           adsc_stream_t stream) noexcept;

}  // namespace adsc
