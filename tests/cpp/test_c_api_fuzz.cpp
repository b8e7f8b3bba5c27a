// A bounded, deterministic fuzz loop over every entry point of the C ABI (adsc/adsc.h), run by
// ctest in every build and, in CI, under -fsanitize=address,undefined (issue 14): random sizes,
// strides, enum values, NULL and misaligned pointers, overlapping buffers (any written buffer over
// any other buffer of the call, issue 18) and sizes whose products overflow int64. Every buffer the library may touch is a heap allocation of exactly the size the
// call declares, so a read or write past it is an AddressSanitizer error, and undefined arithmetic
// is an UndefinedBehaviorSanitizer error. Beyond "no crash, no UB", every call must return a
// known status, a failing call must leave a message, and a successful compaction or paged KV
// write must equal a plain oracle (a failing one must write nothing).
//
//   adsc_c_api_fuzz [rounds] [seed]     (defaults: 4000 rounds, seed 20261201)
#include <adsc/adsc.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace {

constexpr int64_t kI64Max = std::numeric_limits<int64_t>::max();
constexpr int64_t kI64Min = std::numeric_limits<int64_t>::min();
constexpr int32_t kI32Max = std::numeric_limits<int32_t>::max();
constexpr int32_t kI32Min = std::numeric_limits<int32_t>::min();

long g_failures = 0, g_calls = 0;
uint64_t g_round = 0;

#define EXPECT(cond)                                                                     \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      if (g_failures < 20)                                                               \
        std::fprintf(stderr, "round %llu, %s:%d: EXPECT failed: %s (last error: '%s')\n", \
                     static_cast<unsigned long long>(g_round), __FILE__, __LINE__, #cond, \
                     adsc_last_error());                                                 \
      ++g_failures;                                                                      \
    }                                                                                    \
  } while (0)

struct Rng {  // splitmix64: small, fast, the same sequence everywhere
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  int64_t range(int64_t lo, int64_t hi) {  // inclusive, hi - lo < 2^63
    return lo + static_cast<int64_t>(next() % static_cast<uint64_t>(hi - lo + 1));
  }
  bool chance(int percent) { return static_cast<int>(next() % 100) < percent; }
  template <typename T, size_t N>
  T pick(const T (&values)[N]) { return values[next() % N]; }
};

// Sizes no buffer can back: negative, beyond the plan limits, or overflowing when multiplied.
const int64_t kHugeSizes[] = {-1, -2, kI64Min, kI64Max, kI64Max / 2, kI64Max / 2 + 1,
                              int64_t(1) << 62, int64_t(1) << 40, int64_t(1) << 31,
                              int64_t(1) << 30, ADSC_PLAN_MAX_TOKENS + int64_t(1)};
const int32_t kEdge32[] = {0, 1, 2, -1, kI32Min, kI32Max, kI32Max - 1, 1 << 15, 1 << 16, 65535,
                           3, 4, 24, ADSC_MAX_STEPS, ADSC_MAX_STEPS + 1};

// A heap buffer of exactly `bytes` bytes (so ASan sees any byte past it), optionally handed out
// at a misaligned address: then it is allocated `shift` bytes larger and the pointer shifted.
class Buffer {
 public:
  Buffer() = default;
  Buffer(size_t bytes, size_t shift = 0) : bytes_(bytes), shift_(shift) {
    if (bytes + shift > 0) storage_.reset(new unsigned char[bytes + shift]);
  }
  void* data() { return storage_ ? storage_.get() + shift_ : nullptr; }
  bool shifted() const { return shift_ != 0; }
  size_t size() const { return bytes_; }
  template <typename T>
  T* as() { return static_cast<T*>(data()); }
  // Copies v in (memcpy: the buffer may be misaligned on purpose).
  template <typename T>
  void assign(const std::vector<T>& v) {
    if (!v.empty()) std::memcpy(data(), v.data(), v.size() * sizeof(T));
  }
  void fill_random(Rng& rng) {
    for (size_t i = 0; i < bytes_; ++i) as<unsigned char>()[i] = static_cast<unsigned char>(rng.next());
  }

 private:
  std::unique_ptr<unsigned char[]> storage_;
  size_t bytes_ = 0, shift_ = 0;
};

// Every call: a known status, and a message when it failed.
adsc_status checked(adsc_status st) {
  ++g_calls;
  EXPECT(st >= ADSC_OK && st <= ADSC_NOT_COMPILED);
  const char* msg = adsc_last_error();
  EXPECT(msg != nullptr && std::strlen(msg) < 1024);
  if (st != ADSC_OK) EXPECT(msg != nullptr && msg[0] != '\0');
  EXPECT(adsc_status_name(st) != nullptr);
  return st;
}

// memcmp, which must not be handed NULL even for 0 bytes.
bool same_bytes(const void* a, const void* b, size_t n) { return n == 0 || std::memcmp(a, b, n) == 0; }

bool well_formed(const adsc_schedule& s) {
  if (s.num_steps < 0 || s.num_steps > ADSC_MAX_STEPS) return false;
  for (int i = 0; i < s.num_steps; ++i) {
    if (s.layers[i] < 1 || (i > 0 && s.layers[i] <= s.layers[i - 1])) return false;
    if (s.factors[i] != 2 && s.factors[i] != 4) return false;
  }
  return true;
}

bool same_steps(const adsc_schedule& a, const adsc_schedule& b) {
  if (a.num_steps != b.num_steps) return false;
  for (int i = 0; i < a.num_steps; ++i)
    if (a.layers[i] != b.layers[i] || a.factors[i] != b.factors[i]) return false;
  return true;
}

// A schedule: usually a valid one, sometimes hand-filled with anything.
adsc_schedule random_schedule(Rng& rng, int max_steps = 3) {
  adsc_schedule s;
  std::memset(&s, 0, sizeof(s));
  if (rng.chance(80)) {
    s.num_steps = static_cast<int32_t>(rng.range(0, max_steps));
    int layer = 0;
    for (int i = 0; i < s.num_steps; ++i) {
      layer += static_cast<int>(rng.range(1, 4));
      s.layers[i] = layer;
      s.factors[i] = rng.chance(70) ? 2 : 4;
    }
  } else {
    s.num_steps = rng.chance(50) ? static_cast<int32_t>(rng.range(0, ADSC_MAX_STEPS)) : rng.pick(kEdge32);
    for (int i = 0; i < ADSC_MAX_STEPS; ++i) {
      s.layers[i] = rng.chance(50) ? static_cast<int32_t>(rng.range(-3, 40)) : rng.pick(kEdge32);
      s.factors[i] = rng.chance(60) ? static_cast<int32_t>(rng.range(1, 5)) : rng.pick(kEdge32);
    }
  }
  return s;
}

// ---- schedules ---------------------------------------------------------------------------------

void fuzz_schedule_text(Rng& rng) {
  static const char* const kPieces[] = {"0", "1", "2", "4", "8", "9", "16", ":", ",", " ", "\t",
                                        "\n", "-", "+", "x", "\xef\xbc\x98" /* U+FF18 */,
                                        "\xd9\xa1" /* U+0661 */, "\xc2\xb2" /* U+00B2 */,
                                        "123456789", "1234567890", "00000000002"};
  std::string text;
  const int n = static_cast<int>(rng.range(0, 24));
  for (int i = 0; i < n; ++i) text += rng.pick(kPieces);
  adsc_schedule s;
  const adsc_status st = checked(adsc_schedule_parse(text.c_str(), &s));
  if (st == ADSC_OK) {
    EXPECT(well_formed(s));
    char buf[256];
    adsc_schedule again;
    EXPECT(checked(adsc_schedule_format(&s, buf, sizeof(buf))) == ADSC_OK);
    EXPECT(checked(adsc_schedule_parse(buf, &again)) == ADSC_OK && same_steps(s, again));
  } else {
    EXPECT(st == ADSC_INVALID_ARGUMENT);
  }
  if (rng.chance(5)) EXPECT(checked(adsc_schedule_parse(nullptr, &s)) == ADSC_INVALID_ARGUMENT);
  if (rng.chance(5)) EXPECT(checked(adsc_schedule_parse(text.c_str(), nullptr)) == ADSC_INVALID_ARGUMENT);
}

void fuzz_schedule_format_validate(Rng& rng) {
  const adsc_schedule s = random_schedule(rng, ADSC_MAX_STEPS);
  const size_t size = static_cast<size_t>(rng.range(0, 40));
  Buffer buf(size);
  char* out = rng.chance(5) ? nullptr : buf.as<char>();
  adsc_status st = checked(adsc_schedule_format(&s, out, size));
  if (st == ADSC_OK) {
    EXPECT(well_formed(s) && out != nullptr);
    adsc_schedule back;
    EXPECT(checked(adsc_schedule_parse(out, &back)) == ADSC_OK && same_steps(s, back));
  }
  if (!well_formed(s)) EXPECT(st != ADSC_OK);
  if (rng.chance(3)) EXPECT(checked(adsc_schedule_format(nullptr, out, size)) == ADSC_INVALID_ARGUMENT);

  const int32_t layers = rng.chance(50) ? static_cast<int32_t>(rng.range(-2, 40)) : rng.pick(kEdge32);
  const int32_t gh = rng.chance(50) ? static_cast<int32_t>(rng.range(-1, 30)) : rng.pick(kEdge32);
  const int32_t gw = rng.chance(50) ? static_cast<int32_t>(rng.range(-1, 30)) : rng.pick(kEdge32);
  const bool valid_steps = s.num_steps >= 0 && s.num_steps <= ADSC_MAX_STEPS;
  const size_t entries = valid_steps ? static_cast<size_t>(s.num_steps) + 1 : 0;
  // The grids: their own buffers, one of them misaligned, or both in one buffer, overlapping.
  const int layout = static_cast<int>(rng.range(0, 9));  // 0: misaligned, 1: overlapping
  const size_t shift = layout == 0 ? static_cast<size_t>(rng.range(1, 3)) : 0;
  Buffer grids_h(entries * 4, rng.chance(50) ? shift : 0), grids_w(entries * 4, grids_h.shifted() ? 0 : shift);
  Buffer both(2 * entries * 4);
  int32_t* oh = rng.chance(20) || !valid_steps ? nullptr : grids_h.as<int32_t>();
  int32_t* ow = rng.chance(20) || !valid_steps ? nullptr : grids_w.as<int32_t>();
  if (layout == 1 && oh && ow && entries > 0) {
    oh = both.as<int32_t>();
    ow = oh + rng.range(0, static_cast<int64_t>(entries) - 1);
  }
  st = checked(adsc_schedule_validate(&s, layers, gh, gw, oh, ow));
  if (valid_steps && oh && ow && entries > 0 && (layout == 1 || shift > 0))
    EXPECT(st == ADSC_INVALID_ARGUMENT);  // misaligned or overlapping outputs: never written
  if (st == ADSC_OK) {
    EXPECT(well_formed(s) && gh >= 1 && gw >= 1);
    if (s.num_steps > 0) EXPECT(s.layers[s.num_steps - 1] < layers);
    for (size_t i = 1; oh && ow && i < entries; ++i)
      EXPECT(oh[i] >= 1 && ow[i] >= 1 && oh[i] <= oh[i - 1] && ow[i] <= ow[i - 1] &&
             (oh[i] < oh[i - 1] || ow[i] < ow[i - 1]));
  }
}

// ---- plan sizes and the summary accessors --------------------------------------------------

void fuzz_plan_sizes(Rng& rng) {
  const int64_t tokens = rng.chance(50) ? rng.range(-2, 1 << 20) : rng.pick(kHugeSizes);
  const int32_t steps = rng.chance(50) ? static_cast<int32_t>(rng.range(-1, 17)) : rng.pick(kEdge32);
  const int64_t ws = adsc_plan_workspace_size(tokens, steps);
  const bool in_range = tokens >= 0 && tokens <= ADSC_PLAN_MAX_TOKENS && steps >= 0 &&
                        steps <= ADSC_MAX_STEPS;
  EXPECT(in_range ? ws == tokens * (4 + steps) : ws == -1);
  const int32_t ss = adsc_plan_summary_size(steps);
  const bool steps_ok = steps >= 0 && steps <= ADSC_MAX_STEPS;
  EXPECT(steps_ok ? ss == ADSC_PLAN_SUMMARY_HEADER + 2 * (steps + 1) : ss == -1);
  // The accessors read only inside a summary of the size they are told.
  Buffer summary(steps_ok ? static_cast<size_t>(ss) * 4 : 4);
  summary.fill_random(rng);
  const int32_t stage = rng.chance(70) ? static_cast<int32_t>(rng.range(-1, 18)) : rng.pick(kEdge32);
  const int32_t* sp = rng.chance(5) ? nullptr : summary.as<int32_t>();
  const int32_t t = adsc_plan_stage_tokens(sp, steps, stage);
  const int32_t m = adsc_plan_stage_max_len(sp, steps, stage);
  if (!sp || !steps_ok || stage < 0 || stage > steps) EXPECT(t == -1 && m == -1);
  else EXPECT(t == sp[ADSC_PLAN_SUMMARY_HEADER + 2 * stage] && m == sp[ADSC_PLAN_SUMMARY_HEADER + 2 * stage + 1]);
}

// ---- the plan ----------------------------------------------------------------------------------

constexpr int64_t kImageId = 5;

struct PlanCase {
  adsc_schedule schedule;
  adsc_plan_params p;
  Buffer cu, mask, ids, spans, workspace, index, source, pos, cu_out, summary;
  int64_t real_tokens = 0;
  int32_t span_columns = 4;  // what the case declares: 4, 5 (newline spans) or, rarely, anything
};

// Which of the case's typed pointers gets misaligned (one at most), and which gets NULLed.
enum Target { kNone, kCu, kMask, kIds, kSpans, kWorkspace, kIndex, kSource, kPos, kCuOut, kSummary, kTargets };

void make_plan_case(Rng& rng, PlanCase* c) {
  adsc_plan_params& p = c->p;
  std::memset(&p, 0, sizeof(p));
  c->schedule = random_schedule(rng);
  p.schedule = &c->schedule;
  const bool padded = rng.chance(45);
  p.layout = rng.chance(95) ? (padded ? ADSC_LAYOUT_PADDED : ADSC_LAYOUT_PACKED)
                            : static_cast<int32_t>(rng.pick(kEdge32));
  const int64_t B = rng.range(0, 5);
  const int misalign = rng.chance(8) ? static_cast<int>(rng.range(1, kTargets - 1)) : kNone;
  const int nulled = rng.chance(8) ? static_cast<int>(rng.range(1, kTargets - 1)) : kNone;
  auto shift = [&](int target, size_t align) -> size_t {
    return target == misalign ? static_cast<size_t>(rng.range(1, static_cast<int64_t>(align) - 1 + (align == 1))) : 0;
  };
  p.grid_h = static_cast<int32_t>(rng.chance(95) ? rng.range(1, 4) : rng.pick(kEdge32));
  p.grid_w = static_cast<int32_t>(rng.chance(95) ? rng.range(1, 4) : rng.pick(kEdge32));
  const int64_t hw = (p.grid_h >= 1 && p.grid_w >= 1 && p.grid_h <= 4 && p.grid_w <= 4)
                         ? int64_t(p.grid_h) * p.grid_w : 1;

  // Sequences: text tokens and whole (or, sometimes, partial) images.
  std::vector<std::vector<int64_t>> seqs(static_cast<size_t>(B));
  for (auto& seq : seqs) {
    const int pieces = static_cast<int>(rng.range(0, 4));
    for (int k = 0; k < pieces; ++k) {
      if (rng.chance(40)) {
        const int64_t n = rng.chance(90) ? hw * rng.range(1, 2) : rng.range(1, 6);
        for (int64_t i = 0; i < n; ++i) seq.push_back(kImageId);
      } else {
        for (int64_t i = rng.range(1, 3); i > 0; --i) seq.push_back(rng.range(0, 9) == kImageId ? 1 : 2);
      }
    }
  }
  int64_t longest = 0;
  for (auto& seq : seqs) longest = std::max<int64_t>(longest, static_cast<int64_t>(seq.size()));
  std::vector<int64_t> ids;
  c->real_tokens = 0;
  if (padded) {
    const int64_t S = longest + rng.range(0, 2);
    p.padded_len = S;
    p.num_tokens = B * S;
    p.mask_type = rng.chance(95) ? static_cast<int32_t>(rng.range(0, 2)) : rng.pick(kEdge32);
    const int32_t mt = p.mask_type >= 0 && p.mask_type <= 2 ? p.mask_type : 0;  // the bytes it has
    const size_t esize = mt == 2 ? 8 : mt == 1 ? 4 : 1;
    c->mask = Buffer(static_cast<size_t>(B * S) * esize, shift(kMask, esize));
    for (int64_t b = 0; b < B; ++b) {
      const int64_t len = static_cast<int64_t>(seqs[b].size());
      const int64_t lead = rng.chance(50) ? S - len : 0;  // left or right padding, or inside
      int64_t k = 0;
      for (int64_t j = 0; j < S; ++j) {
        const bool real = j >= lead && k < len;
        ids.push_back(real ? seqs[b][k++] : 0);
        c->real_tokens += real;
        const int64_t v = real ? 1 : 0;
        unsigned char* m = c->mask.as<unsigned char>();
        if (m) {
          if (esize == 1) m[b * S + j] = static_cast<unsigned char>(v);
          else if (esize == 4) { const int32_t w = static_cast<int32_t>(v); std::memcpy(m + (b * S + j) * 4, &w, 4); }
          else std::memcpy(m + (b * S + j) * 8, &v, 8);
        }
      }
    }
    p.mask = nulled == kMask ? nullptr : c->mask.data();
    p.pad_left = static_cast<int32_t>(rng.range(0, 1));
  } else {
    c->cu = Buffer(static_cast<size_t>(B + 1) * 4, shift(kCu, 4));
    std::vector<int32_t> cu(static_cast<size_t>(B + 1), 0);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t t : seqs[b]) ids.push_back(t);
      cu[b + 1] = static_cast<int32_t>(ids.size());
    }
    if (rng.chance(10)) cu[rng.range(0, B)] += static_cast<int32_t>(rng.range(-2, 2));  // bad offsets
    c->cu.assign(cu);
    p.num_tokens = static_cast<int64_t>(ids.size());
    c->real_tokens = p.num_tokens;
    p.cu_seqlens = nulled == kCu ? nullptr : c->cu.as<int32_t>();
  }
  p.batch_size = B;
  if (rng.chance(70)) {  // images from input_ids
    c->ids = Buffer(ids.size() * 8, shift(kIds, 8));
    if (!ids.empty()) std::memcpy(c->ids.data(), ids.data(), ids.size() * 8);
    p.input_ids = nulled == kIds ? nullptr : c->ids.as<int64_t>();
    p.image_token_id = kImageId;
  } else {  // explicit spans, mostly sensible, sometimes anything
    const int64_t n = rng.range(0, 4);
    // 4 columns, or 5 with a newline flag (LLaVA-NeXT grids); the buffer holds what is declared.
    const int cols = rng.chance(50) ? 4 : 5;
    c->span_columns = rng.chance(97) ? cols : rng.pick(kEdge32);
    c->spans = Buffer(static_cast<size_t>(n * cols) * 8, shift(kSpans, 8));
    std::vector<int64_t> sp(static_cast<size_t>(cols * n));
    int64_t seq = 0, start = 0;
    for (int64_t i = 0; i < n; ++i) {
      int64_t* row = &sp[static_cast<size_t>(cols * i)];
      if (rng.chance(80)) {
        seq += rng.range(0, 1);
        start = rng.chance(30) ? 0 : start + rng.range(0, 3);
        row[0] = seq; row[1] = start; row[2] = rng.range(1, 3); row[3] = rng.range(1, 3);
        if (cols == 5) row[4] = rng.chance(95) ? rng.range(0, 1) : rng.pick(kHugeSizes);
        start += row[2] * (row[3] + (cols == 5 && row[4] == 1 ? 1 : 0));
      } else {
        for (int k = 0; k < cols; ++k) row[k] = rng.chance(50) ? rng.range(-2, 8) : rng.pick(kHugeSizes);
      }
    }
    if (c->span_columns > cols) c->span_columns = 4;  // never declare more than the buffer holds
    c->spans.assign(sp);
    p.spans = nulled == kSpans && n > 0 ? nullptr : c->spans.as<int64_t>();
    p.num_spans = rng.chance(95) ? n : rng.pick(kHugeSizes);
    if (p.num_spans > n) p.spans = nullptr;  // never hand out a buffer shorter than declared
  }
  // Outputs, sized as the library documents for the declared T, B and steps.
  const int32_t steps = c->schedule.num_steps;
  const bool steps_ok = steps >= 0 && steps <= ADSC_MAX_STEPS;
  const size_t T = static_cast<size_t>(p.num_tokens), stages = steps_ok ? static_cast<size_t>(steps) + 1 : 1;
  c->workspace = Buffer(steps_ok ? T * (4 + static_cast<size_t>(steps)) * 4 : 0, shift(kWorkspace, 4));
  c->index = Buffer(stages * T * 4, shift(kIndex, 4));
  c->source = Buffer(stages * T * 4, shift(kSource, 4));
  c->pos = Buffer(stages * T * 8, shift(kPos, 8));
  c->cu_out = Buffer(stages * static_cast<size_t>(B + 1) * 4, shift(kCuOut, 4));
  c->summary = Buffer(steps_ok ? static_cast<size_t>(adsc_plan_summary_size(steps)) * 4 : 0, shift(kSummary, 4));
  for (Buffer* b : {&c->workspace, &c->index, &c->source, &c->pos, &c->cu_out, &c->summary}) b->fill_random(rng);
  p.workspace = nulled == kWorkspace ? nullptr : c->workspace.as<int32_t>();
  p.index = nulled == kIndex ? nullptr : c->index.as<int32_t>();
  p.source_index = nulled == kSource ? nullptr : c->source.as<int32_t>();
  p.position_ids = nulled == kPos ? nullptr : c->pos.as<int64_t>();
  p.cu_seqlens_out = nulled == kCuOut ? nullptr : c->cu_out.as<int32_t>();
  p.summary = nulled == kSummary ? nullptr : c->summary.as<int32_t>();
  if (!steps_ok) {  // a bad step count must be refused before any buffer is sized by it
    p.workspace = nullptr; p.index = nullptr; p.source_index = nullptr; p.position_ids = nullptr;
    p.summary = nullptr;
  }
}

// What a successful plan must satisfy, whatever the batch.
void check_plan_result(const PlanCase& c) {
  const adsc_plan_params& p = c.p;
  const int32_t S = c.schedule.num_steps;
  const int64_t B = p.batch_size, T = p.num_tokens;
  const int32_t* summary = p.summary;
  EXPECT(summary[ADSC_PLAN_SUMMARY_ERROR] == ADSC_PLAN_OK);
  EXPECT(adsc_plan_stage_tokens(summary, S, 0) == c.real_tokens);
  for (int32_t s = 0; s <= S; ++s) {
    const int32_t tokens = adsc_plan_stage_tokens(summary, S, s);
    const int32_t longest = adsc_plan_stage_max_len(summary, S, s);
    const int32_t* cu = p.cu_seqlens_out + s * (B + 1);
    EXPECT(cu[0] == 0 && cu[B] == tokens && tokens >= 0 && tokens <= T && longest <= tokens);
    if (s > 0) EXPECT(tokens <= adsc_plan_stage_tokens(summary, S, s - 1));
    for (int64_t b = 0; b < B; ++b) EXPECT(cu[b] <= cu[b + 1] && cu[b + 1] - cu[b] <= longest);
    const int64_t used = p.layout == ADSC_LAYOUT_PACKED ? tokens : B * (s == 0 ? p.padded_len : longest);
    const int64_t prev_rows = s == 0 ? T
                              : (p.layout == ADSC_LAYOUT_PACKED ? adsc_plan_stage_tokens(summary, S, s - 1)
                                                                : B * (s == 1 ? p.padded_len : adsc_plan_stage_max_len(summary, S, s - 1)));
    int64_t real = 0;
    for (int64_t j = 0; j < used; ++j) {
      const int32_t idx = p.index[s * T + j], src = p.source_index[s * T + j];
      EXPECT(idx >= -1 && idx < prev_rows && src >= -1 && src < T && (idx < 0) == (src < 0));
      real += src >= 0;
    }
    EXPECT(real == tokens);
  }
  EXPECT(checked(adsc_plan_check_summary(summary, &p)) == ADSC_OK);
}

void fuzz_plan(Rng& rng) {
  PlanCase c;
  make_plan_case(rng, &c);
  const adsc_status st = checked(c.span_columns == 4 && rng.chance(50) ? adsc_plan_host(&c.p)
                                                                     : adsc_plan_host2(&c.p, c.span_columns));
  if (c.span_columns != 4 && c.span_columns != 5) EXPECT(st == ADSC_INVALID_ARGUMENT);
  if (st == ADSC_OK) {
    check_plan_result(c);
  } else if (st == ADSC_INVALID_INPUT) {  // a data error: the summary names it
    EXPECT(c.p.summary[ADSC_PLAN_SUMMARY_ERROR] != ADSC_PLAN_OK);
    EXPECT(checked(adsc_plan_check_summary(c.p.summary, &c.p)) == ADSC_INVALID_INPUT);
  } else {
    EXPECT(st == ADSC_INVALID_ARGUMENT);
  }
  // The device plan: without CUDA it is refused; with CUDA only NULL buffers are handed to it
  // (host memory would be a caller's error), which it must refuse before launching.
  if (!adsc_cuda_compiled()) {
    const adsc_status d = checked(adsc_plan_device(&c.p, nullptr));
    EXPECT(d == ADSC_NOT_COMPILED || d == ADSC_INVALID_ARGUMENT);
  } else {
    adsc_plan_params q = c.p;
    q.cu_seqlens = nullptr; q.mask = nullptr; q.input_ids = nullptr; q.spans = nullptr;
    q.workspace = nullptr; q.index = nullptr; q.source_index = nullptr; q.position_ids = nullptr;
    q.cu_seqlens_out = nullptr; q.summary = nullptr;
    EXPECT(checked(adsc_plan_device(&q, nullptr)) != ADSC_OK);
  }
}

// Two buffers of a plan placed in one allocation so that they share bytes: one the plan writes and
// any other it uses (read or written). Whatever else the case holds, the plan must refuse it
// before reading or writing anything (issue 18: such plans returned ADSC_OK with a wrong plan).
void fuzz_plan_overlap(Rng& rng) {
  PlanCase c;
  make_plan_case(rng, &c);
  adsc_plan_params& p = c.p;
  struct Slot {
    Target target;
    Buffer* buffer;
    size_t bytes;  // the extent the call declares (every buffer but the spans is exactly that)
    bool written;
  };
  // The buffers this plan uses, by its layout and its image source (the others it never touches).
  std::vector<Slot> used;
  auto use = [&](Target t, Buffer* b, const void* ptr, bool written, size_t bytes) {
    if (ptr != nullptr && bytes > 0) used.push_back({t, b, bytes, written});
  };
  if (p.layout == ADSC_LAYOUT_PACKED) use(kCu, &c.cu, p.cu_seqlens, false, c.cu.size());
  if (p.layout == ADSC_LAYOUT_PADDED) use(kMask, &c.mask, p.mask, false, c.mask.size());
  use(kIds, &c.ids, p.input_ids, false, c.ids.size());
  // The spans buffer may hold more columns than declared: only the declared rows count.
  if (p.num_spans > 0 && (c.span_columns == 4 || c.span_columns == 5) &&
      static_cast<size_t>(p.num_spans) * c.span_columns * 8 <= c.spans.size())
    use(kSpans, &c.spans, p.spans, false, static_cast<size_t>(p.num_spans) * c.span_columns * 8);
  use(kWorkspace, &c.workspace, p.workspace, true, c.workspace.size());
  use(kIndex, &c.index, p.index, true, c.index.size());
  use(kSource, &c.source, p.source_index, true, c.source.size());
  use(kPos, &c.pos, p.position_ids, true, c.pos.size());
  use(kCuOut, &c.cu_out, p.cu_seqlens_out, true, c.cu_out.size());
  use(kSummary, &c.summary, p.summary, true, c.summary.size());
  std::vector<size_t> writers;
  for (size_t i = 0; i < used.size(); ++i)
    if (used[i].written) writers.push_back(i);
  if (writers.empty() || used.size() < 2) return;
  const Slot w = used[writers[rng.next() % writers.size()]];
  Slot o = w;
  while (o.target == w.target) o = used[rng.next() % used.size()];
  // o at the start of the arena (its contents copied), w at an 8-aligned offset inside o.
  const size_t o_bytes = o.bytes, w_bytes = w.bytes;
  const size_t offset = (static_cast<size_t>(rng.next()) % o_bytes) & ~size_t(7);
  Buffer arena(std::max(o.buffer->size(), offset + w_bytes));
  std::memcpy(arena.data(), o.buffer->data(), o.buffer->size());
  auto place = [&](Target t, void* ptr) {
    switch (t) {
      case kCu: p.cu_seqlens = static_cast<const int32_t*>(ptr); break;
      case kMask: p.mask = ptr; break;
      case kIds: p.input_ids = static_cast<const int64_t*>(ptr); break;
      case kSpans: p.spans = static_cast<const int64_t*>(ptr); break;
      case kWorkspace: p.workspace = static_cast<int32_t*>(ptr); break;
      case kIndex: p.index = static_cast<int32_t*>(ptr); break;
      case kSource: p.source_index = static_cast<int32_t*>(ptr); break;
      case kPos: p.position_ids = static_cast<int64_t*>(ptr); break;
      case kCuOut: p.cu_seqlens_out = static_cast<int32_t*>(ptr); break;
      case kSummary: p.summary = static_cast<int32_t*>(ptr); break;
      default: break;
    }
  };
  place(o.target, arena.data());
  place(w.target, arena.as<unsigned char>() + offset);
  std::vector<unsigned char> before(arena.as<unsigned char>(), arena.as<unsigned char>() + arena.size());
  const adsc_status st = checked(adsc_plan_host2(&p, c.span_columns));
  EXPECT(st == ADSC_INVALID_ARGUMENT);
  EXPECT(same_bytes(before.data(), arena.data(), before.size()));  // refused before writing
  if (adsc_cuda_compiled()) {  // the device plan refuses it before launching: host pointers are safe
    EXPECT(checked(adsc_plan_device2(&p, c.span_columns, nullptr)) == ADSC_INVALID_ARGUMENT);
  }
}

// Sizes that no buffer can back must be refused before anything is read.
void fuzz_plan_huge(Rng& rng) {
  PlanCase c;
  make_plan_case(rng, &c);
  adsc_plan_params p = c.p;
  switch (rng.range(0, 4)) {
    case 0: p.num_tokens = rng.pick(kHugeSizes); break;
    case 1: p.batch_size = rng.pick(kHugeSizes); break;
    case 2:  // B * S wrapping to T (issue 14, D1) or any other mismatch
      p.layout = ADSC_LAYOUT_PADDED; p.batch_size = rng.range(1, 8); p.padded_len = rng.pick(kHugeSizes);
      p.num_tokens = static_cast<int64_t>(static_cast<uint64_t>(p.batch_size) * static_cast<uint64_t>(p.padded_len));
      break;
    case 3: p.num_spans = rng.pick(kHugeSizes); p.input_ids = nullptr; p.spans = c.spans.as<int64_t>(); break;
    default: p.padded_len = rng.pick(kHugeSizes); p.layout = ADSC_LAYOUT_PADDED; break;
  }
  const adsc_status st = checked(adsc_plan_host(&p));
  // Case 2 with padded_len such that B*S truly fits and equals T is impossible with these sizes;
  // case 4 may keep B * S == T only when B == 0 (then nothing is read).
  if (!(p.layout == ADSC_LAYOUT_PADDED && p.batch_size == 0 && p.num_tokens == 0 && p.padded_len >= 0))
    EXPECT(st == ADSC_INVALID_ARGUMENT);
}

void fuzz_check_summary(Rng& rng) {
  PlanCase c;
  make_plan_case(rng, &c);
  int32_t summary[ADSC_PLAN_SUMMARY_HEADER + 2 * (ADSC_MAX_STEPS + 1)];
  for (int32_t& v : summary) v = rng.chance(50) ? static_cast<int32_t>(rng.range(-2, 10)) : rng.pick(kEdge32);
  summary[0] = rng.chance(80) ? static_cast<int32_t>(rng.range(0, 6)) : rng.pick(kEdge32);
  adsc_plan_params p = c.p;
  p.grid_h = rng.pick(kEdge32);
  p.grid_w = rng.pick(kEdge32);
  p.num_tokens = rng.chance(50) ? p.num_tokens : rng.pick(kHugeSizes);
  p.image_token_id = rng.chance(50) ? kImageId : rng.pick(kHugeSizes);
  const adsc_status st = checked(adsc_plan_check_summary(rng.chance(3) ? nullptr : summary,
                                                         rng.chance(3) ? nullptr : &p));
  EXPECT(st == ADSC_OK || st == ADSC_INVALID_INPUT || st == ADSC_INVALID_ARGUMENT);
}

// ---- compaction ---------------------------------------------------------------------------------

// A stride for `rows` rows of `row_bytes`: usually valid, sometimes too small, sometimes huge.
int64_t random_stride(Rng& rng, int64_t row_bytes) {
  if (row_bytes < 0 || row_bytes > (int64_t(1) << 24)) return rng.chance(50) ? rng.range(0, 64) : rng.pick(kHugeSizes);
  if (rng.chance(85)) return row_bytes + rng.range(0, 9);
  if (rng.chance(50)) return rng.range(-4, row_bytes);
  return rng.pick(kHugeSizes);
}

// Bytes a buffer of `rows` rows must have for the library's documented extent; -1: none can.
int64_t extent_bytes(int64_t rows, int64_t stride, int64_t row_bytes) {
  constexpr int64_t kMostBytes = int64_t(1) << 24;  // what the loop is willing to allocate
  if (rows <= 0 || row_bytes <= 0) return 0;
  if (rows == 1) return row_bytes <= kMostBytes ? row_bytes : -1;
  if (stride <= 0 || rows - 1 > (kI64Max - row_bytes) / stride) return -1;
  const int64_t bytes = (rows - 1) * stride + row_bytes;
  return bytes <= kMostBytes ? bytes : -1;
}

void fuzz_compact(Rng& rng) {
  adsc_compact_tokens_params c;
  std::memset(&c, 0, sizeof(c));
  c.src_rows = rng.chance(95) ? rng.range(0, 9) : rng.pick(kHugeSizes);
  c.dst_rows = rng.chance(95) ? rng.range(0, 9) : rng.pick(kHugeSizes);
  c.row_bytes = rng.chance(95) ? rng.range(0, 24) : rng.pick(kHugeSizes);
  c.src_row_stride = random_stride(rng, c.row_bytes);
  c.dst_row_stride = random_stride(rng, c.row_bytes);
  c.index_is_int64 = static_cast<int32_t>(rng.range(0, 1));
  const int64_t src_bytes = extent_bytes(c.src_rows, c.src_row_stride, c.row_bytes);
  const int64_t dst_bytes = extent_bytes(c.dst_rows, c.dst_row_stride, c.row_bytes);
  const bool backed = src_bytes >= 0 && dst_bytes >= 0 && c.src_rows >= 0 && c.dst_rows >= 0 &&
                      c.src_rows <= 9 && c.dst_rows <= 9 && c.row_bytes >= 0;
  const size_t isize = c.index_is_int64 ? 8 : 4;
  const bool misalign = rng.chance(8);
  Buffer src(backed ? static_cast<size_t>(src_bytes) : 0), index(backed ? static_cast<size_t>(c.dst_rows) * isize : 0, misalign ? static_cast<size_t>(rng.range(1, static_cast<int64_t>(isize) - 1)) : 0);
  // dst: its own buffer, or (overlap) a window of src's.
  const bool overlap = backed && src_bytes > 0 && dst_bytes > 0 && rng.chance(10);
  Buffer dst_own(backed && !overlap ? static_cast<size_t>(dst_bytes) : 0);
  src.fill_random(rng);
  dst_own.fill_random(rng);
  std::vector<int64_t> index64;
  std::vector<int32_t> index32;
  for (int64_t i = 0; backed && i < c.dst_rows; ++i) {
    const int64_t v = rng.chance(90) ? rng.range(-1, c.src_rows - 1) : (rng.chance(50) ? rng.range(-3, c.src_rows + 2) : rng.pick(kHugeSizes));
    index64.push_back(v);
    index32.push_back(static_cast<int32_t>(v));
  }
  if (isize == 8) index.assign(index64);
  else index.assign(index32);
  c.src = rng.chance(5) ? nullptr : src.data();
  c.dst = overlap ? src.as<char>() + rng.range(0, src_bytes - 1) : (rng.chance(5) ? nullptr : dst_own.data());
  c.index = rng.chance(5) ? nullptr : index.data();
  if (overlap && static_cast<int64_t>(static_cast<char*>(c.dst) - src.as<char>()) + dst_bytes > src_bytes) {
    c.dst = dst_own.data();  // a window that would run past src's buffer: no overlap after all
  }
  // Or the index inside dst (issue 18: the rows gathered first overwrote the index still to read).
  const int64_t index_bytes = c.dst_rows * static_cast<int64_t>(isize);
  const bool index_in_dst = backed && !overlap && c.dst == dst_own.data() && c.index != nullptr &&
                            index_bytes > 0 && dst_bytes >= index_bytes && rng.chance(10);
  if (index_in_dst) {
    const int64_t slack = (dst_bytes - index_bytes) / static_cast<int64_t>(isize);
    c.index = dst_own.as<unsigned char>() + rng.range(0, slack) * static_cast<int64_t>(isize);
  }
  if (!backed) { c.src = nullptr; c.dst = nullptr; c.index = nullptr; }
  std::vector<unsigned char> before(dst_own.as<unsigned char>(), dst_own.as<unsigned char>() + dst_own.size());
  const adsc_status st = checked(adsc_compact_tokens_host(&c));
  if (index_in_dst) EXPECT(st == ADSC_INVALID_ARGUMENT);
  if (!backed) EXPECT(st != ADSC_OK || c.dst_rows == 0 || c.row_bytes == 0);
  const bool wrote_own = c.dst == dst_own.data() && c.dst != nullptr;
  if (st == ADSC_OK && backed && wrote_own && !index_in_dst) {  // the oracle: row by row
    for (int64_t i = 0; i < c.dst_rows; ++i) {
      const int64_t j = isize == 8 ? index64[i] : index32[i];
      const unsigned char* out = dst_own.as<unsigned char>() + i * c.dst_row_stride;
      for (int64_t k = 0; k < c.row_bytes; ++k)
        EXPECT(out[k] == (j < 0 ? 0 : src.as<unsigned char>()[j * c.src_row_stride + k]));
    }
  } else if (st != ADSC_OK && wrote_own) {
    EXPECT(same_bytes(before.data(), dst_own.data(), before.size()));  // nothing written
  }
  if (overlap && c.dst != dst_own.data()) EXPECT(st != ADSC_OK);
  if (misalign && c.index != nullptr && c.dst_rows > 0) EXPECT(st == ADSC_INVALID_ARGUMENT);
  // Device: refused without CUDA; with CUDA, NULL buffers only (refused unless nothing to do).
  if (!adsc_cuda_compiled()) {
    EXPECT(checked(adsc_compact_tokens_device(&c, nullptr, nullptr)) == ADSC_NOT_COMPILED);
  } else {
    adsc_compact_tokens_params q = c;
    q.src = nullptr; q.dst = nullptr; q.index = nullptr;
    const adsc_status d = checked(adsc_compact_tokens_device(&q, nullptr, nullptr));
    EXPECT(d != ADSC_OK || q.dst_rows == 0);
  }
  if (rng.chance(2)) EXPECT(checked(adsc_compact_tokens_host(nullptr)) == ADSC_INVALID_ARGUMENT);
}

// ---- paged KV writes ------------------------------------------------------------------------------

void fuzz_paged_kv(Rng& rng) {
  adsc_paged_kv_params k;
  std::memset(&k, 0, sizeof(k));
  k.num_tokens = rng.chance(95) ? rng.range(0, 8) : rng.pick(kHugeSizes);
  k.num_slots = rng.chance(95) ? rng.range(0, 10) : rng.pick(kHugeSizes);
  k.row_bytes = rng.chance(95) ? rng.range(0, 20) : rng.pick(kHugeSizes);
  k.key_stride = random_stride(rng, k.row_bytes);
  k.value_stride = random_stride(rng, k.row_bytes);
  k.cache_stride = random_stride(rng, k.row_bytes);
  const int64_t kb = extent_bytes(k.num_tokens, k.key_stride, k.row_bytes);
  const int64_t vb = extent_bytes(k.num_tokens, k.value_stride, k.row_bytes);
  const int64_t cb = extent_bytes(k.num_slots, k.cache_stride, k.row_bytes);
  const bool backed = kb >= 0 && vb >= 0 && cb >= 0 && k.num_tokens >= 0 && k.num_tokens <= 8 &&
                      k.num_slots >= 0 && k.num_slots <= 10 && k.row_bytes >= 0;
  const bool misalign = rng.chance(8);
  Buffer key(backed ? static_cast<size_t>(kb) : 0), value(backed ? static_cast<size_t>(vb) : 0);
  Buffer kc(backed ? static_cast<size_t>(cb) : 0), vc(backed ? static_cast<size_t>(cb) : 0);
  Buffer slots(backed ? static_cast<size_t>(k.num_tokens) * 8 : 0, misalign ? static_cast<size_t>(rng.range(1, 7)) : 0);
  for (Buffer* b : {&key, &value, &kc, &vc}) b->fill_random(rng);
  std::vector<int64_t> slot_values;
  for (int64_t t = 0; backed && t < k.num_tokens; ++t)
    slot_values.push_back(rng.chance(90) ? rng.range(-1, k.num_slots - 1)
                                         : (rng.chance(50) ? rng.range(-3, k.num_slots + 2) : rng.pick(kHugeSizes)));
  slots.assign(slot_values);
  k.key = rng.chance(4) ? nullptr : key.data();
  k.value = rng.chance(4) ? nullptr : value.data();
  k.key_cache = rng.chance(4) ? nullptr : kc.data();
  k.value_cache = rng.chance(4) ? nullptr : vc.data();
  k.slot_mapping = rng.chance(4) ? nullptr : slots.as<int64_t>();
  // Overlap: key read from inside key_cache (issue 14, D5), both caches in one buffer, the slot
  // mapping inside a cache (issue 18: a segfault), or value inside value_cache.
  const int overlap = backed && cb > 0 && rng.chance(15) ? static_cast<int>(rng.range(1, 4)) : 0;
  const int64_t slot_bytes = 8 * k.num_tokens;
  bool must_refuse = false;
  if (overlap == 1 && kb > 0 && kb <= cb) { k.key = kc.data(); must_refuse = true; }
  if (overlap == 2) { k.value_cache = kc.data(); must_refuse = true; }
  if (overlap == 3 && slot_bytes > 0 && slot_bytes <= cb) {
    Buffer& cache = rng.chance(50) ? kc : vc;
    k.slot_mapping = reinterpret_cast<const int64_t*>(cache.as<unsigned char>() + 8 * rng.range(0, (cb - slot_bytes) / 8));
    must_refuse = true;
  }
  if (overlap == 4 && vb > 0 && vb <= cb) { k.value = vc.data(); must_refuse = true; }
  // Only when both buffers are ones the call uses, with bytes: key/value rows and the caches when
  // tokens are copied, the slot mapping whenever there are tokens.
  must_refuse = must_refuse && k.num_tokens > 0 && k.row_bytes > 0 && k.num_slots > 0 &&
                k.key_cache != nullptr && k.value_cache != nullptr &&
                (overlap != 1 || k.key == kc.data()) && (overlap != 4 || k.value == vc.data());
  if (!backed) { k.key = nullptr; k.value = nullptr; k.key_cache = nullptr; k.value_cache = nullptr; k.slot_mapping = nullptr; }
  std::vector<unsigned char> kc0(kc.as<unsigned char>(), kc.as<unsigned char>() + kc.size());
  std::vector<unsigned char> vc0(vc.as<unsigned char>(), vc.as<unsigned char>() + vc.size());
  const adsc_status st = checked(adsc_write_paged_kv_host(&k));
  if (!backed) EXPECT(st != ADSC_OK || k.num_tokens == 0);
  const bool plain = k.key_cache == kc.data() && k.value_cache == vc.data() && k.key == key.data() &&
                     k.value == value.data() && k.key_cache != nullptr;
  if (st == ADSC_OK && backed && plain) {  // the oracle: tokens in order, the last write wins
    std::vector<unsigned char> want_k = kc0, want_v = vc0;
    for (int64_t t = 0; t < k.num_tokens; ++t) {
      const int64_t s = slot_values[t];
      if (s < 0) continue;
      std::memcpy(&want_k[s * k.cache_stride], key.as<unsigned char>() + t * k.key_stride, k.row_bytes);
      std::memcpy(&want_v[s * k.cache_stride], value.as<unsigned char>() + t * k.value_stride, k.row_bytes);
    }
    EXPECT(same_bytes(want_k.data(), kc.data(), kc.size()));
    EXPECT(same_bytes(want_v.data(), vc.data(), vc.size()));
  } else if (st != ADSC_OK && backed) {
    EXPECT(same_bytes(kc0.data(), kc.data(), kc.size()) && same_bytes(vc0.data(), vc.data(), vc.size()));
  }
  if (must_refuse) EXPECT(st == ADSC_INVALID_ARGUMENT);
  if (misalign && k.slot_mapping != nullptr && k.num_tokens > 0) EXPECT(st == ADSC_INVALID_ARGUMENT);
  if (!adsc_cuda_compiled()) {
    EXPECT(checked(adsc_write_paged_kv_device(&k, nullptr, nullptr)) == ADSC_NOT_COMPILED);
  } else {
    adsc_paged_kv_params q = k;
    q.key = nullptr; q.value = nullptr; q.key_cache = nullptr; q.value_cache = nullptr; q.slot_mapping = nullptr;
    const adsc_status d = checked(adsc_write_paged_kv_device(&q, nullptr, nullptr));
    EXPECT(d != ADSC_OK || q.num_tokens == 0);
  }
  if (rng.chance(2)) EXPECT(checked(adsc_write_paged_kv_host(nullptr)) == ADSC_INVALID_ARGUMENT);
}

void fuzz_names(Rng& rng) {
  EXPECT(adsc_version() != nullptr && adsc_version()[0] != '\0');
  EXPECT(adsc_cuda_compiled() == 0 || adsc_cuda_compiled() == 1);
  const int32_t code = rng.chance(50) ? static_cast<int32_t>(rng.range(-2, 8)) : rng.pick(kEdge32);
  const char* name = adsc_status_name(code);
  EXPECT(name != nullptr && (code >= 0 && code <= 5 ? std::strcmp(name, "unknown status") != 0
                                                     : std::strcmp(name, "unknown status") == 0));
}

}  // namespace

int main(int argc, char** argv) {
  const long rounds = argc > 1 ? std::strtol(argv[1], nullptr, 10) : 4000;
  const uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 20261201ull;
  Rng rng{seed};
  const auto t0 = std::chrono::steady_clock::now();
  for (g_round = 0; g_round < static_cast<uint64_t>(rounds); ++g_round) {
    fuzz_names(rng);
    fuzz_schedule_text(rng);
    fuzz_schedule_format_validate(rng);
    fuzz_plan_sizes(rng);
    fuzz_plan(rng);
    fuzz_plan_overlap(rng);
    fuzz_plan_huge(rng);
    fuzz_check_summary(rng);
    fuzz_compact(rng);
    fuzz_paged_kv(rng);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("c_api fuzz: %ld rounds, %ld checked calls, seed %llu, %.2f s: %s\n", rounds, g_calls,
              static_cast<unsigned long long>(seed), seconds, g_failures ? "FAILED" : "passed");
  return g_failures ? 1 : 0;
}
