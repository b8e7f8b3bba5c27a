// adsc_cpp_service: one prefill step of a continuous-batching service that uses the adsc core
// through its C ABI only (<adsc/adsc.h>, no PyTorch). A batch of LLaVA-like requests (4x4 image
// grids, image token 32000) is admitted, planned for the schedule "2:2,4:2" of a 6-layer model,
// its hidden states are compacted stage by stage and every stage's K/V rows are written into a
// paged cache sized for that stage. Every result is checked against values this program computes
// itself from the rule of the spec (sections 3-5); with CUDA and a GPU, the device path is run too
// and compared with the host path bit for bit. Exit status 0 when every check passes, else 1.
#include <adsc/adsc.h>

#include <algorithm>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <vector>

#if defined(ADSC_EXAMPLE_WITH_CUDA) && ADSC_EXAMPLE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace {

constexpr int64_t kImageTokenId = 32000;
constexpr int32_t kGridH = 4, kGridW = 4, kImageTokens = kGridH * kGridW;
constexpr int32_t kNumLayers = 6;
constexpr const char* kScheduleText = "2:2,4:2";
constexpr int64_t kHidden = 64;                                 // hidden size, float32
constexpr int64_t kHiddenRowBytes = kHidden * sizeof(float);
constexpr int64_t kBlockSize = 4, kNumKvHeads = 2, kHeadDim = 8;  // paged KV cache, fp16
constexpr int64_t kKvRowElems = kNumKvHeads * kHeadDim;
constexpr int64_t kKvRowBytes = kKvRowElems * sizeof(uint16_t);
constexpr uint16_t kEmptySlot = 0x7e00;                         // fp16 NaN: a slot nobody wrote

int g_failures = 0;

// Any failing library call that should not fail: print the library's message and stop.
void check(adsc_status status, const char* what) {
  if (status == ADSC_OK) return;
  std::fprintf(stderr, "error: %s: %s: %s\n", what, adsc_status_name(status), adsc_last_error());
  std::exit(1);
}

// A failed check: counted, and the first few printed.
void failed(const char* fmt, ...) {
  if (++g_failures > 20) return;
  std::va_list args;
  va_start(args, fmt);
  std::fprintf(stderr, "CHECK FAILED: ");
  std::vfprintf(stderr, fmt, args);
  std::fprintf(stderr, "\n");
  va_end(args);
}
#define EXPECT(cond, ...) \
  do {                    \
    if (!(cond)) failed(__VA_ARGS__); \
  } while (0)

// ---- requests and the packed batch --------------------------------------------------------------

struct Request {
  const char* name;
  std::vector<int64_t> ids;
};

// parts: n > 0 is n text tokens, n < 0 a run of -n image tokens (16 per 4x4 image).
Request request(const char* name, std::initializer_list<int> parts) {
  Request r{name, {}};
  for (int n : parts)
    for (int i = 0; i < std::abs(n); ++i)
      r.ids.push_back(n < 0 ? kImageTokenId : 1000 + static_cast<int64_t>(r.ids.size()));
  return r;
}

struct Batch {
  std::vector<const Request*> requests;
  std::vector<int64_t> ids;     // [T] packed
  std::vector<int32_t> cu;      // [B+1]
  int64_t T() const { return static_cast<int64_t>(ids.size()); }
  int64_t B() const { return static_cast<int64_t>(requests.size()); }
};

Batch pack(const std::vector<const Request*>& requests) {
  Batch b;
  b.requests = requests;
  b.cu.push_back(0);
  for (const Request* r : requests) {
    b.ids.insert(b.ids.end(), r->ids.begin(), r->ids.end());
    b.cu.push_back(static_cast<int32_t>(b.ids.size()));
  }
  return b;
}

// ---- the plan, in buffers this program owns -----------------------------------------------------

struct Plan {
  int32_t stages = 0;
  int64_t T = 0, B = 0;
  std::vector<int32_t> workspace, index, source_index, cu_seqlens, summary;
  std::vector<int64_t> position_ids;
  adsc_plan_params params{};
  int32_t tokens(int s) const { return adsc_plan_stage_tokens(summary.data(), stages - 1, s); }
  int32_t max_len(int s) const { return adsc_plan_stage_max_len(summary.data(), stages - 1, s); }
};

// Sizes the buffers and fills the params (pointing into *plan: do not copy it afterwards).
void init_plan(const Batch& batch, const adsc_schedule& schedule, Plan* plan) {
  const int32_t S = schedule.num_steps;
  plan->stages = S + 1;
  plan->T = batch.T();
  plan->B = batch.B();
  plan->workspace.assign(static_cast<size_t>(adsc_plan_workspace_size(plan->T, S)), 0);
  plan->index.assign(static_cast<size_t>(plan->stages * plan->T), -7);  // -7: never written
  plan->source_index.assign(plan->index.size(), -7);
  plan->position_ids.assign(plan->index.size(), -7);
  plan->cu_seqlens.assign(static_cast<size_t>(plan->stages * (plan->B + 1)), -7);
  plan->summary.assign(static_cast<size_t>(adsc_plan_summary_size(S)), -7);
  adsc_plan_params& p = plan->params;
  p = adsc_plan_params{};
  p.layout = ADSC_LAYOUT_PACKED;
  p.num_tokens = plan->T;
  p.batch_size = plan->B;
  p.cu_seqlens = batch.cu.data();
  p.input_ids = batch.ids.data();
  p.image_token_id = kImageTokenId;
  p.grid_h = kGridH;
  p.grid_w = kGridW;
  p.schedule = &schedule;
  p.workspace = plan->workspace.data();
  p.index = plan->index.data();
  p.source_index = plan->source_index.data();
  p.position_ids = plan->position_ids.data();
  p.cu_seqlens_out = plan->cu_seqlens.data();
  p.summary = plan->summary.data();
}

// ---- what the plan must be: computed here from the spec's rule, without the library -----------

// Halving an axis (the kept indices along it) keeps, of each pair, the later one; of an odd
// length, also the last: group g keeps element min(2g+1, n-1).
std::vector<int> halve(const std::vector<int>& axis) {
  std::vector<int> out;
  const int n = static_cast<int>(axis.size());
  for (int g = 0; g < (n + 1) / 2; ++g) out.push_back(axis[std::min(2 * g + 1, n - 1)]);
  return out;
}

// kept[s][r]: whether raster index r of an image survives to stage s; grids[s]: the stage's grid.
struct ImageRule {
  std::vector<std::vector<bool>> kept;
  std::vector<std::pair<int, int>> grids;
};

ImageRule image_rule(const adsc_schedule& schedule) {
  std::vector<int> rows, cols;
  for (int i = 0; i < kGridH; ++i) rows.push_back(i);
  for (int i = 0; i < kGridW; ++i) cols.push_back(i);
  ImageRule rule;
  for (int s = 0; s <= schedule.num_steps; ++s) {
    if (s > 0) {
      const int f = schedule.factors[s - 1];
      const bool halve_w = f == 4 || cols.size() >= rows.size();  // factor 2: longer side, tie: w
      const bool halve_h = f == 4 || cols.size() < rows.size();
      if (halve_w) cols = halve(cols);
      if (halve_h) rows = halve(rows);
    }
    std::vector<bool> k(kImageTokens, false);
    for (int r : rows)
      for (int c : cols) k[r * kGridW + c] = true;
    rule.kept.push_back(k);
    rule.grids.emplace_back(static_cast<int>(rows.size()), static_cast<int>(cols.size()));
  }
  return rule;
}

// What stage s must hold: the input rows alive at s in packed order, their original positions,
// the stage's offsets and its longest sequence.
struct StageExpect {
  std::vector<int64_t> source, position;
  std::vector<int32_t> cu{0};
  int32_t longest = 0;
};

std::vector<StageExpect> expected_stages(const Batch& batch, const ImageRule& rule) {
  std::vector<StageExpect> e(rule.kept.size());
  for (int64_t b = 0; b < batch.B(); ++b) {
    const std::vector<int64_t>& ids = batch.requests[b]->ids;
    int64_t run = 0;  // image tokens so far in the current run: run k*16+r is raster index r
    for (int64_t pos = 0; pos < static_cast<int64_t>(ids.size()); ++pos) {
      const bool image = ids[pos] == kImageTokenId;
      run = image ? run + 1 : 0;
      for (size_t s = 0; s < e.size(); ++s)
        if (!image || rule.kept[s][(run - 1) % kImageTokens]) {
          e[s].source.push_back(batch.cu[b] + pos);
          e[s].position.push_back(pos);
        }
    }
    for (StageExpect& stage : e) {
      stage.cu.push_back(static_cast<int32_t>(stage.source.size()));
      stage.longest = std::max(stage.longest, stage.cu[b + 1] - stage.cu[b]);
    }
  }
  return e;
}

void check_plan(const Plan& plan, const std::vector<StageExpect>& expected) {
  std::vector<int64_t> slot_before(static_cast<size_t>(plan.T), -1);  // input row -> slot at s-1
  for (int s = 0; s < plan.stages; ++s) {
    const StageExpect& e = expected[s];
    const int32_t n = static_cast<int32_t>(e.source.size());
    EXPECT(plan.tokens(s) == n && plan.max_len(s) == e.longest,
           "stage %d: %d tokens, longest %d; want %d, longest %d", s, plan.tokens(s),
           plan.max_len(s), n, e.longest);
    EXPECT(std::equal(e.cu.begin(), e.cu.end(), &plan.cu_seqlens[s * (plan.B + 1)]),
           "stage %d: cu_seqlens differ", s);
    for (int32_t j = 0; j < n; ++j) {
      const bool in_range = e.source[j] >= 0 && e.source[j] < plan.T;
      const int64_t at = s * plan.T + j,
                    prev = s == 0 || !in_range ? e.source[j] : slot_before[e.source[j]];
      EXPECT(plan.index[at] == prev && plan.source_index[at] == e.source[j] &&
                 plan.position_ids[at] == e.position[j],
             "stage %d slot %d: index %d, source %d, position %lld; want %lld, %lld, %lld", s, j,
             plan.index[at], plan.source_index[at], (long long)plan.position_ids[at],
             (long long)prev, (long long)e.source[j], (long long)e.position[j]);
    }
    for (int32_t j = 0; j < n; ++j)
      if (e.source[j] >= 0 && e.source[j] < plan.T) slot_before[e.source[j]] = j;
  }
}

// ---- hidden states and K/V rows -----------------------------------------------------------------

// Row t of the input holds t*1000 + c in channel c: every value names its token and channel.
float hidden_value(int64_t token, int64_t channel) {
  return static_cast<float>(token * 1000 + channel);
}

// float -> IEEE half, round to nearest even (normal values and zero: all this example makes).
uint16_t to_fp16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint32_t sign = (x >> 16) & 0x8000u, mant = x & 0x7fffffu;
  const int32_t exp = static_cast<int32_t>((x >> 23) & 0xffu) - 127 + 15;
  if (exp <= 0) return static_cast<uint16_t>(sign);
  uint32_t h = sign | (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(h);
}

// A stand-in for the K and V projections of one hidden row: K from channels 0..15, V from 16..31.
void kv_rows(const float* hidden_row, uint16_t* key, uint16_t* value) {
  for (int64_t e = 0; e < kKvRowElems; ++e) {
    key[e] = to_fp16(hidden_row[e] / 1024.0f);
    value[e] = to_fp16(-hidden_row[kKvRowElems + e] / 1024.0f);
  }
}

// One stage's paged cache (one layer's worth; every layer of the stage has the same shape).
struct KvStage {
  int64_t num_tokens = 0, num_blocks = 0, max_blocks = 0;
  std::vector<int32_t> block_table;   // [B, max_blocks], -1 = none
  std::vector<int64_t> slot_mapping;  // [num_tokens]
  std::vector<uint16_t> key, value;   // [num_tokens, kKvRowElems]: the new rows
  std::vector<uint16_t> key_cache, value_cache;  // [num_blocks * kBlockSize, kKvRowElems]
  int64_t pool_bytes() const { return 2 * num_blocks * kBlockSize * kKvRowBytes; }
};

// Blocks for each sequence of the stage, handed out from the top of the pool down (as a free list
// would), the block table, and slot = block * block_size + offset for every packed token.
KvStage allocate_kv(const Plan& plan, int s) {
  KvStage kv;
  const int32_t* cu = plan.cu_seqlens.data() + s * (plan.B + 1);
  kv.num_tokens = cu[plan.B];
  for (int64_t b = 0; b < plan.B; ++b) {
    const int64_t blocks = (cu[b + 1] - cu[b] + kBlockSize - 1) / kBlockSize;
    kv.num_blocks += blocks;
    kv.max_blocks = std::max(kv.max_blocks, blocks);
  }
  kv.block_table.assign(static_cast<size_t>(plan.B * kv.max_blocks), -1);
  int32_t next_free = static_cast<int32_t>(kv.num_blocks) - 1;
  for (int64_t b = 0; b < plan.B; ++b) {
    const int64_t len = cu[b + 1] - cu[b];
    for (int64_t i = 0; i < (len + kBlockSize - 1) / kBlockSize; ++i)
      kv.block_table[b * kv.max_blocks + i] = next_free--;
    for (int64_t i = 0; i < len; ++i)
      kv.slot_mapping.push_back(kv.block_table[b * kv.max_blocks + i / kBlockSize] * kBlockSize +
                                i % kBlockSize);
  }
  const size_t cache_elems = static_cast<size_t>(kv.num_blocks * kBlockSize * kKvRowElems);
  kv.key_cache.assign(cache_elems, kEmptySlot);
  kv.value_cache.assign(cache_elems, kEmptySlot);
  return kv;
}

adsc_paged_kv_params kv_params(const void* key, const void* value, void* key_cache,
                               void* value_cache, const int64_t* slots, const KvStage& kv) {
  adsc_paged_kv_params p{};
  p.key = key;
  p.value = value;
  p.key_stride = p.value_stride = p.cache_stride = p.row_bytes = kKvRowBytes;
  p.key_cache = key_cache;
  p.value_cache = value_cache;
  p.num_tokens = kv.num_tokens;
  p.num_slots = kv.num_blocks * kBlockSize;
  p.slot_mapping = slots;
  return p;
}

// Reads every token back through the block table and compares it with the row expected from the
// token's input row; slots no token owns must still be empty.
void check_kv(const Plan& plan, const StageExpect& expected, int s, const KvStage& kv) {
  std::vector<bool> owned(static_cast<size_t>(kv.num_blocks * kBlockSize), false);
  uint16_t want_k[kKvRowElems], want_v[kKvRowElems];
  float row[kHidden];
  for (int64_t b = 0; b < plan.B; ++b)
    for (int64_t i = 0; i < expected.cu[b + 1] - expected.cu[b]; ++i) {
      const int64_t entry = i / kBlockSize;
      const int32_t block = entry < kv.max_blocks ? kv.block_table[b * kv.max_blocks + entry] : -1;
      if (block < 0) {
        failed("stage %d seq %lld token %lld: no block in the block table", s, (long long)b,
               (long long)i);
        continue;
      }
      const int64_t slot = static_cast<int64_t>(block) * kBlockSize + i % kBlockSize;
      const int64_t source = expected.source[expected.cu[b] + i];
      for (int64_t c = 0; c < kHidden; ++c) row[c] = hidden_value(source, c);
      kv_rows(row, want_k, want_v);
      owned[slot] = true;
      EXPECT(std::memcmp(&kv.key_cache[slot * kKvRowElems], want_k, kKvRowBytes) == 0 &&
             std::memcmp(&kv.value_cache[slot * kKvRowElems], want_v, kKvRowBytes) == 0,
             "stage %d seq %lld token %lld: K/V at slot %lld is not input row %lld's", s,
             (long long)b, (long long)i, (long long)slot, (long long)source);
    }
  for (size_t slot = 0; slot < owned.size(); ++slot)
    EXPECT(owned[slot] || (kv.key_cache[slot * kKvRowElems] == kEmptySlot &&
                           kv.value_cache[slot * kKvRowElems] == kEmptySlot),
           "stage %d: slot %zu, owned by no token, was written", s, slot);
}

#if defined(ADSC_EXAMPLE_WITH_CUDA) && ADSC_EXAMPLE_WITH_CUDA
// ---- the same on the GPU ------------------------------------------------------------------------

void cuda_check(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  std::fprintf(stderr, "error: %s: %s\n", what, cudaGetErrorString(err));
  std::exit(1);
}

// A device buffer of n elements of T (freed when it goes out of scope).
template <typename T>
struct DeviceBuffer {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DeviceBuffer(size_t count) : n(count) {
    cuda_check(cudaMalloc(&ptr, std::max<size_t>(n, 1) * sizeof(T)), "cudaMalloc");
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) {
    cuda_check(cudaMemcpy(ptr, host.data(), n * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
  ~DeviceBuffer() { cudaFree(ptr); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  std::vector<T> download() const {
    std::vector<T> host(n);
    cuda_check(cudaMemcpy(host.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return host;
  }
};

template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b, size_t count) {
  return a.size() >= count && b.size() >= count &&
         std::memcmp(a.data(), b.data(), count * sizeof(T)) == 0;
}

// Plan, compaction and KV writes on the device; compared with the host results bit for bit.
void run_cuda(const Batch& batch, const Plan& host,
              const std::vector<std::vector<float>>& host_hidden,
              const std::vector<KvStage>& host_kv) {
  cudaStream_t stream;
  cuda_check(cudaStreamCreate(&stream), "cudaStreamCreate");
  const int64_t T = host.T;
  DeviceBuffer<int64_t> ids(batch.ids), position_ids(host.position_ids.size());
  DeviceBuffer<int32_t> cu(batch.cu), workspace(host.workspace.size()), index(host.index.size()),
      source_index(host.source_index.size()), cu_out(host.cu_seqlens.size()),
      summary(host.summary.size()), error_flag(1);
  adsc_plan_params p = host.params;  // same scalars, device buffers
  p.cu_seqlens = cu.ptr;
  p.input_ids = ids.ptr;
  p.workspace = workspace.ptr;
  p.index = index.ptr;
  p.source_index = source_index.ptr;
  p.position_ids = position_ids.ptr;
  p.cu_seqlens_out = cu_out.ptr;
  p.summary = summary.ptr;
  check(adsc_plan_device(&p, stream), "adsc_plan_device");
  std::vector<int32_t> dev_summary(host.summary.size());
  cuda_check(cudaMemcpyAsync(dev_summary.data(), summary.ptr, summary.n * sizeof(int32_t),
                             cudaMemcpyDeviceToHost, stream), "summary copy");
  cuda_check(cudaStreamSynchronize(stream), "plan");
  check(adsc_plan_check_summary(dev_summary.data(), &p), "adsc_plan_check_summary");
  EXPECT(same_bits(dev_summary, host.summary, dev_summary.size()), "CUDA: plan summary differs");
  const std::vector<int32_t> d_index = index.download(), d_source = source_index.download(),
                             d_cu = cu_out.download();
  const std::vector<int64_t> d_pos = position_ids.download();
  EXPECT(same_bits(d_cu, host.cu_seqlens, d_cu.size()), "CUDA: cu_seqlens differ");
  for (int s = 0; s < host.stages; ++s) {  // slots past a stage's tokens are not written
    const size_t n = static_cast<size_t>(host.tokens(s)), at = static_cast<size_t>(s * T);
    EXPECT(std::equal(&d_index[at], &d_index[at] + n, &host.index[at]) &&
           std::equal(&d_source[at], &d_source[at] + n, &host.source_index[at]) &&
           std::equal(&d_pos[at], &d_pos[at] + n, &host.position_ids[at]),
           "CUDA: plan of stage %d differs from the host plan", s);
  }
  cuda_check(cudaMemsetAsync(error_flag.ptr, 0, sizeof(int32_t), stream), "memset");
  std::vector<std::unique_ptr<DeviceBuffer<float>>> hidden;  // one buffer per stage
  hidden.push_back(std::make_unique<DeviceBuffer<float>>(host_hidden[0]));
  for (int s = 1; s < host.stages; ++s) {
    hidden.push_back(std::make_unique<DeviceBuffer<float>>(host_hidden[s].size()));
    const adsc_compact_tokens_params c{hidden[s - 1]->ptr, host.tokens(s - 1), kHiddenRowBytes,
                                hidden[s]->ptr, host.tokens(s), kHiddenRowBytes, kHiddenRowBytes,
                                index.ptr + s * T, 0};
    check(adsc_compact_tokens_device(&c, error_flag.ptr, stream), "adsc_compact_tokens_device");
  }
  cuda_check(cudaStreamSynchronize(stream), "compaction");
  std::vector<std::vector<float>> dev_hidden{host_hidden[0]};
  for (int s = 1; s < host.stages; ++s) {
    dev_hidden.push_back(hidden[s]->download());
    EXPECT(same_bits(dev_hidden[s], host_hidden[s], host_hidden[s].size()),
           "CUDA: compacted hidden states of stage %d differ", s);
  }
  for (int s = 0; s < host.stages; ++s) {  // K/V rows from the device's compacted hidden states
    const KvStage& h = host_kv[s];
    std::vector<uint16_t> key(h.key.size()), value(h.value.size());
    for (int64_t j = 0; j < h.num_tokens; ++j)
      kv_rows(&dev_hidden[s][j * kHidden], &key[j * kKvRowElems], &value[j * kKvRowElems]);
    const std::vector<uint16_t> empty(h.key_cache.size(), kEmptySlot);
    DeviceBuffer<uint16_t> d_key(key), d_value(value), key_cache(empty), value_cache(empty);
    DeviceBuffer<int64_t> slots(h.slot_mapping);
    const adsc_paged_kv_params kp = kv_params(d_key.ptr, d_value.ptr, key_cache.ptr,
                                              value_cache.ptr, slots.ptr, h);
    check(adsc_write_paged_kv_device(&kp, error_flag.ptr, stream), "adsc_write_paged_kv_device");
    cuda_check(cudaStreamSynchronize(stream), "KV writes");
    EXPECT(key_cache.download() == h.key_cache && value_cache.download() == h.value_cache,
           "CUDA: paged KV cache of stage %d differs from the host's", s);
  }
  EXPECT(error_flag.download()[0] == 0, "CUDA: a kernel raised its error flag");
  cuda_check(cudaStreamDestroy(stream), "cudaStreamDestroy");
  std::printf("CUDA: plan, compaction and paged KV writes match the host bit for bit\n");
}
#endif

}  // namespace

int main() {
  std::printf("adsc %s, CUDA kernels compiled: %s\n", adsc_version(),
              adsc_cuda_compiled() ? "yes" : "no");

  // The schedule, from the service's configuration, checked against the model and its image grid.
  adsc_schedule schedule;
  check(adsc_schedule_parse(kScheduleText, &schedule), "adsc_schedule_parse");
  int32_t grids_h[ADSC_MAX_STEPS + 1], grids_w[ADSC_MAX_STEPS + 1];
  check(adsc_schedule_validate(&schedule, kNumLayers, kGridH, kGridW, grids_h, grids_w),
        "adsc_schedule_validate");
  char text[64];
  check(adsc_schedule_format(&schedule, text, sizeof text), "adsc_schedule_format");
  const ImageRule rule = image_rule(schedule);
  std::printf("schedule \"%s\" on a %d-layer model:", text, kNumLayers);
  for (int s = 0; s <= schedule.num_steps; ++s) {
    const int first = s == 0 ? 0 : schedule.layers[s - 1];
    const int last = (s == schedule.num_steps ? kNumLayers : schedule.layers[s]) - 1;
    std::printf(" stage %d %dx%d (layers %d-%d)%s", s, grids_h[s], grids_w[s], first, last,
                s == schedule.num_steps ? "\n" : ",");
    EXPECT(rule.grids[s] == std::make_pair(grids_h[s], grids_w[s]), "stage %d grid differs", s);
  }

  // Requests: text and 4x4 images (a run of 2*16 image tokens is two images).
  const Request two_images = request("two-images", {3, -2 * kImageTokens, 4});
  const Request text_only = request("text-only", {7});
  const Request one_image = request("one-image", {2, -kImageTokens, 6});
  const Request image_first = request("image-first", {-kImageTokens, 3});
  const Request partial = request("partial-image", {2, -10, 3});  // 10: not a whole image

  // Admission: the incoming batch holds a bad request; the plan says so, the service finds it by
  // planning each request alone, rejects it and goes on with the others.
  std::vector<const Request*> incoming{&two_images, &text_only, &partial, &one_image, &image_first};
  std::vector<const Request*> admitted;
  {
    const Batch all = pack(incoming);
    Plan plan;
    init_plan(all, schedule, &plan);
    const adsc_status st = adsc_plan_host(&plan.params);
    EXPECT(st == ADSC_INVALID_INPUT, "a batch with a partial image: got %s, want invalid input",
           adsc_status_name(st));
    std::printf("incoming batch of %zu: %s: %s\n", incoming.size(), adsc_status_name(st),
                adsc_last_error());
    for (const Request* r : incoming) {
      const Batch one = pack({r});
      Plan single;
      init_plan(one, schedule, &single);
      const adsc_status rs = adsc_plan_host(&single.params);
      if (rs == ADSC_OK) {
        admitted.push_back(r);
        continue;
      }
      std::printf("  rejected request '%s': %s: %s\n", r->name, adsc_status_name(rs),
                  adsc_last_error());
      EXPECT(rs == ADSC_INVALID_INPUT && r == &partial && std::strstr(adsc_last_error(), "image"),
             "request '%s' rejected unexpectedly", r->name);
    }
    EXPECT(admitted.size() == incoming.size() - 1, "expected exactly one rejected request");
  }

  // The plan of the admitted batch, on the host.
  const Batch batch = pack(admitted);
  Plan plan;
  init_plan(batch, schedule, &plan);
  check(adsc_plan_host(&plan.params), "adsc_plan_host");
  std::printf("batch: %lld requests, %lld tokens, cu_seqlens", (long long)batch.B(),
              (long long)batch.T());
  for (int32_t c : batch.cu) std::printf(" %d", c);
  std::printf("\n");
  for (int s = 0; s < plan.stages; ++s)
    std::printf("  stage %d: %3d tokens, longest sequence %2d\n", s, plan.tokens(s),
                plan.max_len(s));
  const std::vector<StageExpect> expected = expected_stages(batch, rule);
  check_plan(plan, expected);

  // Hidden states [T, 64], compacted before each stage into buffers of that stage's size.
  std::vector<std::vector<float>> hidden(plan.stages);
  hidden[0].resize(static_cast<size_t>(batch.T() * kHidden));
  for (int64_t t = 0; t < batch.T(); ++t)
    for (int64_t c = 0; c < kHidden; ++c) hidden[0][t * kHidden + c] = hidden_value(t, c);
  for (int s = 1; s < plan.stages; ++s) {
    hidden[s].assign(static_cast<size_t>(plan.tokens(s) * kHidden), -1.0f);
    const adsc_compact_tokens_params c{hidden[s - 1].data(), plan.tokens(s - 1), kHiddenRowBytes,
                                hidden[s].data(), plan.tokens(s), kHiddenRowBytes,
                                kHiddenRowBytes, plan.index.data() + s * plan.T, 0};
    check(adsc_compact_tokens_host(&c), "adsc_compact_tokens_host");
    const std::vector<int64_t>& want = expected[s].source;
    for (int32_t j = 0; j < plan.tokens(s); ++j) {
      bool same = j < static_cast<int32_t>(want.size());
      for (int64_t ch = 0; same && ch < kHidden; ++ch)
        same = hidden[s][j * kHidden + ch] == hidden_value(want[j], ch);
      EXPECT(same, "stage %d row %d of the compacted hidden states is not input row %lld", s, j,
             j < static_cast<int32_t>(want.size()) ? (long long)want[j] : -1LL);
      const int32_t source = plan.source_index[s * plan.T + j];
      int32_t chained = j;  // the composition of the stage indices leads back to the input row
      for (int k = s; k >= 1; --k) chained = plan.index[k * plan.T + chained];
      EXPECT(chained == source, "stage %d row %d: indices compose to %d, source is %d", s, j,
             chained, source);
      EXPECT(source >= 0 && std::memcmp(&hidden[s][j * kHidden], &hidden[0][source * kHidden],
                                        kHiddenRowBytes) == 0,
             "stage %d row %d is not input row %d", s, j, source);
    }
  }
  std::printf("compaction: hidden states of");
  for (int s = 0; s < plan.stages; ++s) std::printf("%s%d", s ? " -> " : " ", plan.tokens(s));
  std::printf(" rows of %lld bytes\n", (long long)kHiddenRowBytes);

  // Paged KV writes: each stage's layers get a pool sized for the stage's tokens.
  std::vector<KvStage> kv;
  int64_t adsc_bytes = 0;
  for (int s = 0; s < plan.stages; ++s) {
    kv.push_back(allocate_kv(plan, s));
    KvStage& k = kv.back();
    k.key.resize(static_cast<size_t>(k.num_tokens * kKvRowElems));
    k.value.resize(k.key.size());
    for (int64_t j = 0; j < k.num_tokens; ++j)
      kv_rows(&hidden[s][j * kHidden], &k.key[j * kKvRowElems], &k.value[j * kKvRowElems]);
    const adsc_paged_kv_params p = kv_params(k.key.data(), k.value.data(), k.key_cache.data(),
                                             k.value_cache.data(), k.slot_mapping.data(), k);
    check(adsc_write_paged_kv_host(&p), "adsc_write_paged_kv_host");
    check_kv(plan, expected[s], s, k);
    const int layers = (s == schedule.num_steps ? kNumLayers : schedule.layers[s]) -
                       (s == 0 ? 0 : schedule.layers[s - 1]);
    adsc_bytes += layers * k.pool_bytes();
    std::printf("  stage %d KV pool: %3lld blocks of %lld, %6lld bytes per layer (x%d layers)\n", s,
                (long long)k.num_blocks, (long long)kBlockSize, (long long)k.pool_bytes(), layers);
  }
  const int64_t full_bytes = kNumLayers * kv[0].pool_bytes();
  std::printf("KV cache: %lld bytes with ADSC vs %lld unmodified (%.1f%%)\n", (long long)adsc_bytes,
              (long long)full_bytes, 100.0 * static_cast<double>(adsc_bytes) / full_bytes);
  EXPECT(adsc_bytes < full_bytes, "ADSC should need less KV memory");

  // The device path.
#if defined(ADSC_EXAMPLE_WITH_CUDA) && ADSC_EXAMPLE_WITH_CUDA
  int devices = 0;
  if (!adsc_cuda_compiled())
    std::printf("CUDA: skipped (library built without CUDA)\n");
  else if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0)
    std::printf("CUDA: skipped (no GPU)\n");
  else
    run_cuda(batch, plan, hidden, kv);
#else
  std::printf("CUDA: skipped (%s)\n", adsc_cuda_compiled()
                                         ? "example built without the CUDA runtime"
                                         : "library built without CUDA");
#endif

  if (g_failures > 0) {
    std::printf("cpp_service: %d check(s) FAILED\n", g_failures);
    return 1;
  }
  std::printf("cpp_service: all checks passed\n");
  return 0;
}
