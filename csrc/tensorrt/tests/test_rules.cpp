// Tests of the TensorRT-free rules of the AdscCompactTokens plugin (no TensorRT needed; run in
// every build). `adsc_tensorrt_rules_tests <case>`: exit 0 = pass, 1 = fail, 77 = skipped.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "compact_tokens_rules.h"

#if defined(ADSC_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace {

using adsc::Status;
using adsc::trt::ElemType;

int g_failures = 0;

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                                 \
    }                                                                               \
  } while (0)

#define CHECK_OK(expr)                                                                   \
  do {                                                                                   \
    Status s_ = (expr);                                                                  \
    if (s_ != Status::kOk) {                                                             \
      std::fprintf(stderr, "%s:%d: %s returned %s: %s\n", __FILE__, __LINE__, #expr,     \
                   adsc::status_name(s_), adsc::last_error());                           \
      ++g_failures;                                                                      \
    }                                                                                    \
  } while (0)

#define CHECK_FAILS(expr, status, needle)                                                     \
  do {                                                                                        \
    Status s_ = (expr);                                                                       \
    if (s_ != (status) || std::strstr(adsc::last_error(), (needle)) == nullptr) {             \
      std::fprintf(stderr, "%s:%d: %s: expected %s containing '%s', got %s: '%s'\n", __FILE__, \
                   __LINE__, #expr, adsc::status_name(status), (needle), adsc::status_name(s_), \
                   adsc::last_error());                                                       \
      ++g_failures;                                                                           \
    }                                                                                         \
  } while (0)

const ElemType kAllTypes[] = {ElemType::kFloat32, ElemType::kFloat16, ElemType::kInt8,
                              ElemType::kInt32,   ElemType::kBool,    ElemType::kUInt8,
                              ElemType::kFP8,     ElemType::kBFloat16, ElemType::kInt64};
const ElemType kDataTypes[] = {ElemType::kFloat32, ElemType::kFloat16, ElemType::kBFloat16};

bool is_data_type(ElemType t) {
  return t == ElemType::kFloat32 || t == ElemType::kFloat16 || t == ElemType::kBFloat16;
}

struct Rng {  // small deterministic generator (LCG)
  uint64_t state;
  explicit Rng(uint64_t seed) : state(seed * 6364136223846793005ull + 1442695040888963407ull) {}
  uint32_t next() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<uint32_t>(state >> 33);
  }
  int uniform(int lo, int hi) { return lo + static_cast<int>(next() % (hi - lo + 1)); }
};

// The oracle, written from the contract: row i of out is row index[i] of x, or zeros for -1.
std::vector<uint8_t> naive_compact(const std::vector<uint8_t>& x, int64_t row_bytes,
                                   const std::vector<int32_t>& index) {
  std::vector<uint8_t> out(index.size() * row_bytes, 0);
  for (size_t i = 0; i < index.size(); ++i)
    if (index[i] >= 0) std::memcpy(&out[i * row_bytes], &x[index[i] * row_bytes], row_bytes);
  return out;
}

int names() {
  CHECK(std::strcmp(adsc::trt::kPluginName, "AdscCompactTokens") == 0);
  CHECK(std::strcmp(adsc::trt::kPluginVersion, "1") == 0);
  CHECK(std::strcmp(adsc::trt::kPluginNamespace, "adsc") == 0);
  CHECK(adsc::trt::kNbInputs == 2 && adsc::trt::kNbOutputs == 1);
  CHECK(std::strcmp(adsc::trt::elem_type_name(ElemType::kBFloat16), "bfloat16") == 0);
  CHECK(std::strcmp(adsc::trt::elem_type_name(static_cast<ElemType>(99)), "an unknown type") == 0);
  CHECK(adsc::trt::data_elem_size(ElemType::kFloat32) == 4);
  CHECK(adsc::trt::data_elem_size(ElemType::kFloat16) == 2);
  CHECK(adsc::trt::data_elem_size(ElemType::kBFloat16) == 2);
  CHECK(adsc::trt::data_elem_size(ElemType::kInt32) == 0);
  return 0;
}

int type_rule() {
  for (ElemType x : kAllTypes) {
    for (ElemType idx : kAllTypes) {
      const ElemType in[2] = {x, idx};
      ElemType out = ElemType::kInt64;
      const Status s = adsc::trt::output_type(in, 2, &out, 1);
      if (is_data_type(x) && idx == ElemType::kInt32) {
        CHECK(s == Status::kOk);
        CHECK(out == x);
      } else {
        CHECK(s == Status::kInvalidArgument);
        CHECK(out == ElemType::kInt64);  // untouched on failure
      }
    }
  }
  const ElemType bad_x[2] = {ElemType::kInt32, ElemType::kInt32};
  const ElemType bad_index[2] = {ElemType::kFloat16, ElemType::kInt64};
  ElemType out;
  CHECK_FAILS(adsc::trt::output_type(bad_x, 2, &out, 1), Status::kInvalidArgument,
              "x must be float32, float16 or bfloat16, got int32");
  CHECK_FAILS(adsc::trt::output_type(bad_index, 2, &out, 1), Status::kInvalidArgument,
              "index must be int32, got int64");
  CHECK_FAILS(adsc::trt::output_type(bad_x, 3, &out, 1), Status::kInvalidArgument,
              "expected 2 inputs (x, index) and 1 output, got 3 inputs");
  CHECK_FAILS(adsc::trt::output_type(bad_x, 2, &out, 2), Status::kInvalidArgument, "2 outputs");
  CHECK_FAILS(adsc::trt::output_type(nullptr, 2, &out, 1), Status::kInvalidArgument, "null");
  return 0;
}

int format_rule() {
  using adsc::trt::supports_format;
  using adsc::trt::TensorFormatInfo;
  for (ElemType t : kAllTypes) {
    for (bool linear : {true, false}) {
      TensorFormatInfo io[3] = {{t, linear}, {t, linear}, {t, linear}};
      CHECK(supports_format(0, io, 2, 1) == (linear && is_data_type(t)));
      CHECK(supports_format(1, io, 2, 1) == (linear && t == ElemType::kInt32));
    }
  }
  for (ElemType x : kDataTypes) {
    for (ElemType o : kAllTypes) {
      TensorFormatInfo io[3] = {{x, true}, {ElemType::kInt32, true}, {o, true}};
      CHECK(supports_format(2, io, 2, 1) == (o == x));
      io[2].linear = false;
      CHECK(!supports_format(2, io, 2, 1));
    }
  }
  TensorFormatInfo io[3] = {{ElemType::kFloat32, true}, {ElemType::kInt32, true},
                            {ElemType::kFloat32, true}};
  CHECK(supports_format(0, io, 2, 1));
  CHECK(!supports_format(3, io, 2, 1));
  CHECK(!supports_format(-1, io, 2, 1));
  CHECK(!supports_format(0, io, 1, 1));
  CHECK(!supports_format(0, io, 2, 2));
  CHECK(!supports_format(0, nullptr, 2, 1));
  return 0;
}

int shape_rule() {
  using adsc::trt::kOutputDims;
  CHECK(kOutputDims[0].input == adsc::trt::kInputIndex && kOutputDims[0].dim == 0);
  CHECK(kOutputDims[1].input == adsc::trt::kInputX && kOutputDims[1].dim == 1);
  const int64_t x[2] = {630, 4096}, index[1] = {342};
  int64_t out[2] = {0, 0};
  CHECK_OK(adsc::trt::output_shape(2, x, 1, index, out));
  CHECK(out[0] == 342 && out[1] == 4096);
  const int64_t x_dyn[2] = {-1, 64}, index_dyn[1] = {-1};
  CHECK_OK(adsc::trt::output_shape(2, x_dyn, 1, index_dyn, out));
  CHECK(out[0] == -1 && out[1] == 64);
  const int64_t x3[3] = {1, 630, 64};
  CHECK_FAILS(adsc::trt::output_shape(3, x3, 1, index, out), Status::kInvalidArgument,
              "x must be [T, D] (rank 2), got rank 3");
  CHECK_FAILS(adsc::trt::output_shape(2, x, 2, x, out), Status::kInvalidArgument,
              "index must be [T_s] (rank 1), got rank 2");
  CHECK_FAILS(adsc::trt::output_shape(2, nullptr, 1, index, out), Status::kInvalidArgument, "null");
  const int32_t ranks[2] = {2, 1};
  CHECK_OK(adsc::trt::check_input_ranks(ranks, 2));
  CHECK_FAILS(adsc::trt::check_input_ranks(ranks, 1), Status::kInvalidArgument, "got 1");
  return 0;
}

int fields() {
  CHECK_OK(adsc::trt::parse_fields(nullptr, 0));
  const char* names[2] = {"plugin_version", "factor"};
  CHECK_FAILS(adsc::trt::parse_fields(names, 2), Status::kInvalidArgument,
              "AdscCompactTokens takes no fields, got 2 (the first is 'plugin_version')");
  CHECK_FAILS(adsc::trt::parse_fields(nullptr, 1), Status::kInvalidArgument, "no field array");
  CHECK_FAILS(adsc::trt::parse_fields(names, -1), Status::kInvalidArgument, "-1 fields");
  return 0;
}

// Builds a random case: x [rows, d] of `type` as bytes, index [out_rows] in [-1, rows).
struct Case {
  ElemType type;
  int64_t rows, d, out_rows;
  std::vector<uint8_t> x;
  std::vector<int32_t> index;
  int64_t row_bytes() const { return d * adsc::trt::data_elem_size(type); }
};

std::vector<Case> make_cases() {
  Rng rng(12);
  std::vector<Case> cases;
  for (ElemType type : kDataTypes) {
    for (int64_t d : {1, 3, 8, 64, 4096}) {
      for (int64_t rows : {0, 1, 37}) {
        Case c{type, rows, d, rows == 0 ? 5 : 29, {}, {}};
        c.x.resize(rows * c.row_bytes());
        for (auto& b : c.x) b = static_cast<uint8_t>(rng.next());
        c.index.resize(c.out_rows);
        for (auto& i : c.index) i = rng.uniform(-1, static_cast<int>(rows) - 1);
        cases.push_back(std::move(c));
      }
    }
  }
  return cases;
}

int compaction_host() {
  for (const Case& c : make_cases()) {
    std::vector<uint8_t> out(c.out_rows * c.row_bytes(), 0xCD);
    adsc::trt::CompactCall call;
    call.type = c.type; call.x = c.x.data(); call.x_rows = c.rows; call.row_elems = c.d;
    call.index = c.index.data(); call.out_rows = c.out_rows; call.out = out.data();
    CHECK_OK(adsc::trt::compact_tokens_host(call));
    CHECK(out == naive_compact(c.x, c.row_bytes(), c.index));
  }
  // The parameters handed to the core: packed rows of D * element size bytes, int32 index.
  adsc::trt::CompactCall call;
  call.type = ElemType::kBFloat16; call.x_rows = 10; call.row_elems = 6; call.out_rows = 4;
  adsc::CompactTokensParams p;
  CHECK_OK(adsc::trt::compact_params(call, &p));
  CHECK(p.row_bytes == 12 && p.src_row_stride == 12 && p.dst_row_stride == 12);
  CHECK(p.src_rows == 10 && p.dst_rows == 4 && !p.index_is_int64);
  // Errors: type, negative sizes, an index out of range (host path), null params.
  call.type = ElemType::kInt32;
  CHECK_FAILS(adsc::trt::compact_params(call, &p), Status::kInvalidArgument, "got int32");
  call.type = ElemType::kFloat32; call.out_rows = -1;
  CHECK_FAILS(adsc::trt::compact_params(call, &p), Status::kInvalidArgument, "negative size");
  CHECK_FAILS(adsc::trt::compact_params(call, nullptr), Status::kInvalidArgument, "null params");
  std::vector<float> x(4 * 2, 1.0f), out(2 * 2, 0.0f);
  std::vector<int32_t> index = {1, 4};
  call.x = x.data(); call.x_rows = 4; call.row_elems = 2; call.out_rows = 2;
  call.index = index.data(); call.out = out.data();
  CHECK(adsc::trt::compact_tokens_host(call) == Status::kIndexOutOfRange);
  return 0;
}

#if defined(ADSC_WITH_CUDA)
bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}
#endif

// The device launcher against the host one, bit for bit, on a stream; skipped without a GPU. In a
// core built without CUDA the launcher must say so (kNotCompiled) rather than do anything.
int compaction_device() {
#if defined(ADSC_WITH_CUDA)
  if (!have_gpu()) return 77;
  cudaStream_t stream = nullptr;
  CHECK(cudaStreamCreate(&stream) == cudaSuccess);
  for (const Case& c : make_cases()) {
    const size_t out_bytes = c.out_rows * c.row_bytes();
    void *d_x = nullptr, *d_out = nullptr, *d_index = nullptr;
    CHECK(cudaMalloc(&d_x, c.x.size() + 1) == cudaSuccess);
    CHECK(cudaMalloc(&d_out, out_bytes + 1) == cudaSuccess);
    CHECK(cudaMalloc(&d_index, c.index.size() * 4 + 1) == cudaSuccess);
    cudaMemcpy(d_x, c.x.data(), c.x.size(), cudaMemcpyHostToDevice);
    cudaMemcpy(d_index, c.index.data(), c.index.size() * 4, cudaMemcpyHostToDevice);
    cudaMemset(d_out, 0xCD, out_bytes);
    adsc::trt::CompactCall call;
    call.type = c.type; call.x = d_x; call.x_rows = c.rows; call.row_elems = c.d;
    call.index = static_cast<const int32_t*>(d_index); call.out_rows = c.out_rows; call.out = d_out;
    CHECK_OK(adsc::trt::compact_tokens_device(call, reinterpret_cast<adsc_stream_t>(stream)));
    CHECK(cudaStreamSynchronize(stream) == cudaSuccess);
    std::vector<uint8_t> got(out_bytes);
    cudaMemcpy(got.data(), d_out, out_bytes, cudaMemcpyDeviceToHost);
    CHECK(got == naive_compact(c.x, c.row_bytes(), c.index));
    cudaFree(d_x); cudaFree(d_out); cudaFree(d_index);
  }
  cudaStreamDestroy(stream);
  return 0;
#else
  std::vector<float> x(4, 1.0f), out(2, 0.0f);
  std::vector<int32_t> index = {1, -1};
  adsc::trt::CompactCall call;
  call.x = x.data(); call.x_rows = 2; call.row_elems = 2; call.index = index.data();
  call.out_rows = 1; call.out = out.data();
  CHECK_FAILS(adsc::trt::compact_tokens_device(call, nullptr), Status::kNotCompiled,
              "no CUDA support");
  return 0;
#endif
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, std::function<int()>> cases = {
      {"names", names},           {"type_rule", type_rule},
      {"format_rule", format_rule}, {"shape_rule", shape_rule},
      {"fields", fields},         {"compaction_host", compaction_host},
      {"compaction_device", compaction_device},
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
