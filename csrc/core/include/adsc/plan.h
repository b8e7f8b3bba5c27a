// adsc/plan.h: sequence re-indexing for every stage of a schedule, in one call per batch.
//
// Stage 0 is the input layout; stage s >= 1 is the layout after schedule step s-1. For every stage
// the plan writes, for each slot of the stage's layout: the row of the previous stage's layout
// that fills it (`index`, the gather index for compaction), the row of the input layout
// (`source_index`) and the token's original position id; plus the stage's packed offsets
// (`cu_seqlens_out`) and, in `summary`, its token count and longest sequence.
//
// Packed layout (varlen): T tokens, sequences delimited by cu_seqlens [B+1]; every stage is packed.
// Padded layout: B rows of S slots and a mask; stage 0 is the input itself, stage s >= 1 is
// [B, W_s] with W_s the longest surviving row, padded on the left (pad_left) or the right. Padding
// slots hold index -1, source_index -1 and position id 1.
//
// Images are either runs of `image_token_id` in input_ids (each run k * grid_h * grid_w tokens long,
// k whole images in raster order), or explicit spans (sequence, start position, h, w[, newline])
// sorted by (sequence, start). A span with newline = 1 is an h x w grid whose rows each end with one
// newline token (LLaVA-NeXT / OneVision anyres): h * (w + 1) tokens, and a newline token is kept
// exactly while its row is (halving columns never removes it). Outputs have a capacity of T slots per stage; the stage's real size is in the
// summary. plan_cuda is one kernel launch; its summary stays on the device until the caller copies
// it back (the one host-device synchronisation of a batch) and passes it to plan_summary_status.
#pragma once

#include <cstdint>

#include "adsc/common.h"
#include "adsc/schedule.h"
#include "adsc/status.h"

namespace adsc {

enum class Layout : int32_t { kPacked = 0, kPadded = 1 };
enum class MaskType : int32_t { kUInt8 = 0, kInt32 = 1, kInt64 = 2 };  // kUInt8 also reads bool

// Most tokens, sequences and spans of one plan: indices and offsets are int32, and a rank plus a
// token index must stay below 2^31.
constexpr int64_t kPlanMaxTokens = (int64_t(1) << 30) - 1;

// Layout of the int32 summary: a header, then per stage its real tokens and longest sequence.
constexpr int kSummaryHeader = 8;  // [0] PlanError code, [1..7] its details
constexpr int plan_summary_size(int num_steps) { return kSummaryHeader + 2 * (num_steps + 1); }
constexpr int summary_tokens(int stage) { return kSummaryHeader + 2 * stage; }
constexpr int summary_max_len(int stage) { return kSummaryHeader + 2 * stage + 1; }

// Data errors found while planning (the summary's header). Details are int32: a value outside
// int32 (a span field can be any int64) is saturated to INT32_MIN / INT32_MAX.
enum PlanError : int32_t {
  kPlanOk = 0,
  kPlanBadCuSeqlens = 1,   // [b, cu[b], cu[b+1]]
  kPlanPartialImage = 2,   // [sequence, start position, run length]
  kPlanSpanOutOfRange = 3, // [span, sequence, start, h, w, sequence length, newline]
  kPlanSpanOrder = 4,      // [span, sequence, start, previous sequence, previous end]
  kPlanSpanGrid = 5,       // [span, h, w]
  kPlanSpanNewline = 6,    // [span, newline]: a newline flag other than 0 or 1
};

// Most rows (and columns) of a span's grid.
constexpr int64_t kPlanMaxSpanSide = int64_t(1) << 20;

struct PlanParams {
  Layout layout = Layout::kPacked;
  int64_t num_tokens = 0;  // T: packed tokens, or B * S padded slots
  int64_t batch_size = 0;  // B
  int64_t padded_len = 0;  // S (padded layout)

  const int32_t* cu_seqlens = nullptr;  // [B+1] (packed): sequence offsets
  const void* mask = nullptr;           // [B, S] (padded): nonzero = real token
  MaskType mask_type = MaskType::kUInt8;

  const int64_t* input_ids = nullptr;   // [T]: images are runs of image_token_id (or null: spans)
  int64_t image_token_id = -1;
  int32_t grid_h = 0, grid_w = 0;       // image grid of a run's images

  const int64_t* spans = nullptr;       // [num_spans, span_columns]: (sequence, start position, h, w)
  int64_t num_spans = 0;                //   and, with 5 columns, newline (0 or 1)
  int32_t span_columns = 4;             // 4 or 5

  int32_t num_steps = 0;                // schedule steps; stages = num_steps + 1
  int32_t factors[kMaxSteps] = {};
  bool pad_left = true;                 // padded layout: where stages >= 1 put their padding

  int32_t* workspace = nullptr;         // [plan_workspace_size(T, num_steps)]

  int32_t* index = nullptr;             // [num_steps+1, T]
  int32_t* source_index = nullptr;      // [num_steps+1, T]
  int64_t* position_ids = nullptr;      // [num_steps+1, T]
  int32_t* cu_seqlens_out = nullptr;    // [num_steps+1, B+1]
  int32_t* summary = nullptr;           // [plan_summary_size(num_steps)]
};

// int32 elements of workspace a plan of T tokens and num_steps steps needs (-1 when T is outside
// 0..kPlanMaxTokens or num_steps outside 0..kMaxSteps).
int64_t plan_workspace_size(int64_t num_tokens, int32_t num_steps) noexcept;

// Checks the arguments (pointers, sizes, schedule, grid) without touching the data.
Status check_plan_params(const PlanParams& params) noexcept;

// Host implementation: all pointers are host memory. Returns the data errors too.
Status plan_cpu(const PlanParams& params) noexcept;

// CUDA implementation: all pointers are device memory; one launch on `stream`, asynchronous.
// Data errors are reported in the summary: copy it to the host and call plan_summary_status.
Status plan_cuda(const PlanParams& params, adsc_stream_t stream) noexcept;

// Turns a summary (host memory) into a Status with a readable message. The span fields of a span
// error are printed from `host_spans` (a host copy of params.spans, [num_spans, span_columns])
// when given, exactly; without it from the summary's int32 details, where a saturated value reads
// ">= 2147483647" (or "<= -2147483648").
Status plan_summary_status(const int32_t* summary, const PlanParams& params,
                           const int64_t* host_spans) noexcept;
Status plan_summary_status(const int32_t* summary, const PlanParams& params) noexcept;

}  // namespace adsc
