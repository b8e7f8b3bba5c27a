// Every schema of the adsc torch library, with its CPU implementation. CUDA implementations are
// registered in bindings_cuda.cpp; fake (meta) kernels and autograd in adsc_ext/ops.py.
//
// Mutated outputs are marked (a!) and are allocated by the caller, so the hot op compact_tokens_out
// can be captured in a CUDA graph.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

namespace {
using adsc_torch::cpu_backend;

adsc_torch::PlanTensors plan_packed_cpu(const c10::optional<at::Tensor>& input_ids,
                                        const at::Tensor& cu_seqlens,
                                        const c10::optional<at::Tensor>& image_spans,
                                        int64_t num_tokens, int64_t image_token_id, int64_t grid_h,
                                        int64_t grid_w, at::IntArrayRef factors) {
  return adsc_torch::stage_plan_packed(cpu_backend(), input_ids, cu_seqlens, image_spans,
                                       num_tokens, image_token_id, grid_h, grid_w, factors);
}

adsc_torch::PlanTensors plan_padded_cpu(const c10::optional<at::Tensor>& input_ids,
                                        const at::Tensor& attention_mask,
                                        const c10::optional<at::Tensor>& image_spans,
                                        int64_t image_token_id, int64_t grid_h, int64_t grid_w,
                                        at::IntArrayRef factors, bool pad_left) {
  return adsc_torch::stage_plan_padded(cpu_backend(), input_ids, attention_mask, image_spans,
                                       image_token_id, grid_h, grid_w, factors, pad_left);
}

at::Tensor compact_cpu(const at::Tensor& x, const at::Tensor& index, bool check_index) {
  return adsc_torch::compact_tokens(cpu_backend(), x, index, check_index);
}

void compact_out_cpu(const at::Tensor& x, const at::Tensor& index, at::Tensor& out,
                     bool check_index) {
  adsc_torch::compact_tokens_out(cpu_backend(), x, index, out, check_index);
}

void write_paged_kv_cpu(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                        at::Tensor& value_cache, const at::Tensor& slot_mapping, bool check_slots) {
  adsc_torch::write_paged_kv(cpu_backend(), key, value, key_cache, value_cache, slot_mapping,
                             check_slots);
}

at::Tensor scatter_add_cpu(const at::Tensor& grad, const at::Tensor& index, int64_t num_rows) {
  return adsc_torch::scatter_add_tokens(cpu_backend(), grad, index, num_rows);
}
}  // namespace

TORCH_LIBRARY(adsc, m) {
  // Plans: per-stage buffers of capacity T ([stages, T], [stages, B+1]) and a CPU summary of
  // plan_summary_size(len(factors)) int32s holding each stage's token count and longest sequence.
  // Images: runs of image_token_id in input_ids, or image_spans (exactly one of the two):
  // [N, 4] rows of (sequence, start, h, w), or [N, 5] with a newline flag (1: every grid row is
  // followed by a newline token, kept with its row).
  m.def(
      "stage_plan_packed(Tensor? input_ids, Tensor cu_seqlens, Tensor? image_spans, "
      "int num_tokens, int image_token_id, int grid_h, int grid_w, int[] factors) -> "
      "(Tensor index, Tensor source_index, Tensor position_ids, Tensor cu_seqlens_out, "
      "Tensor summary)");
  m.def(
      "stage_plan_padded(Tensor? input_ids, Tensor attention_mask, Tensor? image_spans, "
      "int image_token_id, int grid_h, int grid_w, int[] factors, bool pad_left) -> "
      "(Tensor index, Tensor source_index, Tensor position_ids, Tensor cu_seqlens_out, "
      "Tensor summary)");
  // out[i] = x[index[i]] along dim 0; zero rows where index is -1.
  m.def("compact_tokens(Tensor x, Tensor index, bool check_index=True) -> Tensor");
  m.def("compact_tokens_out(Tensor x, Tensor index, Tensor(a!) out, bool check_index=True) -> ()");
  // The adjoint of compact_tokens: zeros [num_rows, ...] + grad rows added at index.
  m.def("scatter_add_tokens(Tensor grad, Tensor index, int num_rows) -> Tensor");
  // key_cache[slot] = key[t], value_cache[slot] = value[t] for slot = slot_mapping[t] != -1;
  // caches [num_blocks, block_size, ...] (FlashAttention's paged layout).
  m.def(
      "write_paged_kv(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor slot_mapping, bool check_slots=True) -> ()");
}

TORCH_LIBRARY_IMPL(adsc, CPU, m) {
  m.impl("stage_plan_packed", &plan_packed_cpu);
  m.impl("stage_plan_padded", &plan_padded_cpu);
  m.impl("compact_tokens", &compact_cpu);
  m.impl("compact_tokens_out", &compact_out_cpu);
  m.impl("scatter_add_tokens", &scatter_add_cpu);
  m.impl("write_paged_kv", &write_paged_kv_cpu);
}

// `import adsc_ext._C` loads this library, which registers the ops above.
// Its module attributes are the core's limits, so Python reads them instead of copying them:
//   MAX_STEPS            most steps of a schedule (adsc::kMaxSteps, ADSC_MAX_STEPS)
//   PLAN_SUMMARY_HEADER  int32s before the per-stage (tokens, longest) pairs of a plan summary
//   PLAN_MAX_TOKENS      most tokens (and sequences) of one plan
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "adsc torch ops (torch.ops.adsc)", -1,
                               nullptr, nullptr, nullptr, nullptr, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  if (PyModule_AddIntConstant(m, "MAX_STEPS", adsc::kMaxSteps) != 0 ||
      PyModule_AddIntConstant(m, "PLAN_SUMMARY_HEADER", adsc::kSummaryHeader) != 0 ||
      PyModule_AddIntConstant(m, "PLAN_MAX_TOKENS", static_cast<long>(adsc::kPlanMaxTokens)) != 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
