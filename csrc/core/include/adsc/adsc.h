/* adsc/adsc.h: the C ABI of the adsc core, for inference services without Python or PyTorch.
 *
 * ADSC (Attention-Driven Self-Compression) downsamples each image's vision tokens before chosen
 * decoder layers. This library provides the data movement around the attention calls:
 *   - schedules: parse, format, validate against a model (adsc_schedule_*);
 *   - the plan: re-indexing of a batch for every stage of a schedule (adsc_plan_*);
 *   - compaction: gather of token rows by a stage index (adsc_compact_tokens_*);
 *   - paged KV writes: new K/V rows into a paged cache at slot indices (adsc_write_paged_kv_*).
 *
 * Conventions
 *   - Every call returns an adsc_status; on failure adsc_last_error() gives a message (per thread,
 *     valid until the thread's next failing call) saying what was expected and what was given.
 *     No call aborts or throws, whatever the input.
 *   - All buffers are owned by the caller, who allocates them; no call allocates or frees memory.
 *     *_host functions take host pointers; *_device functions take device pointers, enqueue their
 *     work on `stream` (NULL: the default stream) and return without waiting.
 *   - Shapes are written beside each pointer, row-major: [T, ...] means T rows.
 *   - Every typed pointer must be aligned to its type (int32_t: 4 bytes, int64_t: 8, a mask to its
 *     mask_type, a struct such as adsc_plan_params to its alignment); a misaligned one is an
 *     ADSC_INVALID_ARGUMENT. Rows of bytes (the rows compaction and paged KV writes copy) need no
 *     alignment.
 *   - Sizes and strides are checked before any arithmetic with them: a size or extent (rows - 1) *
 *     stride + row size that overflows int64 or the address space is an ADSC_INVALID_ARGUMENT.
 *   - Enum-valued fields are int32_t holding the enum's value, checked before use.
 *   - A buffer a call writes must not share a byte with any other buffer of the call, read or
 *     written (byte ranges [base, base + extent), extents as the call's sizes declare them, e.g.
 *     [num_steps + 1, T] for a plan's index); an overlap is an ADSC_INVALID_ARGUMENT that names
 *     both buffers, reported before anything is read or written. The device calls' error_flag is
 *     one of their buffers. Buffers a call only reads may share bytes. Input structs passed by
 *     pointer (params, schedule) are copied on entry and may be anywhere.
 *   - *_device functions return ADSC_NOT_COMPILED in a build without CUDA (adsc_cuda_compiled()).
 *     Their `error_flag` (nullable) is a device pointer to an int32 the caller zeroes beforehand;
 *     a kernel sets it to 1 on a bad index or slot and never resets it.
 */
#ifndef ADSC_ADSC_H_
#define ADSC_ADSC_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define ADSC_API __attribute__((visibility("default")))
#else
#define ADSC_API
#endif

#ifndef ADSC_STREAM_T_DEFINED
#define ADSC_STREAM_T_DEFINED
/* The same type as cudaStream_t, so a cudaStream_t can be passed without a cast. */
typedef struct CUstream_st* adsc_stream_t;
#endif

#define ADSC_MAX_STEPS 16

typedef enum adsc_status {
  ADSC_OK = 0,
  ADSC_INVALID_ARGUMENT = 1,   /* a null pointer, a bad size, schedule or option */
  ADSC_INVALID_INPUT = 2,      /* bad data: a partial image, overlapping spans, bad cu_seqlens */
  ADSC_INDEX_OUT_OF_RANGE = 3, /* a gather index or a KV slot out of range */
  ADSC_CUDA_ERROR = 4,         /* the CUDA runtime reported an error */
  ADSC_NOT_COMPILED = 5        /* a *_device call in a build without CUDA */
} adsc_status;

/* "MAJOR.MINOR.PATCH" of the library. */
ADSC_API const char* adsc_version(void);
/* The message of this thread's last failing call ("" if none). */
ADSC_API const char* adsc_last_error(void);
/* A short name of a status ("ok", "invalid argument", ...; "unknown status" for other values). */
ADSC_API const char* adsc_status_name(int32_t status);
/* 1 if the CUDA kernels were compiled into this library, else 0. */
ADSC_API int adsc_cuda_compiled(void);

/* ---- Schedules ------------------------------------------------------------------------------ */

/* "layer:factor,...": before decoder layer `layer` (1 <= layer, strictly increasing) the vision
 * tokens of every image are downsampled by `factor` (2: halve the longer side of the grid, the
 * width on a tie; 4: halve both sides). */
typedef struct adsc_schedule {
  int32_t num_steps;                /* 0 .. ADSC_MAX_STEPS; 0 = the unmodified model */
  int32_t layers[ADSC_MAX_STEPS];   /* [num_steps] */
  int32_t factors[ADSC_MAX_STEPS];  /* [num_steps], each 2 or 4 */
} adsc_schedule;

/* Parses `text` (NUL-terminated; "" is the empty schedule) into *out. */
ADSC_API adsc_status adsc_schedule_parse(const char* text, adsc_schedule* out);
/* Writes the canonical text of *schedule into buffer[size] (NUL-terminated). A schedule filled by
 * hand is checked first: layers >= 1 and strictly increasing, factors 2 or 4. */
ADSC_API adsc_status adsc_schedule_format(const adsc_schedule* schedule, char* buffer, size_t size);
/* Checks *schedule against a model of num_layers decoder layers and a grid_h x grid_w image grid.
 * grids_h / grids_w (nullable, [num_steps + 1] each, not overlapping) receive the grid of every
 * stage. An image whose grid rows each end with a newline token (spans with newline = 1) keeps
 * grids_h[s] * (grids_w[s] + 1) tokens at stage s. */
ADSC_API adsc_status adsc_schedule_validate(const adsc_schedule* schedule, int32_t num_layers,
                                            int32_t grid_h, int32_t grid_w, int32_t* grids_h,
                                            int32_t* grids_w);

/* ---- The plan (sequence re-indexing for every stage) --------------------------------------- */

typedef enum adsc_layout {
  ADSC_LAYOUT_PACKED = 0, /* T tokens, sequences delimited by cu_seqlens [B+1] */
  ADSC_LAYOUT_PADDED = 1  /* B rows of S slots and a mask; T = B * S */
} adsc_layout;

typedef enum adsc_mask_type { ADSC_MASK_UINT8 = 0, ADSC_MASK_INT32 = 1, ADSC_MASK_INT64 = 2 } adsc_mask_type;

/* Stage 0 is the input layout; stage s >= 1 follows schedule step s-1. For each stage s and each
 * slot j of its layout the plan writes index[s*T + j] (the row of stage s-1's layout that fills
 * the slot: the gather index for compaction), source_index[s*T + j] (the row of the input) and
 * position_ids[s*T + j] (the token's original position id; RoPE is not re-indexed). Packed stages
 * are packed (slots 0 .. tokens(s)-1); padded stage s >= 1 is [B, max_len(s)], padded on the left
 * when pad_left, and padded stage 0 is the input layout. Padding slots hold -1, -1 and 1; slots
 * past a stage's layout (up to T) are not written. cu_seqlens_out[s*(B+1) + b] are the packed
 * offsets of stage s. summary[] receives each stage's token count and longest sequence
 * (adsc_plan_stage_tokens / adsc_plan_stage_max_len) and the data error found, if any (see
 * adsc_plan_error). Images are runs of image_token_id in input_ids, each run a whole number of
 * grid_h x grid_w images in raster order, or, when input_ids is NULL, the spans. Padding has no
 * position: it neither splits nor ends a run. The plan uses the schedule's factors only: check its
 * layers against the model with adsc_schedule_validate.
 *
 * Spans with a newline column (adsc_plan_host2 / adsc_plan_device2 with span_columns = 5): rows
 * (sequence, start, h, w, newline). newline = 1 is a LLaVA-NeXT / OneVision anyres grid: h rows of
 * w grid tokens, each row followed by one newline token, h * (w + 1) consecutive positions. The
 * grid is downsampled as an h x w grid (the newline column is not a column of it), and a row's
 * newline token is kept exactly while its row is. newline = 0 is a plain h x w span. */
typedef struct adsc_plan_params {
  int32_t layout;                /* an adsc_layout */
  int64_t num_tokens;            /* T: 0 .. ADSC_PLAN_MAX_TOKENS */
  int64_t batch_size;            /* B: 0 .. ADSC_PLAN_MAX_TOKENS */
  int64_t padded_len;            /* S (padded layout) */
  const int32_t* cu_seqlens;     /* [B+1] (packed): 0 = cu[0] <= cu[1] <= ... <= cu[B] = T */
  const void* mask;              /* [B, S] (padded): nonzero = real token, of mask_type */
  int32_t mask_type;             /* an adsc_mask_type */
  const int64_t* input_ids;      /* [T] or NULL (then spans give the images) */
  int64_t image_token_id;
  int32_t grid_h, grid_w;        /* the grid of every image found in input_ids */
  const int64_t* spans;          /* [num_spans, 4]: (sequence, start position, h, w), sorted by
                                    (sequence, start), not overlapping; used when input_ids is NULL
                                    ([num_spans, 5] with a newline column: adsc_plan_host2) */
  int64_t num_spans;             /* 0 .. ADSC_PLAN_MAX_TOKENS */
  const adsc_schedule* schedule; /* its factors drive the plan */
  int32_t pad_left;              /* padded layout: 1 = stages >= 1 are left-padded, 0 = right */
  int32_t* workspace;            /* [adsc_plan_workspace_size(T, num_steps)] scratch */
  int32_t* index;                /* [num_steps + 1, T] out */
  int32_t* source_index;         /* [num_steps + 1, T] out */
  int64_t* position_ids;         /* [num_steps + 1, T] out */
  int32_t* cu_seqlens_out;       /* [num_steps + 1, B + 1] out */
  int32_t* summary;              /* [adsc_plan_summary_size(num_steps)] out */
} adsc_plan_params;

/* The data error of a plan: summary[ADSC_PLAN_SUMMARY_ERROR] holds one of these and the next
 * entries its details (sequence indices are those of the batch given), so a service can reject
 * just the request at fault. Details are int32: a span field outside int32 is saturated to
 * INT32_MIN / INT32_MAX (adsc_plan_host's message prints the exact value). */
#define ADSC_PLAN_SUMMARY_ERROR 0
typedef enum adsc_plan_error {
  ADSC_PLAN_OK = 0,
  ADSC_PLAN_BAD_CU_SEQLENS = 1,     /* details: b, cu_seqlens[b], cu_seqlens[b+1] */
  ADSC_PLAN_PARTIAL_IMAGE = 2,      /* details: sequence, first position of the run, run length */
  ADSC_PLAN_SPAN_OUT_OF_RANGE = 3,  /* details: span, sequence, start, h, w, sequence length,
                                       newline (0 or 1) */
  ADSC_PLAN_SPAN_ORDER = 4,         /* details: span, sequence, start, previous sequence, previous end */
  ADSC_PLAN_SPAN_GRID = 5,          /* details: span, h, w */
  ADSC_PLAN_SPAN_NEWLINE = 6        /* details: span, newline (a value other than 0 or 1) */
} adsc_plan_error;

/* Most tokens (and sequences, and spans) of one plan: token and row indices are int32. */
#define ADSC_PLAN_MAX_TOKENS 1073741823
/* Entries of the summary before the per-stage (tokens, longest sequence) pairs. */
#define ADSC_PLAN_SUMMARY_HEADER 8

/* Elements (int32) of workspace a plan of num_tokens tokens and num_steps steps needs; -1 when
 * num_tokens is outside 0..ADSC_PLAN_MAX_TOKENS or num_steps outside 0..ADSC_MAX_STEPS. */
ADSC_API int64_t adsc_plan_workspace_size(int64_t num_tokens, int32_t num_steps);
/* Elements (int32) of a plan's summary; -1 when num_steps is outside 0..ADSC_MAX_STEPS. */
ADSC_API int32_t adsc_plan_summary_size(int32_t num_steps);
/* Real tokens and longest sequence of stage `stage` (0 .. num_steps), read from a host copy of the
 * summary of a plan of num_steps steps; -1 for a NULL summary or a stage out of range. */
ADSC_API int32_t adsc_plan_stage_tokens(const int32_t* summary, int32_t num_steps, int32_t stage);
ADSC_API int32_t adsc_plan_stage_max_len(const int32_t* summary, int32_t num_steps, int32_t stage);
/* Host plan: every pointer is host memory. Also reports data errors. */
ADSC_API adsc_status adsc_plan_host(const adsc_plan_params* params);
/* Device plan: every buffer pointer is device memory (params itself is host memory); one kernel
 * launch on `stream`. Copy summary to the host once it is done, then call adsc_plan_check_summary
 * for the data errors. */
ADSC_API adsc_status adsc_plan_device(const adsc_plan_params* params, adsc_stream_t stream);
/* The same with spans of span_columns columns: 4 (what adsc_plan_host / adsc_plan_device read) or
 * 5, (sequence, start, h, w, newline). New entry points beside the two above, which keep their
 * signature and struct: callers built against an earlier adsc.h work unchanged (source and
 * binary). */
ADSC_API adsc_status adsc_plan_host2(const adsc_plan_params* params, int32_t span_columns);
ADSC_API adsc_status adsc_plan_device2(const adsc_plan_params* params, int32_t span_columns,
                                       adsc_stream_t stream);
/* Turns a host copy of a summary into a status (and a message for adsc_last_error). Only the
 * scalar fields of params are read (the buffers may be device pointers). */
ADSC_API adsc_status adsc_plan_check_summary(const int32_t* host_summary,
                                             const adsc_plan_params* params);

/* ---- Compaction ------------------------------------------------------------------------------ */

/* dst[i] = src[index[i]] (rows of row_bytes contiguous bytes); a zero row where index[i] == -1.
 * src and dst must not overlap. When row_bytes is 0, src and dst may be NULL.
 * Any other index outside [0, src_rows) is an error: the host call reports it before writing; the
 * device call writes a zero row and sets *error_flag = 1 (when error_flag is not NULL). */
typedef struct adsc_compact_tokens_params {
  const void* src;        /* [src_rows, row_bytes], row stride src_row_stride bytes */
  int64_t src_rows;
  int64_t src_row_stride;
  void* dst;              /* [dst_rows, row_bytes], row stride dst_row_stride bytes */
  int64_t dst_rows;
  int64_t dst_row_stride;
  int64_t row_bytes;
  const void* index;      /* [dst_rows] int32, or int64 when index_is_int64 */
  int32_t index_is_int64;
} adsc_compact_tokens_params;

ADSC_API adsc_status adsc_compact_tokens_host(const adsc_compact_tokens_params* params);
ADSC_API adsc_status adsc_compact_tokens_device(const adsc_compact_tokens_params* params, int32_t* error_flag,
                                         adsc_stream_t stream);

/* ---- Paged KV writes ------------------------------------------------------------------------- */

/* key_cache[slot_mapping[t]] = key[t], value_cache[slot_mapping[t]] = value[t]. A cache is
 * [num_blocks, block_size, num_kv_heads, head_dim] (FlashAttention's paged layout) seen as
 * num_slots = num_blocks * block_size rows of row_bytes = num_kv_heads * head_dim * element size;
 * slot = block * block_size + offset; -1 skips a (padding) token. A slot outside [-1, num_slots)
 * is an error: the host call reports it before writing; the device call skips the token and sets
 * *error_flag = 1 (when not NULL). Neither cache may overlap key, value or the other cache. The
 * caches may be NULL when num_slots is 0 (then every slot must be -1) or row_bytes is 0. */
typedef struct adsc_paged_kv_params {
  const void* key;        /* [num_tokens, row_bytes], token stride key_stride bytes */
  const void* value;      /* [num_tokens, row_bytes], token stride value_stride bytes */
  int64_t key_stride;
  int64_t value_stride;
  void* key_cache;        /* [num_slots, row_bytes], slot stride cache_stride bytes */
  void* value_cache;      /* [num_slots, row_bytes], slot stride cache_stride bytes */
  int64_t cache_stride;
  int64_t num_tokens;
  int64_t num_slots;
  int64_t row_bytes;
  const int64_t* slot_mapping; /* [num_tokens] */
} adsc_paged_kv_params;

ADSC_API adsc_status adsc_write_paged_kv_host(const adsc_paged_kv_params* params);
ADSC_API adsc_status adsc_write_paged_kv_device(const adsc_paged_kv_params* params,
                                                int32_t* error_flag, adsc_stream_t stream);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* ADSC_ADSC_H_ */
