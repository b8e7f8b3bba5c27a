// Host parts of the plan shared by both implementations: argument checks, the workspace size and
// the translation of the summary's data errors into messages.
#include <cstdint>
#include <cstdio>
#include <limits>

#include "adsc/plan.h"
#include "checks.h"

namespace adsc {

int64_t plan_workspace_size(int64_t num_tokens, int32_t num_steps) noexcept {
  if (num_tokens < 0 || num_tokens > kPlanMaxTokens || num_steps < 0 || num_steps > kMaxSteps)
    return -1;
  return num_tokens * (4 + static_cast<int64_t>(num_steps));  // pos, depth, real, rank per stage
}

Status check_plan_params(const PlanParams& p) noexcept {
  const int64_t T = p.num_tokens, B = p.batch_size;
  // Enum fields are compared as integers: a C caller may have stored any value in them.
  const int32_t layout = static_cast<int32_t>(p.layout), mask_type = static_cast<int32_t>(p.mask_type);
  if (layout != static_cast<int32_t>(Layout::kPacked) && layout != static_cast<int32_t>(Layout::kPadded))
    return fail(Status::kInvalidArgument, "plan: layout must be packed (0) or padded (1), got %d",
                layout);
  if (T < 0 || B < 0)
    return fail(Status::kInvalidArgument, "plan: num_tokens and batch_size must be >= 0, got %lld "
                "and %lld", static_cast<long long>(T), static_cast<long long>(B));
  if (T > kPlanMaxTokens)
    return fail(Status::kInvalidArgument, "plan: too many tokens: at most %lld tokens per batch, "
                "got %lld", static_cast<long long>(kPlanMaxTokens), static_cast<long long>(T));
  if (B > kPlanMaxTokens)
    return fail(Status::kInvalidArgument, "plan: batch_size must be at most %lld (sequence "
                "offsets are int32), got %lld", static_cast<long long>(kPlanMaxTokens),
                static_cast<long long>(B));
  if (p.layout == Layout::kPacked) {
    if (p.cu_seqlens == nullptr)
      return fail(Status::kInvalidArgument, "plan: the packed layout needs cu_seqlens [B+1]");
  } else {
    // B * S == T, tested without the product (which may overflow for a bad S).
    const int64_t S = p.padded_len;
    if (S < 0 || (B == 0 ? T != 0 : (S > T / B || B * S != T))) {
      char want[32] = "more than 2^63";
      if (S >= 0 && (B == 0 || S <= std::numeric_limits<int64_t>::max() / B))
        std::snprintf(want, sizeof(want), "%lld", static_cast<long long>(B * S));
      return fail(Status::kInvalidArgument, "plan: padded layout of %lld rows x %lld slots needs "
                  "num_tokens = %s, got %lld", static_cast<long long>(B),
                  static_cast<long long>(S), want, static_cast<long long>(T));
    }
    if (mask_type != static_cast<int32_t>(MaskType::kUInt8) &&
        mask_type != static_cast<int32_t>(MaskType::kInt32) &&
        mask_type != static_cast<int32_t>(MaskType::kInt64))
      return fail(Status::kInvalidArgument, "plan: unknown mask type %d: expected 0 (uint8/bool), "
                  "1 (int32) or 2 (int64)", mask_type);
    if (T > 0 && p.mask == nullptr)
      return fail(Status::kInvalidArgument, "plan: the padded layout needs a mask [B, S]");
  }
  if (p.num_steps < 0 || p.num_steps > kMaxSteps)
    return fail(Status::kInvalidArgument, "plan: a schedule has 0..%d steps, got %d", kMaxSteps,
                p.num_steps);
  for (int s = 0; s < p.num_steps; ++s)
    if (p.factors[s] != 2 && p.factors[s] != 4)
      return fail(Status::kInvalidArgument, "plan: step %d has factor %d; factors are 2 or 4", s,
                  p.factors[s]);
  if (p.input_ids != nullptr && p.spans != nullptr)
    return fail(Status::kInvalidArgument,
                "plan: give either input_ids (images are runs of image_token_id) or spans, not both");
  if (p.num_spans < 0 || p.num_spans > kPlanMaxTokens || (p.num_spans > 0 && p.spans == nullptr))
    return fail(Status::kInvalidArgument, "plan: num_spans=%lld needs 0 <= num_spans <= %lld and "
                "a spans pointer", static_cast<long long>(p.num_spans),
                static_cast<long long>(kPlanMaxTokens));
  if (p.span_columns != 4 && p.span_columns != 5)
    return fail(Status::kInvalidArgument, "plan: spans have 4 columns (sequence, start, h, w) or 5 "
                "(and newline), got span_columns=%d", p.span_columns);
  if (p.input_ids != nullptr) {
    if (p.grid_h < 1 || p.grid_w < 1 || static_cast<int64_t>(p.grid_h) * p.grid_w > (1 << 30))
      return fail(Status::kInvalidArgument, "plan: image grid must have positive sides and at most "
                  "2^30 tokens, got %dx%d", p.grid_h, p.grid_w);
    if (!grid_fits(p.grid_h, p.grid_w, p.factors, p.num_steps))
      return fail(Status::kInvalidArgument, "plan: the schedule cannot downsample a %dx%d image "
                  "grid: it would halve a side of length 1", p.grid_h, p.grid_w);
  }
  if (T > 0 && (p.workspace == nullptr || p.index == nullptr || p.source_index == nullptr ||
                p.position_ids == nullptr))
    return fail(Status::kInvalidArgument,
                "plan: workspace, index, source_index and position_ids must not be null");
  if (p.cu_seqlens_out == nullptr || p.summary == nullptr)
    return fail(Status::kInvalidArgument, "plan: cu_seqlens_out and summary must not be null");
  // Every buffer at the size the call declares; outputs and scratch must not share bytes with
  // anything else (a plan reading what it writes would return a wrong plan).
  const int64_t stages = p.num_steps + 1;
  const int64_t mask_bytes = p.mask_type == MaskType::kInt64 ? 8 : p.mask_type == MaskType::kInt32 ? 4 : 1;
  const bool packed = p.layout == Layout::kPacked;
  constexpr bool kWritten = detail::BufferSet::kWritten;
  return detail::BufferSet("plan")
      .array("cu_seqlens", packed ? p.cu_seqlens : nullptr, B + 1, 4)
      .array("mask", packed ? nullptr : p.mask, T, mask_bytes)
      .array("input_ids", p.input_ids, T, 8)
      .array("spans", p.spans, p.num_spans * p.span_columns, 8)
      .array("workspace", p.workspace, plan_workspace_size(T, p.num_steps), 4, kWritten)
      .array("index", p.index, stages * T, 4, kWritten)
      .array("source_index", p.source_index, stages * T, 4, kWritten)
      .array("position_ids", p.position_ids, stages * T, 8, kWritten)
      .array("cu_seqlens_out", p.cu_seqlens_out, stages * (B + 1), 4, kWritten)
      .array("summary", p.summary, plan_summary_size(p.num_steps), 4, kWritten)
      .check();
}

namespace {

// A detail of a span error for a message: exact when it comes from the spans themselves, else
// from the summary, where INT32_MAX / INT32_MIN stand for any value beyond them.
struct Detail {
  char text[32];
};
Detail detail_text(int64_t v, bool saturated) {
  Detail d;
  if (saturated && v >= INT32_MAX) std::snprintf(d.text, sizeof(d.text), ">= %d", INT32_MAX);
  else if (saturated && v <= INT32_MIN) std::snprintf(d.text, sizeof(d.text), "<= %d", INT32_MIN);
  else std::snprintf(d.text, sizeof(d.text), "%lld", static_cast<long long>(v));
  return d;
}

}  // namespace

Status plan_summary_status(const int32_t* summary, const PlanParams& p) noexcept {
  return plan_summary_status(summary, p, nullptr);
}

Status plan_summary_status(const int32_t* summary, const PlanParams& p,
                           const int64_t* host_spans) noexcept {
  const int32_t* d = summary + 1;
  // The span of a span error, exactly, when the caller has the spans on the host.
  const bool exact = host_spans != nullptr && d[0] >= 0 && d[0] < p.num_spans &&
                     (p.span_columns == 4 || p.span_columns == 5);
  const int64_t* span = exact ? host_spans + static_cast<int64_t>(p.span_columns) * d[0] : nullptr;
  auto field = [&](int column, int32_t from_summary) {
    if (span == nullptr) return detail_text(from_summary, true);
    return detail_text(column < p.span_columns ? span[column] : 0, false);
  };
  switch (summary[0]) {
    case kPlanOk:
      return Status::kOk;
    case kPlanBadCuSeqlens:
      return fail(Status::kInvalidInput, "cu_seqlens must start at 0, never decrease and end at "
                  "the number of tokens (%lld); got cu_seqlens[%d]=%d, cu_seqlens[%lld]=%d",
                  static_cast<long long>(p.num_tokens), d[0], d[1],
                  static_cast<long long>(d[0]) + 1, d[2]);
    case kPlanPartialImage:
      return fail(Status::kInvalidInput, "sequence %d: a run of %d image tokens (id %lld) at "
                  "position %d is not a whole number of %dx%d images (%lld tokens each)", d[0],
                  d[2], static_cast<long long>(p.image_token_id), d[1], p.grid_h, p.grid_w,
                  static_cast<long long>(p.grid_h) * p.grid_w);
    case kPlanSpanOutOfRange: {
      const bool newline = d[6] == 1;
      return fail(Status::kInvalidInput, "image span %d (sequence %s, start %s, %sx%s%s) does "
                  "not fit: expected 0 <= sequence < %lld, start >= 0, sides >= 1 (at most %lld) "
                  "and start + %s <= the sequence's length (%d)", d[0], field(0, d[1]).text,
                  field(1, d[2]).text, field(2, d[3]).text, field(3, d[4]).text,
                  newline ? " with a newline token per row" : "",
                  static_cast<long long>(p.batch_size), static_cast<long long>(kPlanMaxSpanSide),
                  newline ? "h*(w+1)" : "h*w", d[5]);
    }
    case kPlanSpanOrder:
      return fail(Status::kInvalidInput, "image spans must be sorted by (sequence, start) and "
                  "must not overlap: span %d starts at (sequence %d, position %d), before the end "
                  "of the previous span (sequence %d, position %d)", d[0], d[1], d[2], d[3], d[4]);
    case kPlanSpanGrid:
      return fail(Status::kInvalidInput, "image span %d has a %dx%d grid that the schedule cannot "
                  "downsample: it would halve a side of length 1", d[0], d[1], d[2]);
    case kPlanSpanNewline:
      return fail(Status::kInvalidInput, "image span %d has newline = %s: expected 0 (an h x w "
                  "grid) or 1 (each of its h rows ends with a newline token)", d[0],
                  field(4, d[1]).text);
    default:
      return fail(Status::kInvalidInput, "plan: unknown error code %d", summary[0]);
  }
}

}  // namespace adsc
