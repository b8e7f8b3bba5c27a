// Host implementation of the plan: the phases of plan_impl.h as plain loops.
#include <algorithm>
#include <cstring>

#include "adsc/plan.h"
#include "plan_impl.h"

namespace adsc {
namespace {

void report(int32_t* summary, int32_t code, const int64_t* details, int n) {
  summary[0] = code;
  for (int i = 0; i < n; ++i) summary[1 + i] = detail::saturate_int32(details[i]);
}

// Phase 2 from runs of image tokens: walks each row's real tokens in position order (padding is
// skipped, it has no position). Returns false (summary filled) on a partial image.
bool depths_from_runs(const PlanParams& p, const detail::PlanWorkspace& ws) {
  const int64_t hw = static_cast<int64_t>(p.grid_h) * p.grid_w;
  for (int64_t b = 0; b < p.batch_size; ++b) {
    int64_t run = 0, run_pos = 0;  // length and first position of the current image run
    auto close_run = [&]() {
      if (run % hw == 0) return true;
      const int64_t d[3] = {b, run_pos, run};
      report(p.summary, kPlanPartialImage, d, 3);
      return false;
    };
    for (int64_t t = detail::row_begin(p, b); t < detail::row_end(p, b); ++t) {
      if (!detail::token_is_real(p, t)) {
        ws.depth[t] = -1;
      } else if (detail::is_image_token(p, t)) {
        if (run == 0) run_pos = ws.pos[t];
        ws.depth[t] = survived_steps(static_cast<int>(run % hw), p.grid_h, p.grid_w, p.factors,
                                     p.num_steps);
        ++run;
      } else {
        if (!close_run()) return false;
        run = 0;
        ws.depth[t] = p.num_steps;
      }
    }
    if (!close_run()) return false;
  }
  return true;
}

}  // namespace

Status plan_cpu(const PlanParams& p) noexcept {
  ADSC_RETURN_IF_ERROR(check_plan_params(p));
  const int64_t T = p.num_tokens, B = p.batch_size;
  const int S = p.num_steps;
  std::memset(p.summary, 0, sizeof(int32_t) * plan_summary_size(S));
  const detail::PlanWorkspace ws = detail::plan_workspace(p);

  // Phase 1: stage-0 ranks, offsets and positions.
  int32_t* cu0 = p.cu_seqlens_out;
  if (p.layout == Layout::kPacked) {
    for (int64_t b = 0; b < B; ++b) {
      const int32_t lo = p.cu_seqlens[b], hi = p.cu_seqlens[b + 1];
      if ((b == 0 && lo != 0) || lo > hi || (b + 1 == B && hi != T)) {
        const int64_t d[3] = {b, lo, hi};
        report(p.summary, kPlanBadCuSeqlens, d, 3);
        return plan_summary_status(p.summary, p);
      }
    }
    if (B == 0 && (p.cu_seqlens[0] != 0 || T != 0)) {
      const int64_t d[3] = {0, p.cu_seqlens[0], p.cu_seqlens[0]};
      report(p.summary, kPlanBadCuSeqlens, d, 3);
      return plan_summary_status(p.summary, p);
    }
    for (int64_t b = 0; b <= B; ++b) cu0[b] = p.cu_seqlens[b];
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = cu0[b]; t < cu0[b + 1]; ++t) {
        ws.rank[t] = static_cast<int32_t>(t);
        ws.pos[t] = static_cast<int32_t>(t - cu0[b]);
      }
  } else {
    int32_t count = 0;
    for (int64_t b = 0; b < B; ++b) {
      cu0[b] = count;
      for (int64_t t = b * p.padded_len; t < (b + 1) * p.padded_len; ++t) {
        ws.rank[t] = count;
        const bool real = detail::token_is_real(p, t);
        ws.pos[t] = real ? count - cu0[b] : -1;
        count += real;
      }
    }
    cu0[B] = count;
  }

  // Phase 2: depth of every token.
  if (p.input_ids != nullptr) {
    if (!depths_from_runs(p, ws)) return plan_summary_status(p.summary, p);
  } else {
    for (int64_t i = 0; i < p.num_spans; ++i) {
      int64_t d[7];
      const int32_t code = detail::check_span(p, i, cu0, d);
      if (code != kPlanOk) {
        report(p.summary, code, d, 7);
        return plan_summary_status(p.summary, p, p.spans);  // the spans are host memory here
      }
    }
    for (int64_t t = 0; t < T; ++t)
      ws.depth[t] = ws.pos[t] < 0 ? -1 : detail::span_depth(p, detail::row_of(p, t), ws.pos[t]);
  }

  // Phases 3 and 4: ranks, offsets, sizes of stages 1..S.
  int32_t max_lens[kMaxSteps + 1];
  for (int s = 0; s <= S; ++s) {
    int32_t* cu_s = p.cu_seqlens_out + s * (B + 1);
    if (s > 0) {
      int32_t count = 0;
      for (int64_t b = 0; b < B; ++b) {
        cu_s[b] = count;
        for (int64_t t = detail::row_begin(p, b); t < detail::row_end(p, b); ++t) {
          ws.rank[s * T + t] = count;
          count += ws.depth[t] >= s;
        }
      }
      cu_s[B] = count;
    }
    int32_t longest = 0;
    for (int64_t b = 0; b < B; ++b) longest = std::max(longest, cu_s[b + 1] - cu_s[b]);
    max_lens[s] = longest;
    p.summary[summary_tokens(s)] = cu_s[B];
    p.summary[summary_max_len(s)] = longest;
  }

  // Phase 5: the writes.
  for (int64_t t = 0; t < T; ++t)
    if (ws.depth[t] >= 0) detail::write_token(p, ws, t, max_lens);
  if (p.layout == Layout::kPadded)
    for (int s = 0; s <= S; ++s) {
      const int64_t width = detail::stage_width(p, s, max_lens[s]);
      for (int64_t j = 0; j < B * width; ++j) detail::write_padding_slot(p, s, j, width);
    }
  return Status::kOk;
}

}  // namespace adsc
