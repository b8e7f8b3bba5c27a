// C++ tests of the adsc core. Run one case: `adsc_core_tests <case>`; exit 0 = pass, 1 = fail,
// 77 = skipped. The plan is checked against `naive_plan` below, a deliberately simple oracle
// written from the spec (coordinate lists per image), not from the core's per-token formulas.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "adsc/compact.h"
#include "adsc/paged_kv.h"
#include "adsc/plan.h"
#include "adsc/schedule.h"

#if defined(ADSC_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace {

int g_failures = 0;

#define CHECK(cond)                                                          \
  do {                                                                       \
    if (!(cond)) {                                                           \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                          \
    }                                                                        \
  } while (0)

#define CHECK_OK(expr)                                                       \
  do {                                                                       \
    adsc::Status s_ = (expr);                                                \
    if (s_ != adsc::Status::kOk) {                                           \
      std::fprintf(stderr, "%s:%d: %s returned %s: %s\n", __FILE__, __LINE__, #expr, \
                   adsc::status_name(s_), adsc::last_error());               \
      ++g_failures;                                                          \
    }                                                                        \
  } while (0)

// expr must fail with `status` and a message containing `needle`.
#define CHECK_FAILS(expr, status, needle)                                    \
  do {                                                                       \
    adsc::Status s_ = (expr);                                                \
    if (s_ != (status) || std::strstr(adsc::last_error(), (needle)) == nullptr) { \
      std::fprintf(stderr, "%s:%d: %s: expected %s containing '%s', got %s: '%s'\n", __FILE__, \
                   __LINE__, #expr, adsc::status_name(status), (needle), adsc::status_name(s_), \
                   adsc::last_error());                                      \
      ++g_failures;                                                          \
    }                                                                        \
  } while (0)

struct Rng {  // small deterministic generator (LCG)
  uint64_t state;
  explicit Rng(uint64_t seed) : state(seed * 6364136223846793005ull + 1442695040888963407ull) {}
  uint32_t next() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<uint32_t>(state >> 33);
  }
  int uniform(int lo, int hi) { return lo + static_cast<int>(next() % (hi - lo + 1)); }
};

adsc::Schedule parse(const char* text) {
  adsc::Schedule s;
  CHECK_OK(adsc::parse_schedule(text, &s));
  return s;
}

// ---- A batch description and the naive oracle ------------------------------------------------

constexpr int64_t kImageId = 7;

// An image: an h x w grid at positions start.., in raster order; with nl = 1 every grid row is
// followed by one newline token (LLaVA-NeXT anyres), so it spans h * (w + 1) positions.
struct Image {
  int64_t seq, start, h, w, nl = 0;
  int64_t tokens() const { return h * (w + nl); }
};

struct Batch {
  bool padded = false;
  bool pad_left = true;
  int64_t S = 0;                      // padded width
  std::vector<int32_t> cu;            // packed offsets
  std::vector<uint8_t> mask;          // padded mask
  std::vector<int64_t> ids;           // [T]
  std::vector<Image> images;          // every image, in (seq, start) order
  std::vector<std::vector<int64_t>> rows;  // input row of each position, per sequence
  int64_t T() const { return static_cast<int64_t>(ids.size()); }
  int64_t B() const { return static_cast<int64_t>(rows.size()); }
};

struct Expected {
  std::vector<std::vector<int32_t>> index, source;
  std::vector<std::vector<int64_t>> pos;
  std::vector<std::vector<int32_t>> cu;
  std::vector<int32_t> tokens, max_len;
};

// Kept offsets (within the image's positions) of an h x w image after each stage (stage 0 = all):
// (row, col) sits at row * (w + nl) + col, and a kept row keeps its newline token at
// row * (w + nl) + w.
std::vector<std::set<int64_t>> naive_kept(int64_t h, int64_t w, const adsc::Schedule& sched,
                                          int64_t nl = 0) {
  std::vector<int64_t> rows, cols;
  for (int64_t i = 0; i < h; ++i) rows.push_back(i);
  for (int64_t i = 0; i < w; ++i) cols.push_back(i);
  auto halve = [](const std::vector<int64_t>& v) {
    std::vector<int64_t> out;
    const int64_t n = static_cast<int64_t>(v.size());
    for (int64_t g = 0; g < (n + 1) / 2; ++g) out.push_back(v[std::min(2 * g + 1, n - 1)]);
    return out;
  };
  std::vector<std::set<int64_t>> kept;
  auto snapshot = [&] {
    std::set<int64_t> s;
    for (int64_t r : rows) {
      for (int64_t c : cols) s.insert(r * (w + nl) + c);
      if (nl) s.insert(r * (w + nl) + w);
    }
    kept.push_back(s);
  };
  snapshot();
  for (int i = 0; i < sched.num_steps; ++i) {
    const bool both = sched.factors[i] == 4;
    const bool r = both || rows.size() > cols.size();
    const bool c = both || rows.size() <= cols.size();
    if (r) rows = halve(rows);
    if (c) cols = halve(cols);
    snapshot();
  }
  return kept;
}

Expected naive_plan(const Batch& batch, const adsc::Schedule& sched) {
  const int64_t B = batch.B(), T = batch.T();
  const int stages = sched.num_steps + 1;
  // alive[s][b] = positions alive at stage s
  std::vector<std::vector<std::set<int64_t>>> alive(stages, std::vector<std::set<int64_t>>(B));
  for (int s = 0; s < stages; ++s)
    for (int64_t b = 0; b < B; ++b)
      for (int64_t p = 0; p < static_cast<int64_t>(batch.rows[b].size()); ++p) alive[s][b].insert(p);
  for (const Image& im : batch.images) {
    auto kept = naive_kept(im.h, im.w, sched, im.nl);
    for (int s = 1; s < stages; ++s)
      for (int64_t r = 0; r < im.tokens(); ++r)
        if (!kept[s].count(r)) alive[s][im.seq].erase(im.start + r);
  }
  Expected e;
  std::map<int64_t, int64_t> prev_slot;
  for (int s = 0; s < stages; ++s) {
    std::vector<int32_t> cu(1, 0);
    int32_t longest = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int32_t n = static_cast<int32_t>(alive[s][b].size());
      cu.push_back(cu.back() + n);
      longest = std::max(longest, n);
    }
    const int64_t width = batch.padded ? (s == 0 ? batch.S : longest) : 0;
    const int64_t slots = batch.padded ? B * width : cu.back();
    std::vector<int32_t> index(slots, -1), source(slots, -1);
    std::vector<int64_t> pos(slots, 1);
    std::map<int64_t, int64_t> slot_of;
    int64_t next = 0;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len = static_cast<int64_t>(alive[s][b].size());
      int64_t k = 0;
      for (int64_t p : alive[s][b]) {
        const int64_t row = batch.rows[b][p];
        int64_t slot;
        if (!batch.padded) slot = next++;
        else if (s == 0) slot = row;
        else slot = b * width + (batch.pad_left ? width - len : 0) + k;
        ++k;
        index[slot] = static_cast<int32_t>(s == 0 ? row : prev_slot[row]);
        source[slot] = static_cast<int32_t>(row);
        pos[slot] = p;
        slot_of[row] = slot;
      }
    }
    (void)T;
    e.index.push_back(index);
    e.source.push_back(source);
    e.pos.push_back(pos);
    e.cu.push_back(cu);
    e.tokens.push_back(cu.back());
    e.max_len.push_back(longest);
    prev_slot = slot_of;
  }
  return e;
}

// Buffers of one plan call.
struct PlanBuffers {
  std::vector<int32_t> workspace, index, source, cu, summary;
  std::vector<int64_t> pos;
};

adsc::PlanParams make_params(const Batch& batch, const adsc::Schedule& sched, bool use_spans,
                             std::vector<int64_t>* spans, PlanBuffers* buf, int grid_h, int grid_w) {
  adsc::PlanParams p;
  p.layout = batch.padded ? adsc::Layout::kPadded : adsc::Layout::kPacked;
  p.num_tokens = batch.T();
  p.batch_size = batch.B();
  p.padded_len = batch.S;
  p.cu_seqlens = batch.padded ? nullptr : batch.cu.data();
  p.mask = batch.padded ? batch.mask.data() : nullptr;
  p.mask_type = adsc::MaskType::kUInt8;
  if (use_spans) {
    // Five columns (with the newline flag) as soon as one image has newline tokens.
    bool newline = false;
    for (const Image& im : batch.images) newline |= im.nl != 0;
    spans->clear();
    for (const Image& im : batch.images) {
      spans->insert(spans->end(), {im.seq, im.start, im.h, im.w});
      if (newline) spans->push_back(im.nl);
    }
    p.spans = spans->data();
    p.num_spans = static_cast<int64_t>(batch.images.size());
    p.span_columns = newline ? 5 : 4;
  } else {
    p.input_ids = batch.ids.data();
    p.image_token_id = kImageId;
    p.grid_h = grid_h;
    p.grid_w = grid_w;
  }
  p.num_steps = sched.num_steps;
  for (int i = 0; i < sched.num_steps; ++i) p.factors[i] = sched.factors[i];
  p.pad_left = batch.pad_left;
  const int64_t T = batch.T(), stages = sched.num_steps + 1;
  buf->workspace.assign(std::max<int64_t>(1, adsc::plan_workspace_size(T, sched.num_steps)), -99);
  buf->index.assign(std::max<int64_t>(1, stages * T), -99);
  buf->source.assign(std::max<int64_t>(1, stages * T), -99);
  buf->pos.assign(std::max<int64_t>(1, stages * T), -99);
  buf->cu.assign(stages * (batch.B() + 1), -99);
  buf->summary.assign(adsc::plan_summary_size(sched.num_steps), -99);
  p.workspace = buf->workspace.data();
  p.index = buf->index.data();
  p.source_index = buf->source.data();
  p.position_ids = buf->pos.data();
  p.cu_seqlens_out = buf->cu.data();
  p.summary = buf->summary.data();
  return p;
}

// Compares the used part of every stage with the oracle.
bool matches(const PlanBuffers& buf, const Expected& e, const Batch& batch) {
  const int64_t T = batch.T(), B = batch.B();
  bool ok = true;
  for (size_t s = 0; s < e.index.size(); ++s) {
    ok &= buf.summary[adsc::summary_tokens(static_cast<int>(s))] == e.tokens[s];
    ok &= buf.summary[adsc::summary_max_len(static_cast<int>(s))] == e.max_len[s];
    for (int64_t b = 0; b <= B; ++b) ok &= buf.cu[s * (B + 1) + b] == e.cu[s][b];
    for (size_t j = 0; j < e.index[s].size(); ++j) {
      ok &= buf.index[s * T + j] == e.index[s][j];
      ok &= buf.source[s * T + j] == e.source[s][j];
      ok &= buf.pos[s * T + j] == e.pos[s][j];
    }
  }
  return ok;
}

// A random batch: sequences of text and whole images of grid (gh, gw), some empty.
Batch random_batch(Rng& rng, bool padded, bool pad_left, int gh, int gw, int max_seqs) {
  Batch batch;
  batch.padded = padded;
  batch.pad_left = pad_left;
  const int B = rng.uniform(1, max_seqs);
  std::vector<std::vector<int64_t>> seqs(B);
  for (int b = 0; b < B; ++b) {
    const int pieces = rng.uniform(0, 4);
    for (int k = 0; k < pieces; ++k) {
      if (rng.uniform(0, 2) == 0) {
        const int n = rng.uniform(1, 2);  // one or two images back to back
        batch.images.push_back({b, static_cast<int64_t>(seqs[b].size()), gh, gw});
        if (n == 2) batch.images.push_back({b, static_cast<int64_t>(seqs[b].size()) + gh * gw, gh, gw});
        for (int i = 0; i < n * gh * gw; ++i) seqs[b].push_back(kImageId);
      } else {
        const int n = rng.uniform(1, 5);
        for (int i = 0; i < n; ++i) seqs[b].push_back(100 + rng.uniform(0, 50));
      }
    }
  }
  batch.rows.resize(B);
  if (!padded) {
    batch.cu.push_back(0);
    for (int b = 0; b < B; ++b) {
      for (size_t p = 0; p < seqs[b].size(); ++p) {
        batch.rows[b].push_back(batch.T());
        batch.ids.push_back(seqs[b][p]);
      }
      batch.cu.push_back(static_cast<int32_t>(batch.T()));
    }
  } else {
    size_t longest = 0;
    for (auto& s : seqs) longest = std::max(longest, s.size());
    batch.S = static_cast<int64_t>(longest) + rng.uniform(0, 2);
    for (int b = 0; b < B; ++b) {
      const int64_t pad = batch.S - static_cast<int64_t>(seqs[b].size());
      const bool left = rng.uniform(0, 1) == 0;  // input padding side varies per row
      for (int64_t j = 0; j < batch.S; ++j) {
        const int64_t p = left ? j - pad : j;
        const bool real = p >= 0 && p < static_cast<int64_t>(seqs[b].size());
        batch.mask.push_back(real);
        batch.ids.push_back(real ? seqs[b][p] : 0);
        if (real) batch.rows[b].push_back(b * batch.S + j);
      }
    }
  }
  return batch;
}

bool run_and_compare(const Batch& batch, const char* sched_text, bool use_spans, int gh, int gw) {
  const adsc::Schedule sched = parse(sched_text);
  PlanBuffers buf;
  std::vector<int64_t> spans;
  adsc::PlanParams p = make_params(batch, sched, use_spans, &spans, &buf, gh, gw);
  const adsc::Status st = adsc::plan_cpu(p);
  if (st != adsc::Status::kOk) {
    std::fprintf(stderr, "plan_cpu failed: %s\n", adsc::last_error());
    return false;
  }
  return matches(buf, naive_plan(batch, sched), batch);
}

// ---- Test cases -------------------------------------------------------------------------------

void schedule_parse() {
  adsc::Schedule s = parse("8:2,16:2,24:2");
  CHECK(s.num_steps == 3 && s.layers[0] == 8 && s.layers[2] == 24 && s.factors[1] == 2);
  char text[64];
  CHECK_OK(adsc::format_schedule(s, text, sizeof(text)));
  CHECK(std::string(text) == "8:2,16:2,24:2");
  CHECK(parse("").num_steps == 0);
  CHECK(parse("   ").num_steps == 0);
  s = parse(" 1 : 4 , 3:2 ");
  CHECK(s.num_steps == 2 && s.layers[0] == 1 && s.factors[0] == 4 && s.layers[1] == 3);
  CHECK_FAILS(adsc::format_schedule(parse("8:2,16:2"), text, 5), adsc::Status::kInvalidArgument,
              "too small");
}

void schedule_errors() {
  adsc::Schedule s;
  const adsc::Status bad = adsc::Status::kInvalidArgument;
  CHECK_FAILS(adsc::parse_schedule("8:3", &s), bad, "factor must be 2 or 4, got 3");
  CHECK_FAILS(adsc::parse_schedule("0:2", &s), bad, "layer must be >= 1");
  CHECK_FAILS(adsc::parse_schedule("8:2,8:2", &s), bad, "strictly increasing, got 8 after 8");
  CHECK_FAILS(adsc::parse_schedule("16:2,8:2", &s), bad, "strictly increasing");
  CHECK_FAILS(adsc::parse_schedule("8", &s), bad, "expected 'layer:factor'");
  CHECK_FAILS(adsc::parse_schedule("a:2", &s), bad, "bad schedule item 0 'a:2'");
  CHECK_FAILS(adsc::parse_schedule("8:2,", &s), bad, "bad schedule item 1");
  CHECK_FAILS(adsc::parse_schedule("-1:2", &s), bad, "expected 'layer:factor'");
  CHECK_FAILS(adsc::parse_schedule("8:2;16:2", &s), bad, "expected 'layer:factor'");
  CHECK_FAILS(adsc::parse_schedule("99999999999:2", &s), bad, "expected 'layer:factor'");
  CHECK_FAILS(adsc::parse_schedule(nullptr, &s), bad, "must not be null");
  std::string many;
  for (int i = 1; i <= adsc::kMaxSteps + 1; ++i) many += (i > 1 ? "," : "") + std::to_string(i) + ":2";
  CHECK_FAILS(adsc::parse_schedule(many.c_str(), &s), bad, "more than 16 steps");
}

void schedule_validate() {
  int hs[adsc::kMaxSteps + 1], ws[adsc::kMaxSteps + 1];
  CHECK_OK(adsc::validate_schedule(parse("8:2,16:2,24:2"), 32, 24, 24, hs, ws));
  CHECK(hs[0] == 24 && ws[0] == 24 && hs[1] == 24 && ws[1] == 12 && hs[2] == 12 && ws[2] == 12 &&
        hs[3] == 12 && ws[3] == 6);
  CHECK_OK(adsc::validate_schedule(parse("1:4"), 2, 7, 5, hs, ws));
  CHECK(hs[1] == 4 && ws[1] == 3);
  const adsc::Status bad = adsc::Status::kInvalidArgument;
  CHECK_FAILS(adsc::validate_schedule(parse("8:2,32:2"), 32, 24, 24, nullptr, nullptr), bad,
              "need 1 <= layer < 32");
  CHECK_FAILS(adsc::validate_schedule(parse("1:2,2:2"), 8, 1, 2, nullptr, nullptr), bad,
              "halve a side of length 1");
  CHECK_FAILS(adsc::validate_schedule(parse("1:4"), 8, 1, 4, nullptr, nullptr), bad,
              "cannot downsample a 1x4 grid");
  CHECK_FAILS(adsc::validate_schedule(parse(""), 0, 2, 2, nullptr, nullptr), bad, "num_layers");
}

void plan_worked_example() {
  // Spec section 4: an 8x8 image at positions 3..66, schedule 2:2,4:2,6:2.
  Batch batch;
  batch.cu = {0, 70};
  batch.rows.resize(1);
  for (int64_t t = 0; t < 70; ++t) {
    batch.ids.push_back(t >= 3 && t <= 66 ? kImageId : 1);
    batch.rows[0].push_back(t);
  }
  batch.images.push_back({0, 3, 8, 8});
  const adsc::Schedule sched = parse("2:2,4:2,6:2");
  PlanBuffers buf;
  std::vector<int64_t> spans;
  adsc::PlanParams p = make_params(batch, sched, false, &spans, &buf, 8, 8);
  CHECK_OK(adsc::plan_cpu(p));
  const int64_t want[] = {0, 1, 2, 14, 18, 30, 34, 46, 50, 62, 66, 67, 68, 69};
  CHECK(buf.summary[adsc::summary_tokens(3)] == 14);
  for (int i = 0; i < 14; ++i) CHECK(buf.pos[3 * 70 + i] == want[i]);
  CHECK(buf.summary[adsc::summary_tokens(1)] == 6 + 32);
  CHECK(buf.summary[adsc::summary_tokens(2)] == 6 + 16);
  CHECK(matches(buf, naive_plan(batch, sched), batch));
}

void plan_packed_batch() {
  Rng rng(1);
  const char* scheds[] = {"1:2", "1:4", "1:2,2:2,3:2", "2:4,3:2", ""};
  const int grids[][2] = {{2, 2}, {4, 4}, {7, 5}, {5, 7}, {3, 2}, {6, 6}};
  for (int trial = 0; trial < 60; ++trial) {
    const int* g = grids[trial % 6];
    const char* sc = scheds[trial % 5];
    adsc::Schedule s = parse(sc);
    if (!adsc::grid_fits(g[0], g[1], s.factors, s.num_steps)) continue;
    Batch batch = random_batch(rng, false, true, g[0], g[1], 5);
    CHECK(run_and_compare(batch, sc, false, g[0], g[1]));
    CHECK(run_and_compare(batch, sc, true, g[0], g[1]));
  }
}

void plan_padded_left_right() {
  Rng rng(2);
  for (int trial = 0; trial < 60; ++trial) {
    const bool left = trial % 2 == 0;
    Batch batch = random_batch(rng, true, left, 3, 5, 4);
    CHECK(run_and_compare(batch, "1:2,2:4", false, 3, 5));
    CHECK(run_and_compare(batch, "1:2", true, 3, 5));
  }
  // Padding inside a row has no position: it neither splits nor ends an image run.
  Batch holes;
  holes.padded = true;
  holes.S = 7;
  holes.mask = {1, 1, 0, 1, 0, 1, 1};
  holes.ids = {kImageId, kImageId, 0, kImageId, 0, kImageId, 3};
  holes.rows = {{0, 1, 3, 5, 6}};
  holes.images = {{0, 0, 2, 2}};
  CHECK(run_and_compare(holes, "1:2", false, 2, 2));
}

void plan_spans() {
  // Images of different grids in one batch, given as spans (ids are ignored).
  Batch batch;
  batch.cu = {0, 40, 40, 75};
  batch.rows.resize(3);
  for (int64_t t = 0; t < 75; ++t) {
    batch.ids.push_back(0);
    batch.rows[t < 40 ? 0 : 2].push_back(t);
  }
  batch.images = {{0, 1, 7, 5}, {0, 36, 2, 2}, {2, 0, 3, 1}, {2, 3, 4, 8}};
  CHECK(run_and_compare(batch, "1:2,2:2", true, 0, 0));
}

// A batch of spans with their own grids (as Qwen2-VL and LLaVA-NeXT give them), some with a
// newline token after every grid row, in sequences of text.
Batch random_span_batch(Rng& rng, bool padded, bool pad_left, int max_seqs, int newline_percent) {
  Batch batch;
  batch.padded = padded;
  batch.pad_left = pad_left;
  const int B = rng.uniform(1, max_seqs);
  std::vector<int64_t> lens(B, 0);
  for (int b = 0; b < B; ++b) {
    for (int k = rng.uniform(0, 4); k > 0; --k) {
      if (rng.uniform(0, 1) == 0) {
        Image im{b, lens[b], rng.uniform(2, 7), rng.uniform(2, 7), 0};
        im.nl = rng.uniform(0, 99) < newline_percent ? 1 : 0;
        batch.images.push_back(im);
        lens[b] += im.tokens();
      } else {
        lens[b] += rng.uniform(1, 4);
      }
    }
  }
  batch.rows.resize(B);
  int64_t S = 0;
  for (int64_t n : lens) S = std::max(S, n);
  if (padded) batch.S = S + rng.uniform(0, 2);
  if (!padded) batch.cu.push_back(0);
  for (int b = 0; b < B; ++b) {
    if (!padded) {
      for (int64_t p = 0; p < lens[b]; ++p) {
        batch.rows[b].push_back(batch.T());
        batch.ids.push_back(1);
      }
      batch.cu.push_back(static_cast<int32_t>(batch.T()));
    } else {
      const int64_t pad = batch.S - lens[b];
      for (int64_t j = 0; j < batch.S; ++j) {
        const bool real = pad_left ? j >= pad : j < lens[b];
        batch.mask.push_back(real);
        batch.ids.push_back(1);
        if (real) batch.rows[b].push_back(b * batch.S + j);
      }
    }
  }
  return batch;
}

void plan_newline_spans() {
  // Spec section 3: a newline belongs to its row. A 2x3 grid + newlines at positions 1..8 of a
  // 10-token sequence: row 0 = 1 2 3 [4], row 1 = 5 6 7 [8].
  Batch batch;
  batch.cu = {0, 10};
  batch.rows = {{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}};
  batch.ids.assign(10, 1);
  batch.images = {{0, 1, 2, 3, 1}};
  struct Case { const char* schedule; std::vector<int64_t> last; };
  const Case cases[] = {
      {"1:2", {0, 2, 3, 4, 6, 7, 8, 9}},   // width 3 halved: columns 1, 2 and both newlines
      {"1:2,2:2", {0, 3, 4, 7, 8, 9}},     // 2x2 -> width again: column 2
      {"1:2,2:2,3:2", {0, 7, 8, 9}},       // 2x1 -> rows: row 1 and its newline
      {"1:4", {0, 6, 7, 8, 9}},            // both sides: row 1, columns 1 and 2, newline
  };
  for (const Case& c : cases) {
    const adsc::Schedule sched = parse(c.schedule);
    PlanBuffers buf;
    std::vector<int64_t> spans;
    adsc::PlanParams p = make_params(batch, sched, true, &spans, &buf, 0, 0);
    CHECK(p.span_columns == 5 && spans.size() == 5);
    CHECK_OK(adsc::plan_cpu(p));
    const int last = sched.num_steps;
    CHECK(buf.summary[adsc::summary_tokens(last)] == static_cast<int32_t>(c.last.size()));
    for (size_t i = 0; i < c.last.size(); ++i) CHECK(buf.pos[last * 10 + i] == c.last[i]);
    CHECK(matches(buf, naive_plan(batch, sched), batch));
  }
  // Mixed batches: newline and plain spans of many grids, packed and padded (both sides), against
  // the naive oracle; factor 4 included.
  Rng rng(11);
  const char* scheds[] = {"1:2", "1:4", "1:2,2:2", "2:4,3:2", ""};
  int compared = 0;
  for (int trial = 0; trial < 100; ++trial) {
    const char* sc = scheds[trial % 5];
    const adsc::Schedule sched = parse(sc);
    Batch b = random_span_batch(rng, trial % 3 != 0, trial % 2 == 0, 5, 50);
    bool fits = true;
    for (const Image& im : b.images)
      fits &= adsc::grid_fits(static_cast<int>(im.h), static_cast<int>(im.w), sched.factors,
                              sched.num_steps);
    if (!fits) continue;
    CHECK(run_and_compare(b, sc, true, 0, 0));
    ++compared;
  }
  CHECK(compared >= 50);
  // 1-wide grids: 2x1 + newline halves its rows (h > w); a second step would halve a side of 1.
  batch.images = {{0, 1, 2, 1, 1}};
  CHECK(run_and_compare(batch, "1:2", true, 0, 0));
  PlanBuffers buf;
  std::vector<int64_t> spans;
  adsc::PlanParams p = make_params(batch, parse("1:2,2:2"), true, &spans, &buf, 0, 0);
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidInput,
              "image span 0 has a 2x1 grid that the schedule cannot downsample");
}

void plan_newline_span_errors() {
  const adsc::Schedule sched = parse("1:2");
  Batch batch;
  batch.cu = {0, 3, 12};
  batch.rows.resize(2);
  batch.ids.assign(12, 1);
  PlanBuffers buf;
  std::vector<int64_t> spans;
  // 2x3 + newlines = 8 tokens: fits the 9 of sequence 1 from position 1, not from position 2.
  batch.images = {{1, 2, 2, 3, 1}};
  adsc::PlanParams p = make_params(batch, sched, true, &spans, &buf, 0, 0);
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidInput,
              "image span 0 (sequence 1, start 2, 2x3 with a newline token per row) does not fit");
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidInput,
              "start + h*(w+1) <= the sequence's length (9)");
  CHECK(buf.summary[0] == adsc::kPlanSpanOutOfRange && buf.summary[7] == 1);
  batch.images = {{1, 1, 2, 3, 1}};
  p = make_params(batch, sched, true, &spans, &buf, 0, 0);
  CHECK_OK(adsc::plan_cpu(p));
  // The newline tokens count in the order check: a span inside the previous one's last newline.
  batch.images = {{1, 0, 2, 2, 1}, {1, 5, 1, 2, 0}};
  p = make_params(batch, sched, true, &spans, &buf, 0, 0);
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidInput,
              "span 1 starts at (sequence 1, position 5), before the end of the previous span "
              "(sequence 1, position 6)");
  // A newline flag other than 0 or 1.
  for (int64_t bad : {int64_t(2), int64_t(-1), INT64_MAX}) {
    batch.images = {{1, 0, 2, 2, bad}};
    p = make_params(batch, sched, true, &spans, &buf, 0, 0);
    char want[96];
    std::snprintf(want, sizeof(want), "image span 0 has newline = %lld: expected 0",
                  static_cast<long long>(bad));
    CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidInput, want);
    CHECK(buf.summary[0] == adsc::kPlanSpanNewline);
  }
  // Span columns other than 4 and 5 are an argument error.
  p = make_params(batch, sched, true, &spans, &buf, 0, 0);
  p.span_columns = 6;
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidArgument, "got span_columns=6");
  // int64 span fields are printed as they are (they went through int32), and the summary keeps
  // them saturated to int32: read back without the spans, they say so.
  batch.images = {{1, int64_t(1) << 40, 2, 2, 0}};
  p = make_params(batch, sched, true, &spans, &buf, 0, 0);
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidInput,
              "(sequence 1, start 1099511627776, 2x2)");
  CHECK(buf.summary[3] == INT32_MAX);
  CHECK_FAILS(adsc::plan_summary_status(buf.summary.data(), p), adsc::Status::kInvalidInput,
              "(sequence 1, start >= 2147483647, 2x2)");
  batch.images = {{-(int64_t(1) << 35), 0, int64_t(1) << 33, 3, 0}};
  p = make_params(batch, sched, true, &spans, &buf, 0, 0);
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidInput,
              "(sequence -34359738368, start 0, 8589934592x3)");
  CHECK_FAILS(adsc::plan_summary_status(buf.summary.data(), p), adsc::Status::kInvalidInput,
              "(sequence <= -2147483648, start 0, >= 2147483647x3)");
}

void plan_empty() {
  const adsc::Schedule sched = parse("1:2,2:2");
  for (int variant = 0; variant < 3; ++variant) {
    Batch batch;
    if (variant == 0) batch.cu = {0};                       // B = 0, packed
    if (variant == 1) { batch.cu = {0, 0, 0}; batch.rows.resize(2); }  // empty sequences
    if (variant == 2) { batch.padded = true; batch.rows.resize(2); }   // padded, S = 0
    PlanBuffers buf;
    std::vector<int64_t> spans;
    adsc::PlanParams p = make_params(batch, sched, false, &spans, &buf, 2, 2);
    CHECK_OK(adsc::plan_cpu(p));
    for (int s = 0; s < 3; ++s) CHECK(buf.summary[adsc::summary_tokens(s)] == 0);
    CHECK(matches(buf, naive_plan(batch, sched), batch));
  }
}

void plan_errors() {
  const adsc::Schedule sched = parse("1:2");
  Batch batch;
  batch.cu = {0, 3, 9};
  batch.rows.resize(2);
  batch.ids = {1, kImageId, kImageId, kImageId, kImageId, kImageId, kImageId, kImageId, 1};
  PlanBuffers buf;
  std::vector<int64_t> spans;
  adsc::PlanParams p = make_params(batch, sched, false, &spans, &buf, 2, 2);
  // sequence 1 holds a run of 4 (ok) but sequence 0 a run of 2 at position 1.
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidInput,
              "sequence 0: a run of 2 image tokens (id 7) at position 1 is not a whole number");

  batch.ids = {1, 1, 1, kImageId, kImageId, kImageId, kImageId, kImageId, 1};  // run of 5
  p = make_params(batch, sched, false, &spans, &buf, 2, 2);
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidInput, "a run of 5 image tokens");

  batch.ids.assign(9, 1);
  batch.cu = {0, 5, 4};
  p = make_params(batch, sched, false, &spans, &buf, 2, 2);
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidInput, "cu_seqlens[1]=5, cu_seqlens[2]=4");
  batch.cu = {0, 3, 8};
  p = make_params(batch, sched, false, &spans, &buf, 2, 2);
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidInput, "end at the number of tokens (9)");

  batch.cu = {0, 3, 9};
  batch.images = {{1, 4, 2, 2}};  // ends at 8 > 6
  p = make_params(batch, sched, true, &spans, &buf, 0, 0);
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidInput, "image span 0 (sequence 1, start 4, 2x2) does not fit");
  batch.images = {{2, 0, 1, 2}};
  p = make_params(batch, sched, true, &spans, &buf, 0, 0);
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidInput, "0 <= sequence < 2");
  batch.images = {{1, 2, 1, 2}, {1, 0, 1, 2}};
  p = make_params(batch, sched, true, &spans, &buf, 0, 0);
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidInput, "must be sorted");
  batch.images = {{1, 0, 1, 3}, {1, 2, 1, 2}};  // overlap
  p = make_params(batch, sched, true, &spans, &buf, 0, 0);
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidInput, "must not overlap");
  // A start so large that start + h*w would wrap must not slip through the range and order checks.
  batch.images = {{1, INT64_MAX - 2, 2, 2}, {1, 0, 2, 2}};
  p = make_params(batch, sched, true, &spans, &buf, 0, 0);
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidInput, "image span 0");
  batch.images = {{1, 0, 2, 2}, {1, INT64_MAX - 2, 2, 2}};
  p = make_params(batch, sched, true, &spans, &buf, 0, 0);
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidInput, "image span 1");
  batch.images = {{1, 0, 2, 1}};  // 2x1: factor 2 halves rows (h > w): fine; 1x1 is not
  p = make_params(batch, sched, true, &spans, &buf, 0, 0);
  CHECK_OK(adsc::plan_cpu(p));
  batch.images = {{1, 0, 1, 1}};
  p = make_params(batch, sched, true, &spans, &buf, 0, 0);
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidInput, "1x1 grid that the schedule cannot");

  // Argument errors.
  p = make_params(batch, sched, false, &spans, &buf, 1, 1);
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidArgument, "cannot downsample a 1x1");
  p = make_params(batch, sched, false, &spans, &buf, 2, 2);
  p.spans = spans.data();
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidArgument, "not both");
  p = make_params(batch, sched, false, &spans, &buf, 2, 2);
  p.index = nullptr;
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidArgument, "must not be null");
  p = make_params(batch, sched, false, &spans, &buf, 2, 2);
  p.cu_seqlens = nullptr;
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidArgument, "needs cu_seqlens");
  p = make_params(batch, sched, false, &spans, &buf, 2, 2);
  p.factors[0] = 3;
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidArgument, "factor 3");
  p = make_params(batch, sched, false, &spans, &buf, 2, 2);
  p.layout = adsc::Layout::kPadded;
  p.padded_len = 4;
  CHECK_FAILS(adsc::plan_cpu(p), adsc::Status::kInvalidArgument, "needs num_tokens = 8, got 9");
}

template <typename Index>
void check_gather(int64_t row_bytes, int64_t src_stride, int64_t dst_stride, Rng& rng) {
  const int64_t src_rows = 13, dst_rows = 9;
  std::vector<uint8_t> src(src_rows * src_stride), dst(dst_rows * dst_stride, 0xAB);
  for (auto& v : src) v = static_cast<uint8_t>(rng.next());
  std::vector<Index> index(dst_rows);
  for (auto& i : index) i = static_cast<Index>(rng.uniform(-1, src_rows - 1));
  adsc::CompactTokensParams p;
  p.src = src.data(); p.src_rows = src_rows; p.src_row_stride = src_stride;
  p.dst = dst.data(); p.dst_rows = dst_rows; p.dst_row_stride = dst_stride;
  p.row_bytes = row_bytes; p.index = index.data(); p.index_is_int64 = sizeof(Index) == 8;
  CHECK_OK(adsc::compact_tokens_cpu(p));
  for (int64_t i = 0; i < dst_rows; ++i)
    for (int64_t k = 0; k < dst_stride; ++k) {
      const uint8_t got = dst[i * dst_stride + k];
      if (k >= row_bytes) CHECK(got == 0xAB);  // gap between rows untouched
      else if (index[i] < 0) CHECK(got == 0);
      else CHECK(got == src[index[i] * src_stride + k]);
    }
}

void compact_tokens_rows() {
  Rng rng(3);
  for (int64_t row_bytes : {1, 3, 8, 16, 40, 4096}) {
    check_gather<int32_t>(row_bytes, row_bytes, row_bytes, rng);
    check_gather<int64_t>(row_bytes, row_bytes + 5, row_bytes + 16, rng);
  }
}

void compact_errors() {
  std::vector<float> src(4 * 2, 1.f), dst(3 * 2, 5.f);
  std::vector<int32_t> index = {0, -1, 4};
  adsc::CompactTokensParams p;
  p.src = src.data(); p.src_rows = 4; p.src_row_stride = 8;
  p.dst = dst.data(); p.dst_rows = 3; p.dst_row_stride = 8; p.row_bytes = 8;
  p.index = index.data();
  CHECK_FAILS(adsc::compact_tokens_cpu(p), adsc::Status::kIndexOutOfRange,
              "index[2] = 4 is out of range: expected -1 (padding) or 0 <= index < 4");
  for (float v : dst) CHECK(v == 5.f);  // nothing written
  index[2] = -2;
  CHECK_FAILS(adsc::compact_tokens_cpu(p), adsc::Status::kIndexOutOfRange, "index[2] = -2");
  index[2] = 3;
  p.src_row_stride = 4;
  CHECK_FAILS(adsc::compact_tokens_cpu(p), adsc::Status::kInvalidArgument, "at least the row size");
  p.src_row_stride = 8;
  p.index = nullptr;
  CHECK_FAILS(adsc::compact_tokens_cpu(p), adsc::Status::kInvalidArgument, "index must not be null");
  p.index = index.data();
  p.dst_rows = -1;
  CHECK_FAILS(adsc::compact_tokens_cpu(p), adsc::Status::kInvalidArgument, "sizes must be >= 0");
}

void scatter_add() {
  // Every finite half value survives 0 + x unchanged (the converters round trip exactly).
  std::vector<uint16_t> halves, zeros;
  std::vector<int32_t> index;
  for (uint32_t h = 0; h < 65536; ++h) {
    const bool nan = (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0;
    if (nan || h == 0x8000u) continue;  // NaN payloads get quieted; 0 + -0 = +0
    halves.push_back(static_cast<uint16_t>(h));
    index.push_back(static_cast<int32_t>(index.size()));
  }
  for (adsc::DType dt : {adsc::DType::kFloat16, adsc::DType::kBFloat16}) {
    zeros.assign(halves.size(), 0);
    adsc::ScatterAddRowsParams p;
    p.src = halves.data(); p.src_rows = static_cast<int64_t>(halves.size()); p.src_row_stride = 1;
    p.dst = zeros.data(); p.dst_rows = p.src_rows; p.dst_row_stride = 1; p.row_elems = 1;
    p.dtype = dt; p.index = index.data();
    CHECK_OK(adsc::scatter_add_rows_cpu(p));
    bool same = true;
    for (size_t i = 0; i < halves.size(); ++i) {
      const bool bf_nan = dt == adsc::DType::kBFloat16 && (halves[i] & 0x7f80u) == 0x7f80u &&
                          (halves[i] & 0x7fu) != 0;
      if (!bf_nan) same &= zeros[i] == halves[i];
    }
    CHECK(same);
  }
  // Duplicates accumulate; -1 rows are skipped.
  std::vector<float> src = {1, 2, 3, 4, 5, 6, 7, 8}, dst(6, 0.f);
  std::vector<int64_t> idx = {2, -1, 2, 0};
  adsc::ScatterAddRowsParams p;
  p.src = src.data(); p.src_rows = 4; p.src_row_stride = 2;
  p.dst = dst.data(); p.dst_rows = 3; p.dst_row_stride = 2; p.row_elems = 2;
  p.index = idx.data(); p.index_is_int64 = true;
  CHECK_OK(adsc::scatter_add_rows_cpu(p));
  const float want[] = {7, 8, 0, 0, 1 + 5, 2 + 6};
  for (int i = 0; i < 6; ++i) CHECK(dst[i] == want[i]);
  idx[1] = 3;
  CHECK_FAILS(adsc::scatter_add_rows_cpu(p), adsc::Status::kIndexOutOfRange, "index[1] = 3");
}

// ---- Paged KV writes --------------------------------------------------------------------------

// A paged-KV case: caches [num_blocks, block_size, heads, dim] of `elem` bytes per value, keys and
// values [T, heads, dim] at a token stride of `pad` extra bytes, and a slot mapping that gives
// every token a distinct slot (as block tables do) or -1.
struct PagedCase {
  int64_t num_blocks, block_size, row_bytes, key_stride, value_stride, T;
  std::vector<uint8_t> key, value, key_cache, value_cache;
  std::vector<int64_t> slots;
};

PagedCase random_paged_case(Rng& rng, int64_t num_blocks, int64_t block_size, int64_t heads,
                            int64_t dim, int64_t elem, int64_t pad) {
  PagedCase c;
  c.num_blocks = num_blocks; c.block_size = block_size;
  c.row_bytes = heads * dim * elem;
  c.key_stride = c.row_bytes + pad;
  c.value_stride = c.row_bytes + 2 * pad;
  const int64_t slots = num_blocks * block_size;
  std::vector<int64_t> free_slots;
  for (int64_t s = 0; s < slots; ++s) free_slots.push_back(s);
  for (int64_t i = slots - 1; i > 0; --i) std::swap(free_slots[i], free_slots[rng.uniform(0, static_cast<int>(i))]);
  c.T = std::min<int64_t>(slots, 3 + rng.uniform(0, static_cast<int>(slots)));
  for (int64_t t = 0; t < c.T; ++t) c.slots.push_back(rng.uniform(0, 4) == 0 ? -1 : free_slots[t]);
  c.key.resize(c.T * c.key_stride);
  c.value.resize(c.T * c.value_stride);
  c.key_cache.resize(slots * c.row_bytes);
  c.value_cache.resize(slots * c.row_bytes);
  for (auto* v : {&c.key, &c.value, &c.key_cache, &c.value_cache})
    for (auto& b : *v) b = static_cast<uint8_t>(rng.next());
  return c;
}

adsc::PagedKVParams paged_params(PagedCase& c, const void* key, const void* value, void* kc, void* vc,
                                 const int64_t* slots) {
  adsc::PagedKVParams p;
  p.key = key; p.value = value; p.key_stride = c.key_stride; p.value_stride = c.value_stride;
  p.key_cache = kc; p.value_cache = vc; p.cache_stride = c.row_bytes;
  p.num_tokens = c.T; p.num_slots = c.num_blocks * c.block_size; p.row_bytes = c.row_bytes;
  p.slot_mapping = slots;
  return p;
}

// The oracle, written from the layout: slot s = block * block_size + offset is cache[block][offset].
void naive_paged_write(const PagedCase& c, std::vector<uint8_t>* kc, std::vector<uint8_t>* vc) {
  for (int64_t t = 0; t < c.T; ++t) {
    if (c.slots[t] < 0) continue;
    const int64_t block = c.slots[t] / c.block_size, offset = c.slots[t] % c.block_size;
    const int64_t at = (block * c.block_size + offset) * c.row_bytes;
    for (int64_t k = 0; k < c.row_bytes; ++k) {
      (*kc)[at + k] = c.key[t * c.key_stride + k];
      (*vc)[at + k] = c.value[t * c.value_stride + k];
    }
  }
}

void paged_kv() {
  Rng rng(8);
  for (int trial = 0; trial < 30; ++trial) {
    const int64_t block_size = std::vector<int64_t>{1, 2, 16}[trial % 3];
    const int64_t heads = 1 + trial % 3, dim = std::vector<int64_t>{1, 3, 8, 64}[trial % 4];
    const int64_t elem = std::vector<int64_t>{1, 2, 4}[trial % 3], pad = trial % 2 ? 6 : 0;
    PagedCase c = random_paged_case(rng, 1 + trial % 5, block_size, heads, dim, elem, pad);
    std::vector<uint8_t> want_k = c.key_cache, want_v = c.value_cache;
    naive_paged_write(c, &want_k, &want_v);
    CHECK_OK(adsc::write_paged_kv_cpu(
        paged_params(c, c.key.data(), c.value.data(), c.key_cache.data(), c.value_cache.data(), c.slots.data())));
    CHECK(c.key_cache == want_k);
    CHECK(c.value_cache == want_v);
  }
  // A slot out of range: reported, nothing written.
  PagedCase c = random_paged_case(rng, 2, 4, 2, 8, 2, 0);
  const std::vector<uint8_t> before = c.key_cache;
  c.slots.back() = c.num_blocks * c.block_size;
  CHECK_FAILS(adsc::write_paged_kv_cpu(paged_params(c, c.key.data(), c.value.data(), c.key_cache.data(),
                                                    c.value_cache.data(), c.slots.data())),
              adsc::Status::kIndexOutOfRange, "is out of range");
  CHECK(c.key_cache == before);
}

// ---- CUDA -------------------------------------------------------------------------------------

#if defined(ADSC_WITH_CUDA)
bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

template <typename T>
T* to_device(const std::vector<T>& v) {
  T* d = nullptr;
  cudaMalloc(&d, std::max<size_t>(1, v.size()) * sizeof(T));
  if (!v.empty()) cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

template <typename T>
std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> v(n);
  if (n) cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
  return v;
}

// Runs plan_cuda on the batch and checks it against plan_cpu, buffer for buffer.
bool cuda_plan_equals_cpu(const Batch& batch, const char* sched_text, bool use_spans, int gh, int gw) {
  const adsc::Schedule sched = parse(sched_text);
  PlanBuffers host;
  std::vector<int64_t> spans;
  adsc::PlanParams hp = make_params(batch, sched, use_spans, &spans, &host, gh, gw);
  const adsc::Status cpu_status = adsc::plan_cpu(hp);
  adsc::PlanParams dp = hp;
  std::vector<int32_t> cu = batch.cu.empty() ? std::vector<int32_t>{0} : batch.cu;
  int32_t* d_cu = to_device(cu);
  uint8_t* d_mask = to_device(batch.mask);
  int64_t* d_ids = to_device(batch.ids);
  int64_t* d_spans = to_device(spans);
  PlanBuffers dev_init;
  make_params(batch, sched, use_spans, &spans, &dev_init, gh, gw);
  int32_t* d_ws = to_device(dev_init.workspace);
  int32_t* d_index = to_device(dev_init.index);
  int32_t* d_source = to_device(dev_init.source);
  int64_t* d_pos = to_device(dev_init.pos);
  int32_t* d_cu_out = to_device(dev_init.cu);
  int32_t* d_summary = to_device(dev_init.summary);
  dp.cu_seqlens = batch.padded ? nullptr : d_cu;
  dp.mask = batch.padded ? d_mask : nullptr;
  if (!use_spans) dp.input_ids = d_ids; else dp.spans = d_spans;
  dp.workspace = d_ws; dp.index = d_index; dp.source_index = d_source; dp.position_ids = d_pos;
  dp.cu_seqlens_out = d_cu_out; dp.summary = d_summary;
  bool ok = adsc::plan_cuda(dp, nullptr) == adsc::Status::kOk && cudaDeviceSynchronize() == cudaSuccess;
  const auto summary = to_host(d_summary, host.summary.size());
  ok &= summary[0] == host.summary[0];
  if (cpu_status == adsc::Status::kOk) {
    ok &= summary == host.summary;
    ok &= to_host(d_cu_out, host.cu.size()) == host.cu;
    const int64_t T = batch.T();
    const auto index = to_host(d_index, host.index.size());
    const auto source = to_host(d_source, host.source.size());
    const auto pos = to_host(d_pos, host.pos.size());
    for (int s = 0; s <= sched.num_steps; ++s) {
      const int64_t used = batch.padded ? batch.B() * (s == 0 ? batch.S : summary[adsc::summary_max_len(s)])
                                        : summary[adsc::summary_tokens(s)];
      for (int64_t j = 0; j < used; ++j) {
        ok &= index[s * T + j] == host.index[s * T + j];
        ok &= source[s * T + j] == host.source[s * T + j];
        ok &= pos[s * T + j] == host.pos[s * T + j];
      }
    }
  }
  for (void* ptr : {static_cast<void*>(d_cu), static_cast<void*>(d_mask), static_cast<void*>(d_ids),
                    static_cast<void*>(d_spans), static_cast<void*>(d_ws), static_cast<void*>(d_index),
                    static_cast<void*>(d_source), static_cast<void*>(d_pos),
                    static_cast<void*>(d_cu_out), static_cast<void*>(d_summary)})
    cudaFree(ptr);
  return ok;
}
#endif

int cuda_plan_matches_cpu() {
#if defined(ADSC_WITH_CUDA)
  if (!have_gpu()) return 77;
  Rng rng(4);
  for (int trial = 0; trial < 40; ++trial) {
    Batch packed = random_batch(rng, false, true, 3, 5, 6);
    CHECK(cuda_plan_equals_cpu(packed, "1:2,2:4", false, 3, 5));
    CHECK(cuda_plan_equals_cpu(packed, "1:2", true, 3, 5));
    Batch padded = random_batch(rng, true, trial % 2 == 0, 4, 4, 6);
    CHECK(cuda_plan_equals_cpu(padded, "1:2,2:2,3:2", false, 4, 4));
    // Spans of their own grids, half of them with newline tokens (5 columns).
    Batch spans = random_span_batch(rng, trial % 3 == 0, trial % 2 == 0, 6, 50);
    CHECK(cuda_plan_equals_cpu(spans, trial % 2 ? "1:2" : "1:4", true, 0, 0));
  }
  // Span errors (a bad newline flag among them) are the same first error on both.
  Batch bad_spans = random_span_batch(rng, false, true, 4, 100);
  if (!bad_spans.images.empty()) {
    bad_spans.images.back().nl = 3;
    CHECK(cuda_plan_equals_cpu(bad_spans, "1:2", true, 0, 0));
  }
  // Large enough to cross many 1024-token chunks: 64 sequences of ~2 LLaVA images.
  Rng big(5);
  Batch large = random_batch(big, false, true, 24, 24, 64);
  CHECK(cuda_plan_equals_cpu(large, "8:2,16:2,24:2", false, 24, 24));
  // A data error is reported in the summary the same way.
  Batch bad = random_batch(big, false, true, 2, 2, 3);
  bad.ids.push_back(kImageId);
  bad.cu.back() += 1;
  CHECK(cuda_plan_equals_cpu(bad, "1:2", false, 2, 2));
  return 0;
#else
  return 77;
#endif
}

int cuda_gather_matches_cpu() {
#if defined(ADSC_WITH_CUDA)
  if (!have_gpu()) return 77;
  Rng rng(6);
  for (int64_t row_bytes : {1, 2, 6, 16, 48, 8192}) {
    for (int64_t pad : {0, 8}) {
      const int64_t src_rows = 37, dst_rows = 29, stride = row_bytes + pad;
      std::vector<uint8_t> src(src_rows * stride), dst(dst_rows * stride, 0xCD);
      for (auto& v : src) v = static_cast<uint8_t>(rng.next());
      std::vector<int32_t> index(dst_rows);
      for (auto& i : index) i = rng.uniform(-1, src_rows - 1);
      adsc::CompactTokensParams p;
      p.src_rows = src_rows; p.src_row_stride = stride; p.dst_rows = dst_rows;
      p.dst_row_stride = stride; p.row_bytes = row_bytes;
      std::vector<uint8_t> want = dst;
      p.src = src.data(); p.dst = want.data(); p.index = index.data();
      CHECK_OK(adsc::compact_tokens_cpu(p));
      uint8_t* d_src = to_device(src);
      uint8_t* d_dst = to_device(dst);
      int32_t* d_index = to_device(index);
      int32_t* d_flag = to_device(std::vector<int32_t>{0});
      p.src = d_src; p.dst = d_dst; p.index = d_index;
      CHECK_OK(adsc::compact_tokens_cuda(p, d_flag, nullptr));
      CHECK(to_host(d_dst, dst.size()) == want);
      CHECK(to_host(d_flag, 1)[0] == 0);
      index[3] = static_cast<int32_t>(src_rows);  // out of range: zero row + flag
      cudaMemcpy(d_index, index.data(), index.size() * 4, cudaMemcpyHostToDevice);
      CHECK_OK(adsc::compact_tokens_cuda(p, d_flag, nullptr));
      CHECK(to_host(d_flag, 1)[0] == 1);
      const auto got = to_host(d_dst, dst.size());
      for (int64_t k = 0; k < row_bytes; ++k) CHECK(got[3 * stride + k] == 0);
      for (void* ptr : {static_cast<void*>(d_src), static_cast<void*>(d_dst),
                        static_cast<void*>(d_index), static_cast<void*>(d_flag)})
        cudaFree(ptr);
    }
  }
  return 0;
#else
  return 77;
#endif
}

int cuda_paged_kv_matches_cpu() {
#if defined(ADSC_WITH_CUDA)
  if (!have_gpu()) return 77;
  Rng rng(9);
  // Row sizes that take every vector width (1, 2, 4, 8, 16 bytes), padded strides included.
  for (int trial = 0; trial < 24; ++trial) {
    const int64_t dim = std::vector<int64_t>{1, 3, 4, 8, 64, 128}[trial % 6];
    const int64_t elem = std::vector<int64_t>{1, 2, 4}[trial % 3], pad = std::vector<int64_t>{0, 2, 16}[trial % 3];
    PagedCase c = random_paged_case(rng, 3, std::vector<int64_t>{1, 16, 256}[trial % 3], 2, dim, elem, pad);
    std::vector<uint8_t> want_k = c.key_cache, want_v = c.value_cache;
    CHECK_OK(adsc::write_paged_kv_cpu(
        paged_params(c, c.key.data(), c.value.data(), want_k.data(), want_v.data(), c.slots.data())));
    uint8_t* d_key = to_device(c.key);
    uint8_t* d_value = to_device(c.value);
    uint8_t* d_kc = to_device(c.key_cache);
    uint8_t* d_vc = to_device(c.value_cache);
    int64_t* d_slots = to_device(c.slots);
    int32_t* d_flag = to_device(std::vector<int32_t>{0});
    CHECK_OK(adsc::write_paged_kv_cuda(paged_params(c, d_key, d_value, d_kc, d_vc, d_slots), d_flag, nullptr));
    CHECK(cudaDeviceSynchronize() == cudaSuccess);
    CHECK(to_host(d_kc, want_k.size()) == want_k);
    CHECK(to_host(d_vc, want_v.size()) == want_v);
    CHECK(to_host(d_flag, 1)[0] == 0);
    // A slot out of range: that token is skipped and the flag raised.
    std::vector<int64_t> bad = c.slots;
    bad[0] = c.num_blocks * c.block_size + 5;
    cudaMemcpy(d_slots, bad.data(), bad.size() * 8, cudaMemcpyHostToDevice);
    cudaMemcpy(d_kc, c.key_cache.data(), c.key_cache.size(), cudaMemcpyHostToDevice);
    CHECK_OK(adsc::write_paged_kv_cuda(paged_params(c, d_key, d_value, d_kc, d_vc, d_slots), d_flag, nullptr));
    CHECK(to_host(d_flag, 1)[0] == 1);
    std::vector<uint8_t> want_bad = c.key_cache, unused = c.value_cache;
    bad[0] = -1;
    PagedCase skip = c;
    skip.slots = bad;
    naive_paged_write(skip, &want_bad, &unused);
    CHECK(to_host(d_kc, want_bad.size()) == want_bad);
    for (void* ptr : {static_cast<void*>(d_key), static_cast<void*>(d_value), static_cast<void*>(d_kc),
                      static_cast<void*>(d_vc), static_cast<void*>(d_slots), static_cast<void*>(d_flag)})
      cudaFree(ptr);
  }
  return 0;
#else
  return 77;
#endif
}

int cuda_scatter_add_matches_cpu() {
#if defined(ADSC_WITH_CUDA)
  if (!have_gpu()) return 77;
  Rng rng(10);
  // Small integer values: every sum is exact in every dtype, so the GPU's atomic order cannot
  // change the result and the comparison is bit for bit.
  const float kHalfOf[] = {-4, -3, -2, -1, 0, 1, 2, 3, 4};
  const uint16_t kHalfBits[] = {0xc400, 0xc200, 0xc000, 0xbc00, 0x0000, 0x3c00, 0x4000, 0x4200, 0x4400};
  const uint16_t kBf16Bits[] = {0xc080, 0xc040, 0xc000, 0xbf80, 0x0000, 0x3f80, 0x4000, 0x4040, 0x4080};
  for (adsc::DType dt : {adsc::DType::kFloat32, adsc::DType::kFloat64, adsc::DType::kFloat16, adsc::DType::kBFloat16}) {
    for (int64_t row_elems : {1, 7, 64}) {
      const int64_t src_rows = 41, dst_rows = 13, esize = dt == adsc::DType::kFloat64 ? 8 : dt == adsc::DType::kFloat32 ? 4 : 2;
      std::vector<uint8_t> src(src_rows * row_elems * esize), dst(dst_rows * row_elems * esize, 0);
      for (int64_t e = 0; e < src_rows * row_elems; ++e) {
        const int v = rng.uniform(0, 8);
        if (dt == adsc::DType::kFloat32) { const float f = kHalfOf[v]; std::memcpy(&src[e * 4], &f, 4); }
        else if (dt == adsc::DType::kFloat64) { const double d = kHalfOf[v]; std::memcpy(&src[e * 8], &d, 8); }
        else std::memcpy(&src[e * 2], dt == adsc::DType::kFloat16 ? &kHalfBits[v] : &kBf16Bits[v], 2);
      }
      std::vector<int64_t> index(src_rows);
      for (auto& i : index) i = rng.uniform(-1, static_cast<int>(dst_rows) - 1);  // duplicates accumulate
      adsc::ScatterAddRowsParams p;
      p.src_rows = src_rows; p.src_row_stride = row_elems; p.dst_rows = dst_rows;
      p.dst_row_stride = row_elems; p.row_elems = row_elems; p.dtype = dt; p.index_is_int64 = true;
      std::vector<uint8_t> want = dst;
      p.src = src.data(); p.dst = want.data(); p.index = index.data();
      CHECK_OK(adsc::scatter_add_rows_cpu(p));
      uint8_t* d_src = to_device(src);
      uint8_t* d_dst = to_device(dst);
      int64_t* d_index = to_device(index);
      int32_t* d_flag = to_device(std::vector<int32_t>{0});
      p.src = d_src; p.dst = d_dst; p.index = d_index;
      CHECK_OK(adsc::scatter_add_rows_cuda(p, d_flag, nullptr));
      CHECK(cudaDeviceSynchronize() == cudaSuccess);
      CHECK(to_host(d_dst, want.size()) == want);
      CHECK(to_host(d_flag, 1)[0] == 0);
      index[5] = dst_rows;  // out of range: skipped, flag raised
      cudaMemcpy(d_index, index.data(), index.size() * 8, cudaMemcpyHostToDevice);
      CHECK_OK(adsc::scatter_add_rows_cuda(p, d_flag, nullptr));
      CHECK(to_host(d_flag, 1)[0] == 1);
      for (void* ptr : {static_cast<void*>(d_src), static_cast<void*>(d_dst), static_cast<void*>(d_index),
                        static_cast<void*>(d_flag)})
        cudaFree(ptr);
    }
  }
  return 0;
#else
  return 77;
#endif
}

// Without a GPU (or without CUDA compiled in), the CUDA entry points fail cleanly.
int cuda_without_device() {
#if defined(ADSC_WITH_CUDA)
  if (have_gpu()) return 77;
#endif
  Batch batch;
  batch.cu = {0, 2};
  batch.rows.resize(1);
  batch.ids = {1, 1};
  PlanBuffers buf;
  std::vector<int64_t> spans;
  adsc::PlanParams p = make_params(batch, parse("1:2"), false, &spans, &buf, 2, 2);
  const adsc::Status st = adsc::plan_cuda(p, nullptr);
  CHECK(st == adsc::Status::kCudaError || st == adsc::Status::kNotCompiled);
  CHECK(std::strlen(adsc::last_error()) > 0);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, std::function<int()>> cases = {
      {"schedule_parse", [] { schedule_parse(); return 0; }},
      {"schedule_errors", [] { schedule_errors(); return 0; }},
      {"schedule_validate", [] { schedule_validate(); return 0; }},
      {"plan_worked_example", [] { plan_worked_example(); return 0; }},
      {"plan_packed_batch", [] { plan_packed_batch(); return 0; }},
      {"plan_padded_left_right", [] { plan_padded_left_right(); return 0; }},
      {"plan_spans", [] { plan_spans(); return 0; }},
      {"plan_newline_spans", [] { plan_newline_spans(); return 0; }},
      {"plan_newline_span_errors", [] { plan_newline_span_errors(); return 0; }},
      {"plan_empty", [] { plan_empty(); return 0; }},
      {"plan_errors", [] { plan_errors(); return 0; }},
      {"compact_tokens", [] { compact_tokens_rows(); return 0; }},
      {"compact_errors", [] { compact_errors(); return 0; }},
      {"scatter_add", [] { scatter_add(); return 0; }},
      {"paged_kv", [] { paged_kv(); return 0; }},
      {"cuda_plan_matches_cpu", cuda_plan_matches_cpu},
      {"cuda_gather_matches_cpu", cuda_gather_matches_cpu},
      {"cuda_paged_kv_matches_cpu", cuda_paged_kv_matches_cpu},
      {"cuda_scatter_add_matches_cpu", cuda_scatter_add_matches_cpu},
      {"cuda_without_device", cuda_without_device},
  };
  if (argc != 2 || !cases.count(argv[1])) {
    std::fprintf(stderr, "usage: %s <case>; cases:", argv[0]);
    for (const auto& c : cases) std::fprintf(stderr, " %s", c.first.c_str());
    std::fprintf(stderr, "\n");
    return 2;
  }
  const int rc = cases.at(argv[1])();
  if (rc == 77) {
    std::printf("%s: skipped (no GPU)\n", argv[1]);
    return 77;
  }
  std::printf("%s: %s\n", argv[1], g_failures ? "FAILED" : "passed");
  return g_failures ? 1 : 0;
}
