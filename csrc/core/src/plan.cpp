// Host parts of the plan shared by both implementations: argument checks, the workspace size and
// the translation of the summary's data errors into messages.
#include <cstdint>
#include <limits>

#include "adsc/plan.h"

namespace adsc {

int64_t plan_workspace_size(int64_t num_tokens, int32_t num_steps) noexcept {
  return num_tokens * (4 + static_cast<int64_t>(num_steps));  // pos, depth, real, rank per stage
}

Status check_plan_params(const PlanParams& p) noexcept {
  const int64_t T = p.num_tokens, B = p.batch_size;
  if (p.layout != Layout::kPacked && p.layout != Layout::kPadded)
    return fail(Status::kInvalidArgument, "plan: layout must be packed (0) or padded (1), got %d",
                static_cast<int>(p.layout));
  if (T < 0 || B < 0)
    return fail(Status::kInvalidArgument, "plan: num_tokens and batch_size must be >= 0, got %lld "
                "and %lld", static_cast<long long>(T), static_cast<long long>(B));
  if (T > std::numeric_limits<int32_t>::max() / 2)
    return fail(Status::kInvalidArgument, "plan: at most %d tokens per batch, got %lld",
                std::numeric_limits<int32_t>::max() / 2, static_cast<long long>(T));
  if (p.layout == Layout::kPacked) {
    if (p.cu_seqlens == nullptr)
      return fail(Status::kInvalidArgument, "plan: the packed layout needs cu_seqlens [B+1]");
  } else {
    if (p.padded_len < 0 || T != B * p.padded_len)
      return fail(Status::kInvalidArgument, "plan: padded layout of %lld rows x %lld slots needs "
                  "num_tokens = %lld, got %lld", static_cast<long long>(B),
                  static_cast<long long>(p.padded_len), static_cast<long long>(B * p.padded_len),
                  static_cast<long long>(T));
    if (T > 0 && p.mask == nullptr)
      return fail(Status::kInvalidArgument, "plan: the padded layout needs a mask [B, S]");
    if (p.mask_type != MaskType::kUInt8 && p.mask_type != MaskType::kInt32 &&
        p.mask_type != MaskType::kInt64)
      return fail(Status::kInvalidArgument, "plan: unknown mask type %d",
                  static_cast<int>(p.mask_type));
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
  if (p.num_spans < 0 || (p.num_spans > 0 && p.spans == nullptr))
    return fail(Status::kInvalidArgument, "plan: num_spans=%lld needs a spans pointer",
                static_cast<long long>(p.num_spans));
  if (p.input_ids != nullptr) {
    if (p.grid_h < 1 || p.grid_w < 1 || static_cast<int64_t>(p.grid_h) * p.grid_w > (1 << 30))
      return fail(Status::kInvalidArgument, "plan: image grid must have positive sides, got %dx%d",
                  p.grid_h, p.grid_w);
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
  return Status::kOk;
}

Status plan_summary_status(const int32_t* summary, const PlanParams& p) noexcept {
  const int32_t* d = summary + 1;
  switch (summary[0]) {
    case kPlanOk:
      return Status::kOk;
    case kPlanBadCuSeqlens:
      return fail(Status::kInvalidInput, "cu_seqlens must start at 0, never decrease and end at "
                  "the number of tokens (%lld); got cu_seqlens[%d]=%d, cu_seqlens[%d]=%d",
                  static_cast<long long>(p.num_tokens), d[0], d[1], d[0] + 1, d[2]);
    case kPlanPartialImage:
      return fail(Status::kInvalidInput, "sequence %d: a run of %d image tokens (id %lld) at "
                  "position %d is not a whole number of %dx%d images (%d tokens each)", d[0],
                  d[2], static_cast<long long>(p.image_token_id), d[1], p.grid_h, p.grid_w,
                  p.grid_h * p.grid_w);
    case kPlanSpanOutOfRange:
      return fail(Status::kInvalidInput, "image span %d (sequence %d, start %d, %dx%d) does not "
                  "fit: expected 0 <= sequence < %lld, start >= 0, sides >= 1 and start + h*w <= "
                  "the sequence's length (%d)", d[0], d[1], d[2], d[3], d[4],
                  static_cast<long long>(p.batch_size), d[5]);
    case kPlanSpanOrder:
      return fail(Status::kInvalidInput, "image spans must be sorted by (sequence, start) and "
                  "must not overlap: span %d starts at (sequence %d, position %d), before the end "
                  "of the previous span (sequence %d, position %d)", d[0], d[1], d[2], d[3], d[4]);
    case kPlanSpanGrid:
      return fail(Status::kInvalidInput, "image span %d has a %dx%d grid that the schedule cannot "
                  "downsample: it would halve a side of length 1", d[0], d[1], d[2]);
    default:
      return fail(Status::kInvalidInput, "plan: unknown error code %d", summary[0]);
  }
}

}  // namespace adsc
