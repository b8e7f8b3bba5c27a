// Per-token pieces of the plan shared by plan_cpu.cpp and plan_cuda.cu (internal header).
//
// Both implementations run the same phases:
//   1. stage-0 ranks (packed: the token itself; padded: exclusive count of real tokens), stage-0
//      offsets and every token's position id;
//   2. every token's depth: how many schedule steps it survives (-1: padding; text: all of them),
//      from runs of image_token_id or from explicit spans. Runs are runs of consecutive
//      *positions*: padding has no position, so it neither starts, ends nor splits a run;
//   3. per stage s >= 1, each token's exclusive rank among the tokens alive at s;
//   4. stage offsets and longest sequences;
//   5. the writes: for each stage a token is alive in, its slot, its previous slot and position.
#pragma once

#include <cstdint>

#include "adsc/plan.h"

namespace adsc {
namespace detail {

struct PlanWorkspace {
  int32_t* pos;    // [T] position id within the sequence (-1: padding)
  int32_t* depth;  // [T] steps survived (-1: padding)
  int32_t* real;   // [T] input row of the i-th real token (stage-0 packed order)
  int32_t* rank;   // [(num_steps+1) * T] exclusive rank among the tokens alive at each stage
};

ADSC_HD PlanWorkspace plan_workspace(const PlanParams& p) {
  const int64_t T = p.num_tokens;
  return PlanWorkspace{p.workspace, p.workspace + T, p.workspace + 2 * T, p.workspace + 3 * T};
}

// The last b with offsets[b] <= i (skipping empty sequences): the sequence of packed row i.
ADSC_HD int64_t row_of_offsets(const int32_t* offsets, int64_t batch_size, int64_t i) {
  int64_t lo = 0, hi = batch_size;  // invariant: offsets[lo] <= i < offsets[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= i) lo = mid; else hi = mid;
  }
  return lo;
}

ADSC_HD bool token_is_real(const PlanParams& p, int64_t t) {
  if (p.layout == Layout::kPacked) return true;
  switch (p.mask_type) {
    case MaskType::kUInt8: return static_cast<const uint8_t*>(p.mask)[t] != 0;
    case MaskType::kInt32: return static_cast<const int32_t*>(p.mask)[t] != 0;
    default: return static_cast<const int64_t*>(p.mask)[t] != 0;
  }
}

// The sequence (row) of input token t.
ADSC_HD int64_t row_of(const PlanParams& p, int64_t t) {
  if (p.layout == Layout::kPadded) return t / p.padded_len;
  return row_of_offsets(p.cu_seqlens, p.batch_size, t);
}

// First and one-past-last input row of sequence b.
ADSC_HD int64_t row_begin(const PlanParams& p, int64_t b) {
  return p.layout == Layout::kPacked ? p.cu_seqlens[b] : b * p.padded_len;
}
ADSC_HD int64_t row_end(const PlanParams& p, int64_t b) {
  return p.layout == Layout::kPacked ? p.cu_seqlens[b + 1] : (b + 1) * p.padded_len;
}

ADSC_HD bool is_image_token(const PlanParams& p, int64_t t) {
  return token_is_real(p, t) && p.input_ids[t] == p.image_token_id;
}

// Span i's row of p.spans: (sequence, start, h, w[, newline]).
ADSC_HD const int64_t* span_at(const PlanParams& p, int64_t i) { return p.spans + p.span_columns * i; }
// Its newline flag: 1 when every grid row ends with a newline token (0 with 4 columns).
ADSC_HD int64_t span_newline(const PlanParams& p, const int64_t* s) {
  return p.span_columns == 5 ? s[4] : 0;
}

// A detail of the summary, which is int32: values outside int32 saturate.
ADSC_HD int32_t saturate_int32(int64_t v) {
  return v > INT32_MAX ? INT32_MAX : v < INT32_MIN ? INT32_MIN : static_cast<int32_t>(v);
}

// Depth of a real token at position `pos` of sequence b when images come from spans: binary search
// for the last span starting at or before (b, pos). A span's grid row is w tokens, plus the row's
// newline token when the span has one.
ADSC_HD int32_t span_depth(const PlanParams& p, int64_t b, int64_t pos) {
  int64_t lo = -1, hi = p.num_spans;  // spans[lo] <= (b, pos) < spans[hi]
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    const int64_t* s = span_at(p, mid);
    if (s[0] < b || (s[0] == b && s[1] <= pos)) lo = mid; else hi = mid;
  }
  if (lo >= 0) {
    const int64_t* s = span_at(p, lo);
    const int64_t h = s[2], w = s[3], row_len = w + span_newline(p, s);
    if (s[0] == b && pos < s[1] + h * row_len) {
      const int64_t r = pos - s[1];
      return survived_steps_at(static_cast<int>(r / row_len), static_cast<int>(r % row_len),
                               static_cast<int>(h), static_cast<int>(w), p.factors, p.num_steps);
    }
  }
  return p.num_steps;
}

// Checks span i against its sequence and its predecessor; returns a PlanError and its details
// (d[7], exact int64 values; the summary keeps them saturated to int32).
ADSC_HD int32_t check_span(const PlanParams& p, int64_t i, const int32_t* cu0, int64_t* d) {
  const int64_t* s = span_at(p, i);
  const int64_t b = s[0], start = s[1], h = s[2], w = s[3], nl = span_newline(p, s);
  const int64_t len = (b >= 0 && b < p.batch_size) ? cu0[b + 1] - cu0[b] : -1;
  d[0] = i; d[1] = b; d[2] = start; d[3] = h; d[4] = w; d[5] = len; d[6] = nl;
  if (nl != 0 && nl != 1) {
    d[1] = nl;
    return kPlanSpanNewline;
  }
  // Ordered so that nothing overflows, whatever the values: start <= len bounds the subtraction
  // and sides <= 2^20 the product.
  if (len < 0 || start < 0 || start > len || h < 1 || w < 1 || h > kPlanMaxSpanSide ||
      w > kPlanMaxSpanSide || h * (w + nl) > len - start)
    return kPlanSpanOutOfRange;
  if (i > 0) {
    const int64_t* q = span_at(p, i - 1);
    const int64_t q_nl = span_newline(p, q);
    // An insane predecessor reports its own error first (it has the lower index).
    const bool q_sane = q[1] >= 0 && q[1] <= (int64_t(1) << 40) && q[2] >= 1 &&
                        q[2] <= kPlanMaxSpanSide && q[3] >= 1 && q[3] <= kPlanMaxSpanSide &&
                        (q_nl == 0 || q_nl == 1);
    const int64_t prev_end = q_sane ? q[1] + q[2] * (q[3] + q_nl) : 0;
    if (q[0] > b || (q_sane && q[0] == b && prev_end > start)) {
      d[3] = q[0]; d[4] = prev_end;
      return kPlanSpanOrder;
    }
  }
  if (!grid_fits(static_cast<int>(h), static_cast<int>(w), p.factors, p.num_steps)) {
    d[1] = h; d[2] = w;
    return kPlanSpanGrid;
  }
  return kPlanOk;
}

// Width of stage s: padded stage 0 is the input; later padded stages are as wide as their
// longest sequence.
ADSC_HD int64_t stage_width(const PlanParams& p, int s, int32_t max_len) {
  return s == 0 ? p.padded_len : max_len;
}

// The slot of real token t (sequence b) in stage s's layout.
ADSC_HD int64_t stage_slot(const PlanParams& p, const PlanWorkspace& ws, int s, int64_t t,
                           int64_t b, const int32_t* cu_s, int64_t width) {
  const int32_t rank = ws.rank[s * p.num_tokens + t];
  if (p.layout == Layout::kPacked) return rank;
  if (s == 0) return t;
  const int32_t len = cu_s[b + 1] - cu_s[b];
  return b * width + (p.pad_left ? width - len : 0) + (rank - cu_s[b]);
}

// Writes the slots of real token t for stages 0..depth.
ADSC_HD void write_token(const PlanParams& p, const PlanWorkspace& ws, int64_t t,
                         const int32_t* max_lens) {
  const int32_t depth = ws.depth[t];
  const int64_t T = p.num_tokens, B = p.batch_size;
  const int64_t b = row_of(p, t);
  int64_t prev = t;
  for (int s = 0; s <= depth; ++s) {
    const int32_t* cu_s = p.cu_seqlens_out + s * (B + 1);
    const int64_t slot = stage_slot(p, ws, s, t, b, cu_s, stage_width(p, s, max_lens[s]));
    p.index[s * T + slot] = static_cast<int32_t>(s == 0 ? t : prev);
    p.source_index[s * T + slot] = static_cast<int32_t>(t);
    p.position_ids[s * T + slot] = ws.pos[t];
    prev = slot;
  }
}

// Padded layout: marks slot j of stage s as padding when it is one.
ADSC_HD void write_padding_slot(const PlanParams& p, int s, int64_t j, int64_t width) {
  const int64_t T = p.num_tokens;
  bool pad;
  if (s == 0) {
    pad = !token_is_real(p, j);
  } else {
    const int32_t* cu_s = p.cu_seqlens_out + s * (p.batch_size + 1);
    const int64_t b = j / width, c = j % width;
    const int64_t len = cu_s[b + 1] - cu_s[b];
    pad = p.pad_left ? c < width - len : c >= len;
  }
  if (pad) {
    p.index[s * T + j] = -1;
    p.source_index[s * T + j] = -1;
    p.position_ids[s * T + j] = 1;
  }
}

}  // namespace detail
}  // namespace adsc
