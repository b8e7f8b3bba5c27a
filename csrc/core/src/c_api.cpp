// The C ABI (adsc/adsc.h) over the C++ core: converts the C structs, checks the pointers the C++
// structs take for granted, and maps statuses one to one.
#include "adsc/adsc.h"

#include "adsc/compact.h"
#include "adsc/paged_kv.h"
#include "adsc/plan.h"
#include "adsc/schedule.h"
#include "checks.h"

#include <cstring>

#ifndef ADSC_VERSION_STRING
#error "ADSC_VERSION_STRING must be defined by the build"
#endif

namespace {

static_assert(ADSC_MAX_STEPS == adsc::kMaxSteps, "adsc.h and schedule.h disagree on max steps");
static_assert(ADSC_PLAN_MAX_TOKENS == adsc::kPlanMaxTokens &&
                  ADSC_PLAN_SUMMARY_HEADER == adsc::kSummaryHeader,
              "adsc.h and plan.h disagree on plan limits");
static_assert(static_cast<int>(ADSC_NOT_COMPILED) == static_cast<int>(adsc::Status::kNotCompiled),
              "adsc.h and status.h disagree on status codes");
static_assert(static_cast<int>(ADSC_PLAN_SPAN_GRID) == adsc::kPlanSpanGrid &&
                  static_cast<int>(ADSC_PLAN_PARTIAL_IMAGE) == adsc::kPlanPartialImage &&
                  static_cast<int>(ADSC_PLAN_SPAN_NEWLINE) == adsc::kPlanSpanNewline,
              "adsc.h and plan.h disagree on plan error codes");

adsc_status to_c(adsc::Status status) { return static_cast<adsc_status>(status); }

adsc_status null_argument(const char* function, const char* what) {
  return to_c(adsc::fail(adsc::Status::kInvalidArgument, "%s: %s must not be NULL", function, what));
}

// A struct passed by pointer (params, schedule, out): not NULL, and aligned to its type before it
// is read or written. Input structs are copied on entry, so they may live anywhere, even inside a
// buffer of the call; the buffers themselves are checked by the core (detail::BufferSet).
template <typename Struct>
adsc_status check_struct(const char* function, const char* what, const Struct* s) {
  if (s == nullptr) return null_argument(function, what);
  return to_c(adsc::detail::check_aligned(function, what, s, alignof(Struct)));
}

adsc::Schedule to_cpp(const adsc_schedule& s) {
  adsc::Schedule out;
  out.num_steps = s.num_steps;
  for (int i = 0; i < adsc::kMaxSteps; ++i) {
    out.layers[i] = s.layers[i];
    out.factors[i] = s.factors[i];
  }
  return out;
}

// Checks the C schedule's fields (a C caller may have filled it by hand).
adsc_status check_schedule(const char* function, const adsc_schedule* s) {
  const adsc_status st = check_struct(function, "schedule", s);
  if (st != ADSC_OK) return st;
  if (s->num_steps < 0 || s->num_steps > ADSC_MAX_STEPS)
    return to_c(adsc::fail(adsc::Status::kInvalidArgument, "%s: schedule.num_steps must be in "
                           "0..%d, got %d", function, ADSC_MAX_STEPS, s->num_steps));
  return ADSC_OK;
}

adsc_status to_cpp(const char* function, const adsc_plan_params* c, int32_t span_columns,
                   adsc::PlanParams* p) {
  adsc_status st = check_struct(function, "params", c);
  if (st != ADSC_OK) return st;
  st = check_schedule(function, c->schedule);
  if (st != ADSC_OK) return st;
  p->layout = static_cast<adsc::Layout>(c->layout);
  p->num_tokens = c->num_tokens;
  p->batch_size = c->batch_size;
  p->padded_len = c->padded_len;
  p->cu_seqlens = c->cu_seqlens;
  p->mask = c->mask;
  p->mask_type = static_cast<adsc::MaskType>(c->mask_type);
  p->input_ids = c->input_ids;
  p->image_token_id = c->image_token_id;
  p->grid_h = c->grid_h;
  p->grid_w = c->grid_w;
  p->spans = c->spans;
  p->num_spans = c->num_spans;
  p->span_columns = span_columns;  // checked by the core (4 or 5)
  p->num_steps = c->schedule->num_steps;
  for (int i = 0; i < c->schedule->num_steps; ++i) p->factors[i] = c->schedule->factors[i];
  p->pad_left = c->pad_left != 0;
  p->workspace = c->workspace;
  p->index = c->index;
  p->source_index = c->source_index;
  p->position_ids = c->position_ids;
  p->cu_seqlens_out = c->cu_seqlens_out;
  p->summary = c->summary;
  return ADSC_OK;
}

adsc::CompactTokensParams to_cpp(const adsc_compact_tokens_params& c) {
  adsc::CompactTokensParams p;
  p.src = c.src;
  p.src_rows = c.src_rows;
  p.src_row_stride = c.src_row_stride;
  p.dst = c.dst;
  p.dst_rows = c.dst_rows;
  p.dst_row_stride = c.dst_row_stride;
  p.row_bytes = c.row_bytes;
  p.index = c.index;
  p.index_is_int64 = c.index_is_int64 != 0;
  return p;
}

adsc::PagedKVParams to_cpp(const adsc_paged_kv_params& c) {
  adsc::PagedKVParams p;
  p.key = c.key;
  p.value = c.value;
  p.key_stride = c.key_stride;
  p.value_stride = c.value_stride;
  p.key_cache = c.key_cache;
  p.value_cache = c.value_cache;
  p.cache_stride = c.cache_stride;
  p.num_tokens = c.num_tokens;
  p.num_slots = c.num_slots;
  p.row_bytes = c.row_bytes;
  p.slot_mapping = c.slot_mapping;
  return p;
}

}  // namespace

extern "C" {

const char* adsc_version(void) { return ADSC_VERSION_STRING; }
const char* adsc_last_error(void) { return adsc::last_error(); }
const char* adsc_status_name(int32_t status) {
  return adsc::status_name(static_cast<adsc::Status>(status));  // Status is int-based: any value
}

adsc_status adsc_schedule_parse(const char* text, adsc_schedule* out) {
  constexpr const char* kFn = "adsc_schedule_parse";
  if (text == nullptr) return null_argument(kFn, "text");
  if (out == nullptr) return null_argument(kFn, "out");
  const adsc_status checked = to_c(
      adsc::detail::BufferSet(kFn)
          .array("text", text, static_cast<int64_t>(std::strlen(text)) + 1, 1)
          .array("out", out, 1, sizeof(adsc_schedule), adsc::detail::BufferSet::kWritten,
                 alignof(adsc_schedule))
          .check());
  if (checked != ADSC_OK) return checked;
  adsc::Schedule s;
  const adsc::Status st = adsc::parse_schedule(text, &s);
  if (st != adsc::Status::kOk) return to_c(st);
  *out = adsc_schedule{};
  out->num_steps = s.num_steps;
  for (int i = 0; i < s.num_steps; ++i) {
    out->layers[i] = s.layers[i];
    out->factors[i] = s.factors[i];
  }
  return ADSC_OK;
}

adsc_status adsc_schedule_format(const adsc_schedule* schedule, char* buffer, size_t size) {
  const adsc_status st = check_schedule("adsc_schedule_format", schedule);
  if (st != ADSC_OK) return st;
  if (buffer == nullptr) return null_argument("adsc_schedule_format", "buffer");
  return to_c(adsc::format_schedule(to_cpp(*schedule), buffer, size));
}

adsc_status adsc_schedule_validate(const adsc_schedule* schedule, int32_t num_layers,
                                   int32_t grid_h, int32_t grid_w, int32_t* grids_h,
                                   int32_t* grids_w) {
  const adsc_status st = check_schedule("adsc_schedule_validate", schedule);
  if (st != ADSC_OK) return st;
  return to_c(adsc::validate_schedule(to_cpp(*schedule), num_layers, grid_h, grid_w, grids_h,
                                      grids_w));
}

int64_t adsc_plan_workspace_size(int64_t num_tokens, int32_t num_steps) {
  return adsc::plan_workspace_size(num_tokens, num_steps);
}
int32_t adsc_plan_summary_size(int32_t num_steps) {
  return num_steps >= 0 && num_steps <= ADSC_MAX_STEPS ? adsc::plan_summary_size(num_steps) : -1;
}
// A summary the accessors may read: not NULL and aligned (they cannot report, so they return -1).
bool readable_summary(const int32_t* summary, int32_t num_steps, int32_t stage) {
  return summary && adsc::detail::is_aligned(summary, alignof(int32_t)) && stage >= 0 &&
         stage <= num_steps && num_steps <= ADSC_MAX_STEPS;
}
int32_t adsc_plan_stage_tokens(const int32_t* summary, int32_t num_steps, int32_t stage) {
  return readable_summary(summary, num_steps, stage) ? summary[adsc::summary_tokens(stage)] : -1;
}
int32_t adsc_plan_stage_max_len(const int32_t* summary, int32_t num_steps, int32_t stage) {
  return readable_summary(summary, num_steps, stage) ? summary[adsc::summary_max_len(stage)] : -1;
}

adsc_status adsc_plan_host(const adsc_plan_params* params) {
  adsc::PlanParams p;
  const adsc_status st = to_cpp("adsc_plan_host", params, 4, &p);
  return st != ADSC_OK ? st : to_c(adsc::plan_cpu(p));
}

adsc_status adsc_plan_host2(const adsc_plan_params* params, int32_t span_columns) {
  adsc::PlanParams p;
  const adsc_status st = to_cpp("adsc_plan_host2", params, span_columns, &p);
  return st != ADSC_OK ? st : to_c(adsc::plan_cpu(p));
}

adsc_status adsc_plan_device(const adsc_plan_params* params, adsc_stream_t stream) {
  adsc::PlanParams p;
  const adsc_status st = to_cpp("adsc_plan_device", params, 4, &p);
  return st != ADSC_OK ? st : to_c(adsc::plan_cuda(p, stream));
}

adsc_status adsc_plan_device2(const adsc_plan_params* params, int32_t span_columns,
                              adsc_stream_t stream) {
  adsc::PlanParams p;
  const adsc_status st = to_cpp("adsc_plan_device2", params, span_columns, &p);
  return st != ADSC_OK ? st : to_c(adsc::plan_cuda(p, stream));
}

adsc_status adsc_plan_check_summary(const int32_t* host_summary, const adsc_plan_params* params) {
  constexpr const char* kFn = "adsc_plan_check_summary";
  if (host_summary == nullptr) return null_argument(kFn, "host_summary");
  adsc_status st = to_c(adsc::detail::check_aligned(kFn, "host_summary", host_summary, 4));
  if (st != ADSC_OK) return st;
  adsc::PlanParams p;
  st = to_cpp(kFn, params, 4, &p);  // only scalar fields are read: the columns do not matter
  return st != ADSC_OK ? st : to_c(adsc::plan_summary_status(host_summary, p));
}

adsc_status adsc_compact_tokens_host(const adsc_compact_tokens_params* params) {
  const adsc_status st = check_struct("adsc_compact_tokens_host", "params", params);
  return st != ADSC_OK ? st : to_c(adsc::compact_tokens_cpu(to_cpp(*params)));
}

adsc_status adsc_compact_tokens_device(const adsc_compact_tokens_params* params, int32_t* error_flag,
                                adsc_stream_t stream) {
  const adsc_status st = check_struct("adsc_compact_tokens_device", "params", params);
  return st != ADSC_OK ? st : to_c(adsc::compact_tokens_cuda(to_cpp(*params), error_flag, stream));
}

adsc_status adsc_write_paged_kv_host(const adsc_paged_kv_params* params) {
  const adsc_status st = check_struct("adsc_write_paged_kv_host", "params", params);
  return st != ADSC_OK ? st : to_c(adsc::write_paged_kv_cpu(to_cpp(*params)));
}

adsc_status adsc_write_paged_kv_device(const adsc_paged_kv_params* params, int32_t* error_flag,
                                       adsc_stream_t stream) {
  const adsc_status st = check_struct("adsc_write_paged_kv_device", "params", params);
  return st != ADSC_OK ? st : to_c(adsc::write_paged_kv_cuda(to_cpp(*params), error_flag, stream));
}

}  // extern "C"
