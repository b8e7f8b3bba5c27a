// CUDA implementations of the adsc torch ops: the same front end as the CPU ones, with the core's
// CUDA launchers on the current stream of the inputs' device. The dispatcher lands here when any
// argument is on CUDA, so the first tensor may be a CPU one: the guards are device-generic and the
// front end's device checks give the error.
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "ops.h"

namespace {

const adsc_torch::Backend& cuda_backend() {
  static const adsc_torch::Backend backend{
      &adsc::plan_cuda,
      &adsc::compact_tokens_cuda,
      &adsc::scatter_add_rows_cuda,
      &adsc::write_paged_kv_cuda,
      [](const at::Device& device) {
        return reinterpret_cast<adsc_stream_t>(at::cuda::getCurrentCUDAStream(device.index()).stream());
      },
  };
  return backend;
}

adsc_torch::PlanTensors plan_packed_cuda(const c10::optional<at::Tensor>& input_ids,
                                         const at::Tensor& cu_seqlens,
                                         const c10::optional<at::Tensor>& image_spans,
                                         int64_t num_tokens, int64_t image_token_id,
                                         int64_t grid_h, int64_t grid_w, at::IntArrayRef factors) {
  const c10::DeviceGuard guard(cu_seqlens.device());
  return adsc_torch::stage_plan_packed(cuda_backend(), input_ids, cu_seqlens, image_spans,
                                       num_tokens, image_token_id, grid_h, grid_w, factors);
}

adsc_torch::PlanTensors plan_padded_cuda(const c10::optional<at::Tensor>& input_ids,
                                         const at::Tensor& attention_mask,
                                         const c10::optional<at::Tensor>& image_spans,
                                         int64_t image_token_id, int64_t grid_h, int64_t grid_w,
                                         at::IntArrayRef factors, bool pad_left) {
  const c10::DeviceGuard guard(attention_mask.device());
  return adsc_torch::stage_plan_padded(cuda_backend(), input_ids, attention_mask, image_spans,
                                       image_token_id, grid_h, grid_w, factors, pad_left);
}

at::Tensor compact_cuda(const at::Tensor& x, const at::Tensor& index, bool check_index) {
  const c10::DeviceGuard guard(x.device());
  return adsc_torch::compact_tokens(cuda_backend(), x, index, check_index);
}

void compact_out_cuda(const at::Tensor& x, const at::Tensor& index, at::Tensor& out,
                      bool check_index) {
  const c10::DeviceGuard guard(x.device());
  adsc_torch::compact_tokens_out(cuda_backend(), x, index, out, check_index);
}

at::Tensor scatter_add_cuda(const at::Tensor& grad, const at::Tensor& index, int64_t num_rows) {
  const c10::DeviceGuard guard(grad.device());
  return adsc_torch::scatter_add_tokens(cuda_backend(), grad, index, num_rows);
}

void write_paged_kv_cuda(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                         at::Tensor& value_cache, const at::Tensor& slot_mapping, bool check_slots) {
  const c10::DeviceGuard guard(key.device());
  adsc_torch::write_paged_kv(cuda_backend(), key, value, key_cache, value_cache, slot_mapping,
                             check_slots);
}

}  // namespace

TORCH_LIBRARY_IMPL(adsc, CUDA, m) {
  m.impl("stage_plan_packed", &plan_packed_cuda);
  m.impl("stage_plan_padded", &plan_padded_cuda);
  m.impl("compact_tokens", &compact_cuda);
  m.impl("compact_tokens_out", &compact_out_cuda);
  m.impl("scatter_add_tokens", &scatter_add_cuda);
  m.impl("write_paged_kv", &write_paged_kv_cuda);
}
