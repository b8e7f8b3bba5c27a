#include "ops.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <limits>
#include <string>
#include <utility>

namespace adsc_torch {
namespace {

// Raises the Python exception that fits a core status, with the core's message.
void throw_on_error(adsc::Status status) {
  switch (status) {
    case adsc::Status::kOk: return;
    case adsc::Status::kIndexOutOfRange: TORCH_CHECK_INDEX(false, adsc::last_error());
    case adsc::Status::kInvalidArgument:
    case adsc::Status::kInvalidInput: TORCH_CHECK_VALUE(false, adsc::last_error());
    default: TORCH_CHECK(false, "adsc: ", adsc::status_name(status), ": ", adsc::last_error());
  }
}

// The core's token limit, checked before anything is converted, copied or allocated for a plan.
void check_plan_tokens(int64_t num_tokens, const std::string& shape) {
  TORCH_CHECK_VALUE(num_tokens >= 0 && num_tokens <= adsc::kPlanMaxTokens,
                    "too many tokens: a plan takes at most ", adsc::kPlanMaxTokens,
                    " tokens (its indices are int32), got ", num_tokens, shape);
}

// Bytes [first, last] a tensor's elements span (numel > 0); strides may be any sign.
std::pair<uintptr_t, uintptr_t> byte_span(const at::Tensor& t) {
  int64_t lo = 0, hi = 0;
  for (int64_t d = 0; d < t.dim(); ++d) {
    const int64_t reach = (t.size(d) - 1) * t.stride(d);
    (reach < 0 ? lo : hi) += reach;
  }
  const auto base = reinterpret_cast<uintptr_t>(t.data_ptr());
  const int64_t esize = static_cast<int64_t>(t.element_size());
  return {base + lo * esize, base + hi * esize + esize - 1};
}

// Whether two tensors may share bytes: the same storage and overlapping spans. Conservative for
// interleaved views (torch's own overlap check gives up on non-dense tensors, "too hard").
bool may_share_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  if (!a.storage().is_alias_of(b.storage())) return false;
  const auto [a_lo, a_hi] = byte_span(a);
  const auto [b_lo, b_hi] = byte_span(b);
  return a_lo <= b_hi && b_lo <= a_hi;
}

// Written tensors must not share memory with the tensors a call reads.
void check_no_overlap(const char* op, const char* written_name, const at::Tensor& written,
                      const char* read_name, const at::Tensor& read) {
  TORCH_CHECK_VALUE(!may_share_memory(written, read), op, ": ", written_name, " and ", read_name,
                    " share memory (", read_name, " is a view of ", written_name,
                    " or overlaps it), so the result would depend on the order of the writes; "
                    "pass a copy (", read_name, ".clone())");
}

void check_device(const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on ", device, " like the other inputs, got ",
                    t.device());
}

at::Tensor as_int64(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, name,
                   " must be an int64 (or int32) tensor, got ", t.scalar_type());
  return t.to(at::kLong).contiguous();
}

// (min, max) of a non-empty integer tensor, on the host: one synchronisation on a GPU.
std::pair<int64_t, int64_t> value_range(const at::Tensor& t) {
  const auto [lo, hi] = at::aminmax(t);
  return {lo.item<int64_t>(), hi.item<int64_t>()};
}

void fill_schedule(adsc::PlanParams& p, at::IntArrayRef factors) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(factors.size()) <= adsc::kMaxSteps, "a schedule has at most ",
                    adsc::kMaxSteps, " steps, got ", factors.size());
  p.num_steps = static_cast<int32_t>(factors.size());
  for (size_t i = 0; i < factors.size(); ++i) {
    TORCH_CHECK_VALUE(factors[i] == 2 || factors[i] == 4, "schedule step ", i,
                      ": factor must be 2 or 4, got ", factors[i]);
    p.factors[i] = static_cast<int32_t>(factors[i]);
  }
}

void fill_images(adsc::PlanParams& p, const c10::optional<at::Tensor>& input_ids,
                 const c10::optional<at::Tensor>& image_spans, int64_t image_token_id,
                 int64_t grid_h, int64_t grid_w, at::Tensor* ids_keep, at::Tensor* spans_keep) {
  TORCH_CHECK_VALUE(input_ids.has_value() != image_spans.has_value(),
                    "give exactly one of input_ids (images are runs of image_token_id) and "
                    "image_spans");
  if (input_ids.has_value()) {
    TORCH_CHECK_VALUE(grid_h >= 1 && grid_w >= 1 && grid_h <= (1 << 15) && grid_w <= (1 << 15),
                      "grid must have positive sides, got ", grid_h, "x", grid_w);
    // Checked here too: an empty input_ids has a NULL data pointer, which the core takes for
    // "no input_ids" and then has no grid to check.
    TORCH_CHECK_VALUE(adsc::grid_fits(static_cast<int>(grid_h), static_cast<int>(grid_w), p.factors,
                                      p.num_steps),
                      "the schedule cannot downsample a ", grid_h, "x", grid_w,
                      " image grid: it would halve a side of length 1");
    *ids_keep = as_int64("input_ids", *input_ids);
    p.input_ids = ids_keep->data_ptr<int64_t>();
    p.image_token_id = image_token_id;
    p.grid_h = static_cast<int32_t>(grid_h);
    p.grid_w = static_cast<int32_t>(grid_w);
  } else {
    *spans_keep = as_int64("image_spans", *image_spans);
    TORCH_CHECK_VALUE(spans_keep->dim() == 2 && (spans_keep->size(1) == 4 || spans_keep->size(1) == 5),
                      "image_spans must be [N, 4] rows of (sequence, start, height, width) or "
                      "[N, 5] with a newline flag, got ", spans_keep->sizes());
    p.spans = spans_keep->data_ptr<int64_t>();
    p.num_spans = spans_keep->size(0);
    p.span_columns = static_cast<int32_t>(spans_keep->size(1));
  }
}

// spans: the plan's spans (undefined without): a span error's fields are printed from a host copy,
// exactly (the summary holds them as int32).
PlanTensors run_plan(const Backend& backend, adsc::PlanParams& p, const at::Device& device,
                     const at::Tensor& spans) {
  const int64_t stages = p.num_steps + 1, T = p.num_tokens;
  // The sizes the core accepts, checked before anything is allocated for them.
  check_plan_tokens(T, "");
  TORCH_CHECK_VALUE(p.batch_size <= adsc::kPlanMaxTokens, "a plan takes at most ",
                    adsc::kPlanMaxTokens, " sequences, got ", p.batch_size);
  const auto i32 = at::TensorOptions().dtype(at::kInt).device(device);
  at::Tensor workspace = at::empty({adsc::plan_workspace_size(T, p.num_steps)}, i32);
  // Slots past a stage's size are filled like padding, so the outputs are fully determined.
  at::Tensor index = at::full({stages, T}, -1, i32);
  at::Tensor source = at::full({stages, T}, -1, i32);
  at::Tensor pos = at::full({stages, T}, 1, i32.dtype(at::kLong));
  at::Tensor cu = at::empty({stages, p.batch_size + 1}, i32);
  at::Tensor summary = at::empty({adsc::plan_summary_size(p.num_steps)}, i32);
  p.workspace = workspace.data_ptr<int32_t>();
  p.index = index.data_ptr<int32_t>();
  p.source_index = source.data_ptr<int32_t>();
  p.position_ids = pos.data_ptr<int64_t>();
  p.cu_seqlens_out = cu.data_ptr<int32_t>();
  p.summary = summary.data_ptr<int32_t>();
  throw_on_error(backend.plan(p, backend.current_stream(device)));
  // The one host-device synchronisation of a plan: sizes and data errors.
  at::Tensor host_summary = summary.cpu();
  const int32_t* hs = host_summary.data_ptr<int32_t>();
  at::Tensor host_spans;  // only on the error path: one more copy, then an exception
  if (hs[0] != adsc::kPlanOk && spans.defined() && spans.numel() > 0) host_spans = spans.cpu();
  throw_on_error(adsc::plan_summary_status(
      hs, p, host_spans.defined() ? host_spans.data_ptr<int64_t>() : nullptr));
  return {index, source, pos, cu, host_summary};
}

// Row view of a tensor whose dims after the first are contiguous and whose rows do not overlap
// (an expanded tensor's rows do): (row_bytes, row_stride_bytes).
bool row_layout(const at::Tensor& t, int64_t* row_bytes, int64_t* row_stride) {
  int64_t elems = 1;
  bool contiguous_rows = true;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    if (t.size(d) != 1 && t.stride(d) != elems) contiguous_rows = false;
    elems *= t.size(d);
  }
  *row_bytes = elems * static_cast<int64_t>(t.element_size());
  *row_stride = t.stride(0) * static_cast<int64_t>(t.element_size());
  if (t.numel() == 0) return true;  // nothing is read or written through the strides
  return contiguous_rows && (t.size(0) <= 1 || *row_stride >= *row_bytes);
}

// An input as rows the core can read: itself when row_layout accepts it, else a contiguous copy.
at::Tensor as_rows(const at::Tensor& t, int64_t* row_bytes, int64_t* row_stride) {
  if (row_layout(t, row_bytes, row_stride)) return t;
  at::Tensor copy = t.contiguous();
  row_layout(copy, row_bytes, row_stride);
  return copy;
}

void check_index(const at::Tensor& index, const at::Device& device) {
  TORCH_CHECK_TYPE(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong,
                   "index must be int32 or int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.dim() == 1, "index must be 1-D [rows], got shape ", index.sizes());
  check_device("index", index, device);
}

adsc::DType core_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return adsc::DType::kFloat32;
    case at::kHalf: return adsc::DType::kFloat16;
    case at::kBFloat16: return adsc::DType::kBFloat16;
    case at::kDouble: return adsc::DType::kFloat64;
    default: TORCH_CHECK_TYPE(false, "scatter_add_tokens supports float32, float16, bfloat16 and "
                              "float64 gradients, got ", t);
  }
}

}  // namespace

PlanTensors stage_plan_packed(const Backend& backend, const c10::optional<at::Tensor>& input_ids,
                              const at::Tensor& cu_seqlens,
                              const c10::optional<at::Tensor>& image_spans, int64_t num_tokens,
                              int64_t image_token_id, int64_t grid_h, int64_t grid_w,
                              at::IntArrayRef factors) {
  const at::Device device = cu_seqlens.device();
  check_plan_tokens(num_tokens, "");
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt || cu_seqlens.scalar_type() == at::kLong,
                   "cu_seqlens must be int32 or int64, got ", cu_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1,
                    "cu_seqlens must be [B+1] with B >= 0, got shape ", cu_seqlens.sizes());
  TORCH_CHECK_VALUE(cu_seqlens.numel() - 1 <= adsc::kPlanMaxTokens, "a plan takes at most ",
                    adsc::kPlanMaxTokens, " sequences, got ", cu_seqlens.numel() - 1);
  if (input_ids.has_value()) {
    check_device("input_ids", *input_ids, device);
    TORCH_CHECK_VALUE(input_ids->dim() == 1 && input_ids->numel() == num_tokens,
                      "the packed layout needs input_ids of shape [", num_tokens, "], got ",
                      input_ids->sizes());
  }
  if (image_spans.has_value()) check_device("image_spans", *image_spans, device);
  if (cu_seqlens.scalar_type() == at::kLong && cu_seqlens.numel() > 0) {
    // Narrowing to int32 must not wrap (one small synchronisation; pass int32 to avoid it).
    const auto [lo_v, hi_v] = value_range(cu_seqlens);
    TORCH_CHECK_VALUE(lo_v >= 0 && hi_v <= std::numeric_limits<int32_t>::max(),
                      "cu_seqlens must hold int32 offsets, got values in [", lo_v, ", ", hi_v, "]");
  }
  at::Tensor cu = cu_seqlens.to(at::kInt).contiguous(), ids, spans;
  adsc::PlanParams p;
  p.layout = adsc::Layout::kPacked;
  p.num_tokens = num_tokens;
  p.batch_size = cu.numel() - 1;
  p.cu_seqlens = cu.data_ptr<int32_t>();
  fill_schedule(p, factors);
  fill_images(p, input_ids, image_spans, image_token_id, grid_h, grid_w, &ids, &spans);
  return run_plan(backend, p, device, spans);
}

PlanTensors stage_plan_padded(const Backend& backend, const c10::optional<at::Tensor>& input_ids,
                              const at::Tensor& attention_mask,
                              const c10::optional<at::Tensor>& image_spans,
                              int64_t image_token_id, int64_t grid_h, int64_t grid_w,
                              at::IntArrayRef factors, bool pad_left) {
  const at::Device device = attention_mask.device();
  TORCH_CHECK_VALUE(attention_mask.dim() == 2, "attention_mask must be [B, S], got shape ",
                    attention_mask.sizes());
  TORCH_CHECK_TYPE(!at::isFloatingType(attention_mask.scalar_type()) &&
                   !at::isComplexType(attention_mask.scalar_type()),
                   "attention_mask must be bool or integer, got ", attention_mask.scalar_type());
  // Before the mask is converted or made contiguous: an expanded [B, S] can claim terabytes.
  check_plan_tokens(attention_mask.numel(), " (" + std::to_string(attention_mask.size(0)) + " x " +
                                                std::to_string(attention_mask.size(1)) + ")");
  if (input_ids.has_value()) {
    check_device("input_ids", *input_ids, device);
    TORCH_CHECK_VALUE(input_ids->sizes() == attention_mask.sizes(), "input_ids ",
                      input_ids->sizes(), " and attention_mask ", attention_mask.sizes(),
                      " must have the same shape");
  }
  if (image_spans.has_value()) check_device("image_spans", *image_spans, device);
  at::Tensor mask = attention_mask;
  adsc::PlanParams p;
  switch (mask.scalar_type()) {
    case at::kBool: case at::kByte: p.mask_type = adsc::MaskType::kUInt8; break;
    case at::kInt: p.mask_type = adsc::MaskType::kInt32; break;
    case at::kLong: p.mask_type = adsc::MaskType::kInt64; break;
    default: mask = mask.ne(0); p.mask_type = adsc::MaskType::kUInt8; break;
  }
  mask = mask.contiguous();
  at::Tensor ids, spans;
  p.layout = adsc::Layout::kPadded;
  p.batch_size = mask.size(0);
  p.padded_len = mask.size(1);
  p.num_tokens = mask.numel();
  p.mask = mask.data_ptr();
  p.pad_left = pad_left;
  fill_schedule(p, factors);
  fill_images(p, input_ids, image_spans, image_token_id, grid_h, grid_w, &ids, &spans);
  return run_plan(backend, p, device, spans);
}

void compact_tokens_out(const Backend& backend, const at::Tensor& x_in, const at::Tensor& index_in,
                        at::Tensor& out, bool check_index_range) {
  const at::Device device = x_in.device();
  TORCH_CHECK_VALUE(x_in.dim() >= 1, "x must have a token dim: shape [rows, ...], got a scalar");
  check_index(index_in, device);
  check_device("out", out, device);
  TORCH_CHECK_TYPE(out.scalar_type() == x_in.scalar_type(), "out must have x's dtype ",
                   x_in.scalar_type(), ", got ", out.scalar_type());
  std::vector<int64_t> want(x_in.sizes().begin(), x_in.sizes().end());
  want[0] = index_in.size(0);
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(want), "out must have shape ",
                    at::IntArrayRef(want), " ([index rows] + x.shape[1:]), got ", out.sizes());
  int64_t out_row_bytes = 0, out_stride = 0, row_bytes = 0, src_stride = 0;
  TORCH_CHECK_VALUE(row_layout(out, &out_row_bytes, &out_stride),
                    "out must be contiguous in its dims after the first, got strides ", out.strides());
  at::assert_no_overlap(out, x_in);
  const at::Tensor x = as_rows(x_in, &row_bytes, &src_stride);
  const at::Tensor index = index_in.contiguous();
  adsc::CompactTokensParams p;
  p.src = x.data_ptr();
  p.src_rows = x.size(0);
  p.src_row_stride = src_stride;
  p.dst = out.data_ptr();
  p.dst_rows = out.size(0);
  p.dst_row_stride = out_stride;
  p.row_bytes = row_bytes;
  p.index = index.data_ptr();
  p.index_is_int64 = index.scalar_type() == at::kLong;
  if (check_index_range && device.type() != at::kCPU && index.numel() > 0) {
    // The CPU core checks as it goes; on a GPU that costs one synchronisation, so callers whose
    // indices come from a plan pass check_index=false.
    const auto [lo_v, hi_v] = value_range(index);
    TORCH_CHECK_INDEX(lo_v >= -1 && hi_v < p.src_rows, "compact: index values must be -1 "
                      "(padding) or in [0, ", p.src_rows, "), got values in [", lo_v, ", ", hi_v, "]");
  }
  throw_on_error(backend.compact_tokens(p, nullptr, backend.current_stream(device)));
}

at::Tensor compact_tokens(const Backend& backend, const at::Tensor& x, const at::Tensor& index,
                          bool check_index_range) {
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have a token dim: shape [rows, ...], got a scalar");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape[0] = index.dim() == 1 ? index.size(0) : 0;
  at::Tensor out = at::empty(shape, x.options().memory_format(at::MemoryFormat::Contiguous));
  compact_tokens_out(backend, x, index, out, check_index_range);
  return out;
}

at::Tensor scatter_add_tokens(const Backend& backend, const at::Tensor& grad_in,
                              const at::Tensor& index_in, int64_t num_rows) {
  const at::Device device = grad_in.device();
  TORCH_CHECK_VALUE(grad_in.dim() >= 1, "grad must be [rows, ...], got a scalar");
  check_index(index_in, device);
  TORCH_CHECK_VALUE(index_in.size(0) == grad_in.size(0), "index has ", index_in.size(0),
                    " rows but grad has ", grad_in.size(0));
  TORCH_CHECK_VALUE(num_rows >= 0, "num_rows must be >= 0, got ", num_rows);
  const adsc::DType dtype = core_dtype(grad_in.scalar_type());
  const at::Tensor grad = grad_in.contiguous(), index = index_in.contiguous();
  std::vector<int64_t> shape(grad.sizes().begin(), grad.sizes().end());
  shape[0] = num_rows;
  at::Tensor out = at::zeros(shape, grad.options());
  int64_t row_elems = 1;
  for (int64_t d = 1; d < grad.dim(); ++d) row_elems *= grad.size(d);
  adsc::ScatterAddRowsParams p;
  p.src = grad.data_ptr();
  p.src_rows = grad.size(0);
  p.src_row_stride = row_elems;
  p.dst = out.data_ptr();
  p.dst_rows = num_rows;
  p.dst_row_stride = row_elems;
  p.row_elems = row_elems;
  p.dtype = dtype;
  p.index = index.data_ptr();
  p.index_is_int64 = index.scalar_type() == at::kLong;
  throw_on_error(backend.scatter_add_rows(p, nullptr, backend.current_stream(device)));
  return out;
}

void write_paged_kv(const Backend& backend, const at::Tensor& key_in, const at::Tensor& value_in,
                    at::Tensor& key_cache, at::Tensor& value_cache,
                    const at::Tensor& slot_mapping_in, bool check_slots) {
  const at::Device device = key_in.device();
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"value", &value_in},
                                {"key_cache", &key_cache}, {"value_cache", &value_cache},
                                {"slot_mapping", &slot_mapping_in}})
    check_device(name, *t, device);
  TORCH_CHECK_VALUE(key_in.dim() >= 1 && key_in.sizes() == value_in.sizes(),
                    "key and value must be [tokens, ...] of one shape, got ", key_in.sizes(),
                    " and ", value_in.sizes());
  TORCH_CHECK_TYPE(key_in.scalar_type() == value_in.scalar_type() &&
                   key_cache.scalar_type() == key_in.scalar_type() &&
                   value_cache.scalar_type() == key_in.scalar_type(),
                   "key, value and the caches must share one dtype, got ", key_in.scalar_type(), ", ",
                   value_in.scalar_type(), ", ", key_cache.scalar_type(), ", ",
                   value_cache.scalar_type());
  TORCH_CHECK_VALUE(key_cache.dim() == key_in.dim() + 1 && key_cache.sizes() == value_cache.sizes() &&
                    key_cache.sizes().slice(2) == key_in.sizes().slice(1),
                    "caches must be [num_blocks, block_size] + key.shape[1:] = [*, *, ",
                    key_in.sizes().slice(1), "], got ", key_cache.sizes(), " and ", value_cache.sizes());
  TORCH_CHECK_VALUE(key_cache.is_contiguous() && value_cache.is_contiguous(),
                    "key_cache and value_cache must be contiguous");
  for (const auto& [cache_name, cache] : {std::pair<const char*, const at::Tensor*>{"key_cache", &key_cache},
                                          {"value_cache", &value_cache}}) {
    check_no_overlap("write_paged_kv", cache_name, *cache, "key", key_in);
    check_no_overlap("write_paged_kv", cache_name, *cache, "value", value_in);
  }
  check_no_overlap("write_paged_kv", "key_cache", key_cache, "value_cache", value_cache);
  TORCH_CHECK_TYPE(slot_mapping_in.scalar_type() == at::kLong, "slot_mapping must be int64, got ",
                   slot_mapping_in.scalar_type());
  TORCH_CHECK_VALUE(slot_mapping_in.dim() == 1 && slot_mapping_in.size(0) == key_in.size(0),
                    "slot_mapping must be [", key_in.size(0), "] (one slot per token), got ",
                    slot_mapping_in.sizes());
  int64_t row_bytes = 0, key_stride = 0, value_stride = 0;
  const at::Tensor key = as_rows(key_in, &row_bytes, &key_stride);
  const at::Tensor value = as_rows(value_in, &row_bytes, &value_stride);
  const at::Tensor slots = slot_mapping_in.contiguous();
  adsc::PagedKVParams p;
  p.key = key.data_ptr();
  p.value = value.data_ptr();
  p.key_stride = key_stride;
  p.value_stride = value_stride;
  p.key_cache = key_cache.data_ptr();
  p.value_cache = value_cache.data_ptr();
  p.cache_stride = row_bytes;
  p.num_tokens = key.size(0);
  p.num_slots = key_cache.size(0) * key_cache.size(1);
  p.row_bytes = row_bytes;
  p.slot_mapping = slots.data_ptr<int64_t>();
  if (check_slots && device.type() != at::kCPU && slots.numel() > 0) {
    const auto [lo_v, hi_v] = value_range(slots);
    TORCH_CHECK_INDEX(lo_v >= -1 && hi_v < p.num_slots, "write_paged_kv: slots must be -1 "
                      "(padding) or in [0, ", p.num_slots, "), got values in [", lo_v, ", ", hi_v, "]");
  }
  throw_on_error(backend.write_paged_kv(p, nullptr, backend.current_stream(device)));
}

const Backend& cpu_backend() {
  static const Backend backend{
      [](const adsc::PlanParams& p, adsc_stream_t) { return adsc::plan_cpu(p); },
      [](const adsc::CompactTokensParams& p, int32_t*, adsc_stream_t) { return adsc::compact_tokens_cpu(p); },
      [](const adsc::ScatterAddRowsParams& p, int32_t*, adsc_stream_t) {
        return adsc::scatter_add_rows_cpu(p);
      },
      [](const adsc::PagedKVParams& p, int32_t*, adsc_stream_t) {
        return adsc::write_paged_kv_cpu(p);
      },
      [](const at::Device&) { return static_cast<adsc_stream_t>(nullptr); },
  };
  return backend;
}

}  // namespace adsc_torch
