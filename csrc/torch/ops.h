// The torch front end of the adsc core: argument checks, output allocation and the call into the
// core's launchers. Device-generic: a Backend names the launchers of one device type.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "adsc/compact.h"
#include "adsc/paged_kv.h"
#include "adsc/plan.h"

namespace adsc_torch {

struct Backend {
  adsc::Status (*plan)(const adsc::PlanParams&, adsc_stream_t);
  adsc::Status (*compact_tokens)(const adsc::CompactTokensParams&, int32_t* error_flag, adsc_stream_t);
  adsc::Status (*scatter_add_rows)(const adsc::ScatterAddRowsParams&, int32_t* error_flag,
                                   adsc_stream_t);
  adsc::Status (*write_paged_kv)(const adsc::PagedKVParams&, int32_t* error_flag, adsc_stream_t);
  adsc_stream_t (*current_stream)(const at::Device&);
};

const Backend& cpu_backend();

// (index, source_index, position_ids, cu_seqlens, summary): per-stage buffers [stages, T] and
// [stages, B+1] on the input's device; summary [plan_summary_size] on the CPU.
using PlanTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

PlanTensors stage_plan_packed(const Backend& backend, const c10::optional<at::Tensor>& input_ids,
                              const at::Tensor& cu_seqlens,
                              const c10::optional<at::Tensor>& image_spans, int64_t num_tokens,
                              int64_t image_token_id, int64_t grid_h, int64_t grid_w,
                              at::IntArrayRef factors);

PlanTensors stage_plan_padded(const Backend& backend, const c10::optional<at::Tensor>& input_ids,
                              const at::Tensor& attention_mask,
                              const c10::optional<at::Tensor>& image_spans,
                              int64_t image_token_id, int64_t grid_h, int64_t grid_w,
                              at::IntArrayRef factors, bool pad_left);

// out[i] = x[index[i]] (rows along dim 0; zero where index is -1) into caller-owned `out`.
void compact_tokens_out(const Backend& backend, const at::Tensor& x, const at::Tensor& index,
                        at::Tensor& out, bool check_index);
at::Tensor compact_tokens(const Backend& backend, const at::Tensor& x, const at::Tensor& index,
                          bool check_index);

// The adjoint: zeros [num_rows, ...] with grad rows added at index (duplicates accumulate).
at::Tensor scatter_add_tokens(const Backend& backend, const at::Tensor& grad,
                              const at::Tensor& index, int64_t num_rows);

// key_cache[slot_mapping[t]] = key[t] (and value): caches [num_blocks, block_size, ...], keys
// [T, ...] with the same trailing dims; slot -1 skips a token. Writes in place.
void write_paged_kv(const Backend& backend, const at::Tensor& key, const at::Tensor& value,
                    at::Tensor& key_cache, at::Tensor& value_cache,
                    const at::Tensor& slot_mapping, bool check_slots);

}  // namespace adsc_torch
