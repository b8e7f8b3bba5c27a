/* Tests of the C ABI (adsc/adsc.h), written in C11 against the shared library, so the header is
 * proven C-compatible and the exported symbols are the ones a service links. Run one case:
 * `adsc_c_api_tests <case>`; exit 0 = pass, 1 = fail. */
#include <adsc/adsc.h>
#if defined(ADSC_TEST_HAVE_CUDART)
#include <cuda_runtime_api.h>
#endif
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

static int failures = 0;

#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) {                                                               \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);   \
      ++failures;                                                                \
    }                                                                            \
  } while (0)

/* `expr` must return `status` with a message containing `needle`. */
#define CHECK_FAILS(expr, status, needle)                                        \
  do {                                                                           \
    adsc_status s_ = (expr);                                                     \
    if (s_ != (status) || strstr(adsc_last_error(), (needle)) == NULL) {         \
      fprintf(stderr, "%s:%d: %s: expected %s with '%s', got %s: '%s'\n", __FILE__, __LINE__, \
              #expr, adsc_status_name(status), (needle), adsc_status_name(s_),    \
              adsc_last_error());                                                \
      ++failures;                                                                \
    }                                                                            \
  } while (0)

/* A packed batch of two sequences: [1, img x4, 2] and [3, 4], grid 2x2, schedule "1:2". */
enum { T = 8, B = 2, STAGES = 2 };
static const int64_t kIds[T] = {1, 9, 9, 9, 9, 2, 3, 4};
static const int32_t kCu[B + 1] = {0, 6, 8};

typedef struct {
  adsc_schedule schedule;
  int32_t workspace[T * 6];
  int32_t index[STAGES * T], source[STAGES * T], cu_out[STAGES * (B + 1)], summary[16];
  int64_t pos[STAGES * T];
  adsc_plan_params p;
} plan_fixture;

static void make_plan(plan_fixture* f) {
  memset(f, 0, sizeof(*f));
  CHECK(adsc_schedule_parse("1:2", &f->schedule) == ADSC_OK);
  CHECK(adsc_plan_workspace_size(T, 1) <= (int64_t)(sizeof(f->workspace) / 4));
  CHECK(adsc_plan_summary_size(1) <= 16);
  f->p.layout = ADSC_LAYOUT_PACKED;
  f->p.num_tokens = T;
  f->p.batch_size = B;
  f->p.cu_seqlens = kCu;
  f->p.input_ids = kIds;
  f->p.image_token_id = 9;
  f->p.grid_h = 2;
  f->p.grid_w = 2;
  f->p.schedule = &f->schedule;
  f->p.pad_left = 1;
  f->p.workspace = f->workspace;
  f->p.index = f->index;
  f->p.source_index = f->source;
  f->p.position_ids = f->pos;
  f->p.cu_seqlens_out = f->cu_out;
  f->p.summary = f->summary;
}

static void version_and_names(void) {
  const char* v = adsc_version();
  int major = -1, minor = -1, patch = -1;
  CHECK(v != NULL && sscanf(v, "%d.%d.%d", &major, &minor, &patch) == 3);
  CHECK(strcmp(adsc_status_name(ADSC_OK), "ok") == 0);
  CHECK(strcmp(adsc_status_name(ADSC_INDEX_OUT_OF_RANGE), "index out of range") == 0);
  CHECK(adsc_cuda_compiled() == 0 || adsc_cuda_compiled() == 1);
}

static void schedules(void) {
  adsc_schedule s;
  char text[64];
  int32_t gh[ADSC_MAX_STEPS + 1], gw[ADSC_MAX_STEPS + 1];
  CHECK(adsc_schedule_parse("8:2,16:2,24:2", &s) == ADSC_OK && s.num_steps == 3);
  CHECK(adsc_schedule_format(&s, text, sizeof(text)) == ADSC_OK && strcmp(text, "8:2,16:2,24:2") == 0);
  CHECK(adsc_schedule_validate(&s, 32, 24, 24, gh, gw) == ADSC_OK && gh[3] == 12 && gw[3] == 6);
  CHECK_FAILS(adsc_schedule_parse("8:3", &s), ADSC_INVALID_ARGUMENT, "factor must be 2 or 4, got 3");
  CHECK_FAILS(adsc_schedule_parse("0:2", &s), ADSC_INVALID_ARGUMENT, "layer must be >= 1");
  CHECK_FAILS(adsc_schedule_parse("8;2", &s), ADSC_INVALID_ARGUMENT, "expected 'layer:factor'");
  CHECK(adsc_schedule_parse("8:2,16:2,24:2", &s) == ADSC_OK);
  CHECK_FAILS(adsc_schedule_validate(&s, 24, 24, 24, NULL, NULL), ADSC_INVALID_ARGUMENT,
              "need 1 <= layer < 24");
  s.num_steps = 17; /* filled by hand */
  CHECK_FAILS(adsc_schedule_format(&s, text, sizeof(text)), ADSC_INVALID_ARGUMENT,
              "num_steps must be in 0..16, got 17");
}

static void null_pointers(void) {
  adsc_schedule s;
  plan_fixture f;
  CHECK_FAILS(adsc_schedule_parse(NULL, &s), ADSC_INVALID_ARGUMENT, "text must not be NULL");
  CHECK_FAILS(adsc_schedule_parse("1:2", NULL), ADSC_INVALID_ARGUMENT, "out must not be NULL");
  CHECK_FAILS(adsc_schedule_format(NULL, NULL, 0), ADSC_INVALID_ARGUMENT, "schedule must not be NULL");
  CHECK_FAILS(adsc_plan_host(NULL), ADSC_INVALID_ARGUMENT, "params must not be NULL");
  CHECK_FAILS(adsc_plan_device(NULL, NULL), ADSC_INVALID_ARGUMENT, "params must not be NULL");
  CHECK_FAILS(adsc_compact_tokens_host(NULL), ADSC_INVALID_ARGUMENT, "params must not be NULL");
  CHECK_FAILS(adsc_write_paged_kv_host(NULL), ADSC_INVALID_ARGUMENT, "params must not be NULL");
  make_plan(&f);
  f.p.schedule = NULL;
  CHECK_FAILS(adsc_plan_host(&f.p), ADSC_INVALID_ARGUMENT, "schedule must not be NULL");
  make_plan(&f);
  f.p.index = NULL;
  CHECK_FAILS(adsc_plan_host(&f.p), ADSC_INVALID_ARGUMENT, "must not be null");
  make_plan(&f);
  f.p.cu_seqlens = NULL;
  CHECK_FAILS(adsc_plan_host(&f.p), ADSC_INVALID_ARGUMENT, "needs cu_seqlens");
  make_plan(&f);
  CHECK_FAILS(adsc_plan_check_summary(NULL, &f.p), ADSC_INVALID_ARGUMENT, "host_summary must not be NULL");
  {
    float src[4] = {0}, dst[4] = {0};
    adsc_compact_tokens_params c = {src, 2, 8, dst, 2, 8, 8, NULL, 0};
    CHECK_FAILS(adsc_compact_tokens_host(&c), ADSC_INVALID_ARGUMENT, "index must not be null");
  }
  {
    int64_t slots[1] = {0};
    adsc_paged_kv_params k = {NULL, NULL, 4, 4, NULL, NULL, 4, 1, 1, 4, slots};
    CHECK_FAILS(adsc_write_paged_kv_host(&k), ADSC_INVALID_ARGUMENT, "must not be null");
  }
}

static void sizes_that_do_not_match(void) {
  plan_fixture f;
  int32_t bad_cu[B + 1] = {0, 6, 7}; /* ends before T */
  make_plan(&f);
  f.p.cu_seqlens = bad_cu;
  CHECK_FAILS(adsc_plan_host(&f.p), ADSC_INVALID_INPUT, "end at the number of tokens (8)");
  make_plan(&f);
  f.p.layout = ADSC_LAYOUT_PADDED;
  f.p.padded_len = 3; /* B * S = 6 != T */
  f.p.mask = kIds;
  CHECK_FAILS(adsc_plan_host(&f.p), ADSC_INVALID_ARGUMENT, "needs num_tokens = 6, got 8");
  make_plan(&f);
  f.schedule.factors[0] = 3; /* filled by hand */
  CHECK_FAILS(adsc_plan_host(&f.p), ADSC_INVALID_ARGUMENT, "factor 3");
  make_plan(&f);
  f.p.grid_w = 3; /* the run of 4 image tokens is not whole 2x3 images */
  CHECK_FAILS(adsc_plan_host(&f.p), ADSC_INVALID_INPUT, "a run of 4 image tokens (id 9) at position 1");
  /* The summary names the failing sequence for a service to reject just that request. */
  CHECK(f.summary[ADSC_PLAN_SUMMARY_ERROR] == ADSC_PLAN_PARTIAL_IMAGE);
  CHECK(f.summary[ADSC_PLAN_SUMMARY_ERROR + 1] == 0 && f.summary[ADSC_PLAN_SUMMARY_ERROR + 2] == 1 &&
        f.summary[ADSC_PLAN_SUMMARY_ERROR + 3] == 4);
  {
    float src[6] = {1, 2, 3, 4, 5, 6}, dst[4] = {9, 9, 9, 9};
    int32_t index[2] = {0, 3}; /* src has 3 rows */
    adsc_compact_tokens_params c = {src, 3, 8, dst, 2, 8, 8, index, 0};
    CHECK_FAILS(adsc_compact_tokens_host(&c), ADSC_INDEX_OUT_OF_RANGE, "index[1] = 3 is out of range");
    CHECK(dst[0] == 9 && dst[3] == 9); /* nothing written */
    c.dst_row_stride = 4;
    CHECK_FAILS(adsc_compact_tokens_host(&c), ADSC_INVALID_ARGUMENT, "at least the row size");
  }
  {
    uint16_t k[4] = {1, 2, 3, 4}, v[4] = {5, 6, 7, 8}, kc[8] = {0}, vc[8] = {0};
    int64_t slots[2] = {3, 4}; /* 4 slots */
    adsc_paged_kv_params p = {k, v, 4, 4, kc, vc, 4, 2, 4, 4, slots};
    CHECK_FAILS(adsc_write_paged_kv_host(&p), ADSC_INDEX_OUT_OF_RANGE,
                "slot_mapping[1] = 4 is out of range");
    slots[1] = -1;
    CHECK(adsc_write_paged_kv_host(&p) == ADSC_OK && kc[6] == 1 && kc[7] == 2 && vc[6] == 5);
  }
}

static void host_plan_compact_and_kv(void) {
  plan_fixture f;
  make_plan(&f);
  CHECK(adsc_plan_host(&f.p) == ADSC_OK);
  CHECK(adsc_plan_check_summary(f.summary, &f.p) == ADSC_OK);
  /* 2x2 image, factor 2 halves the width: columns 1 of both rows survive (positions 2 and 4). */
  CHECK(adsc_plan_stage_tokens(f.summary, 1, 0) == 8 && adsc_plan_stage_tokens(f.summary, 1, 1) == 6);
  CHECK(adsc_plan_stage_max_len(f.summary, 1, 1) == 4);
  CHECK(adsc_plan_stage_tokens(f.summary, 1, 2) == -1);  /* no stage 2 in a 1-step schedule */
  CHECK(adsc_plan_stage_max_len(f.summary, 1, -1) == -1);
  CHECK(f.summary[ADSC_PLAN_SUMMARY_ERROR] == ADSC_PLAN_OK);
  {
    const int64_t want_pos[6] = {0, 2, 4, 5, 0, 1};
    int i;
    for (i = 0; i < 6; ++i) CHECK(f.pos[T + i] == want_pos[i]);
  }
  {
    double hidden[T], out[6];
    int i;
    for (i = 0; i < T; ++i) hidden[i] = 100.0 + i;
    adsc_compact_tokens_params c = {hidden, T, 8, out, 6, 8, 8, f.index + T, 0};
    CHECK(adsc_compact_tokens_host(&c) == ADSC_OK);
    for (i = 0; i < 6; ++i) CHECK(out[i] == 100.0 + f.source[T + i]);
  }
}

/* ---- Hardening (issue 14): inputs that once crashed, overflowed or read out of bounds ---------- */

/* D1: B * S overflows int64 (4 * 2^62 wraps to 0 = num_tokens): rejected before multiplying. */
static void padded_size_overflow(void) {
  plan_fixture f;
  uint8_t mask[1] = {1};
  make_plan(&f);
  f.p.layout = ADSC_LAYOUT_PADDED;
  f.p.num_tokens = 0;
  f.p.batch_size = 4;
  f.p.padded_len = (int64_t)1 << 62;
  f.p.mask = mask;
  f.p.input_ids = NULL;
  CHECK_FAILS(adsc_plan_host(&f.p), ADSC_INVALID_ARGUMENT, "4 rows x 4611686018427387904 slots");
  f.p.batch_size = (int64_t)1 << 40; /* a batch the int32 offsets cannot hold */
  f.p.padded_len = 0;
  CHECK_FAILS(adsc_plan_host(&f.p), ADSC_INVALID_ARGUMENT, "batch_size");
  make_plan(&f);
  f.p.num_spans = INT64_MAX; /* 4 * num_spans would overflow */
  f.p.input_ids = NULL;
  f.p.spans = kIds;
  CHECK_FAILS(adsc_plan_host(&f.p), ADSC_INVALID_ARGUMENT, "num_spans");
}

/* D3: sizes whose arithmetic overflowed int32 or int64. */
static void overflowing_sizes(void) {
  adsc_schedule s;
  plan_fixture f;
  int32_t gh[2], gw[2], summary[16] = {0};
  CHECK(adsc_schedule_parse("1:2", &s) == ADSC_OK);
  CHECK(adsc_schedule_validate(&s, 2, INT32_MAX, INT32_MAX, gh, gw) == ADSC_OK);
  CHECK(gh[1] == INT32_MAX && gw[1] == 1073741824);
  CHECK(adsc_plan_workspace_size(INT64_MAX / 2, 1) == -1);
  CHECK(adsc_plan_workspace_size(-1, 1) == -1);
  CHECK(adsc_plan_workspace_size(8, ADSC_MAX_STEPS + 1) == -1);
  CHECK(adsc_plan_workspace_size(8, 1) == 40);
  CHECK(adsc_plan_summary_size(INT32_MAX) == -1);
  CHECK(adsc_plan_summary_size(-1) == -1);
  CHECK(adsc_plan_summary_size(3) == 16);
  CHECK(adsc_plan_stage_tokens(summary, INT32_MAX, 1) == -1);
  make_plan(&f);
  f.p.grid_h = 65536;
  f.p.grid_w = 65536;
  summary[0] = ADSC_PLAN_PARTIAL_IMAGE;
  summary[1] = INT32_MAX;
  summary[2] = INT32_MAX;
  summary[3] = INT32_MAX;
  CHECK_FAILS(adsc_plan_check_summary(summary, &f.p), ADSC_INVALID_INPUT, "(4294967296 tokens each)");
  summary[0] = ADSC_PLAN_BAD_CU_SEQLENS;
  CHECK_FAILS(adsc_plan_check_summary(summary, &f.p), ADSC_INVALID_INPUT, "cu_seqlens[2147483648]");
  summary[0] = 1234;
  CHECK_FAILS(adsc_plan_check_summary(summary, &f.p), ADSC_INVALID_INPUT, "unknown error code 1234");
  {
    float src[4] = {1, 2, 3, 4}, dst[4] = {0};
    int32_t index[2] = {1, 0};
    int64_t slots[2] = {1, 0};
    adsc_compact_tokens_params c = {src, 2, INT64_MAX, dst, 2, 8, 8, index, 0};
    adsc_paged_kv_params k = {src, src, 8, 8, dst, dst + 2, (int64_t)1 << 62, 2, 3, 8, slots};
    CHECK_FAILS(adsc_compact_tokens_host(&c), ADSC_INVALID_ARGUMENT, "src");
    c.src_row_stride = 8;
    c.dst_row_stride = INT64_MAX;
    CHECK_FAILS(adsc_compact_tokens_host(&c), ADSC_INVALID_ARGUMENT, "dst");
    CHECK_FAILS(adsc_write_paged_kv_host(&k), ADSC_INVALID_ARGUMENT, "key_cache");
    k.cache_stride = 8;
    k.num_slots = 1;
    k.key_stride = INT64_MAX;
    CHECK_FAILS(adsc_write_paged_kv_host(&k), ADSC_INVALID_ARGUMENT, "key");
  }
}

/* D3: enum fields out of range are checked as integers (never loaded into a C++ enum). */
static void enums_out_of_range(void) {
  plan_fixture f;
  make_plan(&f);
  f.p.layout = (adsc_layout)7;
  CHECK_FAILS(adsc_plan_host(&f.p), ADSC_INVALID_ARGUMENT, "layout must be packed (0) or padded (1), got 7");
  make_plan(&f);
  f.p.layout = ADSC_LAYOUT_PADDED;
  f.p.padded_len = 4;
  f.p.batch_size = 2;
  f.p.mask = kIds;
  f.p.mask_type = (adsc_mask_type)9;
  CHECK_FAILS(adsc_plan_host(&f.p), ADSC_INVALID_ARGUMENT, "unknown mask type 9");
  CHECK(strcmp(adsc_status_name((adsc_status)99), "unknown status") == 0);
  CHECK(strcmp(adsc_status_name(-1), "unknown status") == 0);
}

/* D3: zero-size rows with NULL buffers (memset/memcpy of NULL, 0 is undefined), misaligned
 * pointers, and overlapping source and destination rows. */
static void null_misaligned_and_overlapping(void) {
  int32_t index[2] = {-1, -1};
  adsc_compact_tokens_params c = {NULL, 0, 0, NULL, 2, 0, 0, index, 0};
  CHECK(adsc_compact_tokens_host(&c) == ADSC_OK);
  {
    plan_fixture f;
    int64_t ids[T + 1];
    memcpy(ids, kIds, sizeof(kIds));
    make_plan(&f);
    f.p.input_ids = (const int64_t*)((const char*)ids + 1);
    CHECK_FAILS(adsc_plan_host(&f.p), ADSC_INVALID_ARGUMENT, "input_ids must be aligned to 8 bytes");
    make_plan(&f);
    f.p.position_ids = (int64_t*)((char*)f.pos + 4);
    CHECK_FAILS(adsc_plan_host(&f.p), ADSC_INVALID_ARGUMENT, "position_ids must be aligned to 8 bytes");
  }
  {
    double rows[4] = {1, 2, 3, 4}, out[2] = {0};
    int32_t idx[3] = {1, 0, 0};
    adsc_compact_tokens_params g = {rows, 4, 8, out, 2, 8, 8, (const char*)idx + 2, 0};
    CHECK_FAILS(adsc_compact_tokens_host(&g), ADSC_INVALID_ARGUMENT, "index must be aligned to 4 bytes");
    g.index = idx;
    g.dst = rows + 1; /* dst rows 1..2 are src rows */
    CHECK_FAILS(adsc_compact_tokens_host(&g), ADSC_INVALID_ARGUMENT, "overlap");
    g.dst = out;
    CHECK(adsc_compact_tokens_host(&g) == ADSC_OK && out[0] == 2 && out[1] == 1);
  }
  {
    float cache[8] = {0}, vcache[8] = {0}, key[2] = {1, 2};
    int64_t slots[2] = {0, 1};
    adsc_paged_kv_params k = {cache + 4, key, 4, 4, cache, vcache, 4, 2, 8, 4, slots};
    CHECK_FAILS(adsc_write_paged_kv_host(&k), ADSC_INVALID_ARGUMENT, "overlap");
    k.key = key;
    k.value_cache = cache + 1; /* value_cache slot 0 is key_cache slot 1 */
    k.num_slots = 2;
    CHECK_FAILS(adsc_write_paged_kv_host(&k), ADSC_INVALID_ARGUMENT, "overlap");
    k.value_cache = vcache;
    k.slot_mapping = (const int64_t*)((const char*)slots + 4);
    CHECK_FAILS(adsc_write_paged_kv_host(&k), ADSC_INVALID_ARGUMENT,
                "slot_mapping must be aligned to 8 bytes");
  }
}

/* D15: a hand-filled schedule is checked in full before it is formatted or used. */
static void hand_filled_schedules(void) {
  adsc_schedule s;
  char text[64];
  memset(&s, 0, sizeof(s));
  s.num_steps = 1;
  s.layers[0] = INT32_MIN;
  s.factors[0] = 2;
  CHECK_FAILS(adsc_schedule_format(&s, text, sizeof(text)), ADSC_INVALID_ARGUMENT,
              "layer must be >= 1");
  s.num_steps = 2;
  s.layers[0] = 8;
  s.layers[1] = 8;
  s.factors[1] = 2;
  CHECK_FAILS(adsc_schedule_format(&s, text, sizeof(text)), ADSC_INVALID_ARGUMENT,
              "strictly increasing");
  s.layers[1] = 9;
  s.factors[1] = 3;
  CHECK_FAILS(adsc_schedule_format(&s, text, sizeof(text)), ADSC_INVALID_ARGUMENT,
              "factor must be 2 or 4");
  s.factors[1] = 4;
  CHECK(adsc_schedule_format(&s, text, sizeof(text)) == ADSC_OK && strcmp(text, "8:2,9:4") == 0);
  CHECK_FAILS(adsc_schedule_parse("1234567890:2", &s), ADSC_INVALID_ARGUMENT, "expected 'layer:factor'");
  CHECK_FAILS(adsc_schedule_parse("\xef\xbc\x98:2", &s), ADSC_INVALID_ARGUMENT, "expected 'layer:factor'");
}

/* D11: zero-block caches with every token skipped (-1) is a no-op, not a NULL-pointer error. */
static void paged_kv_with_no_blocks(void) {
  float key[4] = {1, 2, 3, 4};
  int64_t slots[2] = {-1, -1};
  adsc_paged_kv_params k = {key, key, 8, 8, NULL, NULL, 8, 2, 0, 8, slots};
  CHECK(adsc_write_paged_kv_host(&k) == ADSC_OK);
  slots[1] = 0;
  CHECK_FAILS(adsc_write_paged_kv_host(&k), ADSC_INDEX_OUT_OF_RANGE, "slot_mapping[1] = 0");
}

/* ---- Hardening (issue 18): every written buffer against every other buffer of the call ------- */

/* A slot_mapping that lives inside key_cache was rewritten by the first rows copied, so the next
 * slot read was a key's bytes: a write far outside the cache (a segfault). */
static void paged_kv_slots_inside_cache(void) {
  int64_t cache[8] = {0}, vcache[8] = {0};
  int64_t key[4] = {INT64_MAX / 4, INT64_MAX / 4, INT64_MAX / 4, INT64_MAX / 4};
  adsc_paged_kv_params k = {key, key, 16, 16, cache, vcache, 16, 2, 4, 16, cache};
  cache[0] = 0; /* slot_mapping[0] = 0: its row overwrites slot_mapping[0..1] with the key */
  cache[1] = 1;
  CHECK_FAILS(adsc_write_paged_kv_host(&k), ADSC_INVALID_ARGUMENT,
              "key_cache and slot_mapping overlap");
  CHECK(cache[1] == 1 && vcache[0] == 0); /* nothing written */
  k.slot_mapping = vcache + 6; /* inside value_cache's last slot */
  vcache[6] = 0;
  vcache[7] = -1;
  CHECK_FAILS(adsc_write_paged_kv_host(&k), ADSC_INVALID_ARGUMENT,
              "value_cache and slot_mapping overlap");
}

/* An index inside dst was overwritten by the rows gathered before it: rows read out of bounds. */
static void compact_index_inside_dst(void) {
  int32_t dst[16] = {0};
  int32_t src[8] = {0, 1, 1, 0, 5, 6, 7, 8};
  adsc_compact_tokens_params c = {src, 2, 16, dst, 4, 16, 16, dst + 4, 0};
  dst[4] = 1; /* index = dst[4..7] = {1, 0, 1, 0}: dst row 1 is the index itself */
  dst[6] = 1;
  CHECK_FAILS(adsc_compact_tokens_host(&c), ADSC_INVALID_ARGUMENT, "dst and index overlap");
  CHECK(dst[0] == 0 && dst[4] == 1); /* nothing written */
  c.index = src; /* src and index may share bytes: both are only read (index = {0, 1, 1, 0}) */
  CHECK(adsc_compact_tokens_host(&c) == ADSC_OK);
  CHECK(dst[0] == 0 && dst[1] == 1 && dst[4] == 5 && dst[8] == 5 && dst[12] == 0);
}

/* Plans whose outputs overlap their inputs (or each other) returned ADSC_OK with a wrong plan. */
static void plan_outputs_overlapping_inputs(void) {
  plan_fixture f;
  int64_t ids[T + 16];
  int32_t cu[8] = {0, 6, 8};
  adsc_status st;
  memcpy(ids, kIds, sizeof(kIds));
  make_plan(&f);
  f.p.input_ids = ids;
  f.p.workspace = (int32_t*)(ids + 4); /* workspace over input_ids[4..] */
  CHECK_FAILS(adsc_plan_host(&f.p), ADSC_INVALID_ARGUMENT, "workspace and input_ids overlap");
  CHECK(memcmp(ids, kIds, sizeof(kIds)) == 0); /* nothing written */
  make_plan(&f);
  f.p.input_ids = ids;
  f.p.index = (int32_t*)(ids + 2);
  CHECK_FAILS(adsc_plan_host(&f.p), ADSC_INVALID_ARGUMENT, "index and input_ids overlap");
  make_plan(&f);
  f.p.source_index = f.index + 1; /* two outputs sharing bytes */
  CHECK_FAILS(adsc_plan_host(&f.p), ADSC_INVALID_ARGUMENT, "index and source_index overlap");
  make_plan(&f);
  f.p.summary = (int32_t*)f.pos + 2;
  CHECK_FAILS(adsc_plan_host(&f.p), ADSC_INVALID_ARGUMENT, "position_ids and summary overlap");
  make_plan(&f);
  f.p.cu_seqlens = cu;
  f.p.cu_seqlens_out = cu; /* the offsets read are the ones written */
  CHECK_FAILS(adsc_plan_host(&f.p), ADSC_INVALID_ARGUMENT, "cu_seqlens_out and cu_seqlens overlap");
  {
    int32_t mask[8] = {0, 1, 1, 1, 1, 1, 0, 0}; /* [2, 4] int32 */
    make_plan(&f);
    f.p.layout = ADSC_LAYOUT_PADDED;
    f.p.padded_len = 4;
    f.p.input_ids = NULL;
    f.p.mask = mask;
    f.p.mask_type = ADSC_MASK_INT32;
    f.p.cu_seqlens_out = mask + 2;
    CHECK_FAILS(adsc_plan_host(&f.p), ADSC_INVALID_ARGUMENT, "cu_seqlens_out and mask overlap");
    CHECK(mask[2] == 1 && mask[6] == 0); /* nothing written */
    /* A padded plan does not read cu_seqlens, nor a packed one the mask: not their buffers. */
    f.p.cu_seqlens_out = f.cu_out;
    f.p.cu_seqlens = (const int32_t*)f.index;
    CHECK(adsc_plan_host(&f.p) == ADSC_OK && adsc_plan_stage_tokens(f.summary, 1, 0) == 5);
    make_plan(&f);
    f.p.mask = f.index;
    CHECK(adsc_plan_host(&f.p) == ADSC_OK);
  }
  /* Spans are read too. */
  {
    int64_t spans[4 + 2 * T] = {0, 1, 2, 2};
    make_plan(&f);
    f.p.input_ids = NULL;
    f.p.spans = spans;
    f.p.num_spans = 1;
    f.p.position_ids = spans; /* over the span */
    CHECK_FAILS(adsc_plan_host(&f.p), ADSC_INVALID_ARGUMENT, "position_ids and spans overlap");
    f.p.position_ids = f.pos;
    CHECK(adsc_plan_host(&f.p) == ADSC_OK);
  }
  /* The device plan checks the same before it launches anything. */
  make_plan(&f);
  f.p.index = f.source;
  st = adsc_plan_device(&f.p, NULL);
  if (adsc_cuda_compiled()) CHECK(st == ADSC_INVALID_ARGUMENT && strstr(adsc_last_error(), "index and source_index overlap"));
  else CHECK(st == ADSC_NOT_COMPILED);
}

/* adsc_schedule_validate wrote its stage grids through misaligned and overlapping pointers. */
static void schedule_validate_output_checks(void) {
  adsc_schedule s;
  union { adsc_schedule s; int32_t w[48]; } u;
  char* bytes = (char*)u.w;
  memset(&u, 0, sizeof(u));
  CHECK(adsc_schedule_parse("8:2,16:2,24:2", &s) == ADSC_OK);
  CHECK_FAILS(adsc_schedule_validate(&s, 32, 24, 24, (int32_t*)(bytes + 1), u.w + 8),
              ADSC_INVALID_ARGUMENT, "grids_h must be aligned to 4 bytes");
  CHECK_FAILS(adsc_schedule_validate(&s, 32, 24, 24, u.w, (int32_t*)(bytes + 34)),
              ADSC_INVALID_ARGUMENT, "grids_w must be aligned to 4 bytes");
  CHECK_FAILS(adsc_schedule_validate(&s, 32, 24, 24, u.w, u.w + 2), ADSC_INVALID_ARGUMENT,
              "grids_h and grids_w overlap");
  CHECK(u.w[0] == 0); /* nothing written */
  CHECK(adsc_schedule_validate(&s, 32, 24, 24, u.w, u.w + 4) == ADSC_OK); /* adjacent: fine */
  CHECK(u.w[3] == 12 && u.w[7] == 6);
  /* The schedule itself is copied on entry: it may live where the grids are written. */
  u.s = s;
  CHECK(adsc_schedule_validate(&u.s, 32, 24, 24, u.w, u.w + 4) == ADSC_OK);
  CHECK(u.w[3] == 12 && u.w[7] == 6);
  CHECK_FAILS(adsc_schedule_validate((const adsc_schedule*)(bytes + 2), 32, 24, 24, NULL, NULL),
              ADSC_INVALID_ARGUMENT, "schedule must be aligned to 4 bytes");
}

/* The other entry points: the same rule, the same words. */
static void every_entry_point_checks_its_buffers(void) {
  union { adsc_schedule s; char text[sizeof(adsc_schedule) + 8]; int32_t words[40]; } u;
  union { adsc_plan_params p; char bytes[sizeof(adsc_plan_params) + 8]; } raw;
  int32_t summary[16] = {0};
  plan_fixture f;
  memset(&u, 0, sizeof(u));
  strcpy(u.text, "8:2");
  CHECK_FAILS(adsc_schedule_parse(u.text, &u.s), ADSC_INVALID_ARGUMENT, "out and text overlap");
  CHECK(strcmp(u.text, "8:2") == 0);
  CHECK_FAILS(adsc_schedule_parse("8:2", (adsc_schedule*)(u.text + 1)), ADSC_INVALID_ARGUMENT,
              "out must be aligned to 4 bytes");
  CHECK(adsc_schedule_parse("8:2", &u.s) == ADSC_OK && u.s.num_steps == 1);
  CHECK_FAILS(adsc_schedule_format((const adsc_schedule*)(u.text + 2), (char*)summary, 8),
              ADSC_INVALID_ARGUMENT, "schedule must be aligned to 4 bytes");
  make_plan(&f);
  CHECK_FAILS(adsc_plan_check_summary((const int32_t*)((const char*)summary + 1), &f.p),
              ADSC_INVALID_ARGUMENT, "host_summary must be aligned to 4 bytes");
  CHECK(adsc_plan_stage_tokens((const int32_t*)((const char*)summary + 1), 1, 0) == -1);
  CHECK(adsc_plan_stage_max_len((const int32_t*)((const char*)summary + 2), 1, 0) == -1);
  memcpy(raw.bytes + 4, &f.p, sizeof(f.p));
  CHECK_FAILS(adsc_plan_host((const adsc_plan_params*)(raw.bytes + 4)), ADSC_INVALID_ARGUMENT,
              "params must be aligned to 8 bytes");
  {
    int32_t flag[2] = {0, 0};
    float src[2] = {0}, dst[2] = {0};
    int32_t index[1] = {0};
    adsc_compact_tokens_params c = {src, 1, 8, dst, 1, 8, 8, index, 0};
    adsc_status st = adsc_compact_tokens_device(&c, (int32_t*)((char*)flag + 1), NULL);
    if (adsc_cuda_compiled()) CHECK(st == ADSC_INVALID_ARGUMENT && strstr(adsc_last_error(), "error_flag must be aligned"));
    else CHECK(st == ADSC_NOT_COMPILED);
    st = adsc_compact_tokens_device(&c, (int32_t*)dst, NULL); /* error_flag inside dst */
    if (adsc_cuda_compiled()) CHECK(st == ADSC_INVALID_ARGUMENT && strstr(adsc_last_error(), "dst and error_flag overlap"));
    else CHECK(st == ADSC_NOT_COMPILED);
  }
}

/* Without a GPU (or without CUDA in the library) the *_device calls fail cleanly. With a GPU
 * they are exercised by the C++ CUDA tests and the cpp_service example instead. */
static int gpu_present(void) {
#if defined(ADSC_TEST_HAVE_CUDART)
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
#else
  return 0;
#endif
}

static void device_calls_without_gpu(void) {
  plan_fixture f;
  adsc_status st;
  if (gpu_present()) {
    printf("device_calls_without_gpu: a GPU is present, nothing to check\n");
    return;
  }
  make_plan(&f);
  st = adsc_plan_device(&f.p, NULL);
  CHECK(st == (adsc_cuda_compiled() ? ADSC_CUDA_ERROR : ADSC_NOT_COMPILED));
  CHECK(strlen(adsc_last_error()) > 0);
  {
    float src[2] = {0}, dst[2] = {0};
    int32_t index[1] = {0};
    int32_t flag = 0;
    adsc_compact_tokens_params c = {src, 1, 8, dst, 1, 8, 8, index, 0};
    st = adsc_compact_tokens_device(&c, &flag, NULL);
    CHECK(st == (adsc_cuda_compiled() ? ADSC_CUDA_ERROR : ADSC_NOT_COMPILED));
  }
}

static char thread_message[256];

static void* fail_in_thread(void* arg) {
  adsc_schedule s;
  (void)arg;
  strcpy(thread_message, adsc_last_error()); /* nothing failed on this thread yet */
  CHECK(adsc_schedule_parse("5:5", &s) == ADSC_INVALID_ARGUMENT);
  return NULL;
}

static void last_error_is_per_thread(void) {
  adsc_schedule s;
  pthread_t thread;
  CHECK(adsc_schedule_parse("0:2", &s) == ADSC_INVALID_ARGUMENT);
  CHECK(pthread_create(&thread, NULL, fail_in_thread, NULL) == 0);
  CHECK(pthread_join(thread, NULL) == 0);
  CHECK(strcmp(thread_message, "") == 0);
  CHECK(strstr(adsc_last_error(), "layer must be >= 1") != NULL); /* untouched by the thread */
}

int main(int argc, char** argv) {
  static const struct { const char* name; void (*run)(void); } cases[] = {
      {"version_and_names", version_and_names},
      {"schedules", schedules},
      {"null_pointers", null_pointers},
      {"sizes_that_do_not_match", sizes_that_do_not_match},
      {"host_plan_compact_and_kv", host_plan_compact_and_kv},
      {"device_calls_without_gpu", device_calls_without_gpu},
      {"last_error_is_per_thread", last_error_is_per_thread},
      {"padded_size_overflow", padded_size_overflow},
      {"overflowing_sizes", overflowing_sizes},
      {"enums_out_of_range", enums_out_of_range},
      {"null_misaligned_and_overlapping", null_misaligned_and_overlapping},
      {"hand_filled_schedules", hand_filled_schedules},
      {"paged_kv_with_no_blocks", paged_kv_with_no_blocks},
      {"paged_kv_slots_inside_cache", paged_kv_slots_inside_cache},
      {"compact_index_inside_dst", compact_index_inside_dst},
      {"plan_outputs_overlapping_inputs", plan_outputs_overlapping_inputs},
      {"schedule_validate_output_checks", schedule_validate_output_checks},
      {"every_entry_point_checks_its_buffers", every_entry_point_checks_its_buffers},
  };
  size_t i;
  for (i = 0; argc == 2 && i < sizeof(cases) / sizeof(cases[0]); ++i) {
    if (strcmp(argv[1], cases[i].name) == 0) {
      cases[i].run();
      printf("%s: %s\n", argv[1], failures ? "FAILED" : "passed");
      return failures ? 1 : 0;
    }
  }
  fprintf(stderr, "usage: %s <case>\n", argv[0]);
  return 2;
}
