// Tests of the AdscCompactTokens TensorRT adapter, through the library's exported entry points the
// way TensorRT reaches it: dlopen libadsc_tensorrt.so, getCreators, then only the TensorRT
// interfaces. Needs TensorRT's headers, not its libraries (nothing here calls into TensorRT).
// `adsc_tensorrt_plugin_tests <case> [library]`: exit 0 = pass, 1 = fail, 77 = skipped (no GPU).
#include <NvInferRuntime.h>
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "compact_tokens_rules.h"

namespace {

using nvinfer1::DataType;
using nvinfer1::TensorFormat;

int g_failures = 0;

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                                 \
    }                                                                               \
  } while (0)

// ---- what TensorRT would provide: a logger, an expression builder ------------------------------

class TestLogger final : public nvinfer1::ILogger {
 public:
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kERROR) errors.emplace_back(msg);
  }
  bool logged(const char* needle) const {
    for (const auto& e : errors)
      if (e.find(needle) != std::string::npos) return true;
    return false;
  }
  std::vector<std::string> errors;
};

class TestLoggerFinder final : public nvinfer1::ILoggerFinder {
 public:
  explicit TestLoggerFinder(nvinfer1::ILogger* logger) : logger_(logger) {}
  nvinfer1::ILogger* findLogger() override { return logger_; }

 private:
  nvinfer1::ILogger* logger_;
};

// IDimensionExpr and IExprBuilder forward to an apiv implementation (mImpl); these test ones hold
// a constant or a named symbol and record every call.
class TestExprImpl final : public nvinfer1::apiv::VDimensionExpr {
 public:
  TestExprImpl(bool is_constant, int64_t value) : is_constant_(is_constant), value_(value) {}
  bool isConstant() const override { return is_constant_; }
  int64_t getConstantValue() const override {
    return is_constant_ ? value_ : std::numeric_limits<int64_t>::min();
  }
  bool isSizeTensor() const override { return false; }

 private:
  bool is_constant_;
  int64_t value_;
};

class TestExpr final : public nvinfer1::IDimensionExpr {
 public:
  TestExpr(bool is_constant, int64_t value) : impl_(is_constant, value) { mImpl = &impl_; }
  ~TestExpr() noexcept override = default;

 private:
  TestExprImpl impl_;
};

class TestExprBuilderImpl final : public nvinfer1::apiv::VExprBuilder {
 public:
  const nvinfer1::IDimensionExpr* constant(int64_t value) override {
    ++calls;
    exprs.emplace_back(std::make_unique<TestExpr>(true, value));
    return exprs.back().get();
  }
  const nvinfer1::IDimensionExpr* operation(nvinfer1::DimensionOperation,
                                            const nvinfer1::IDimensionExpr&,
                                            const nvinfer1::IDimensionExpr&) override {
    ++calls;
    exprs.emplace_back(std::make_unique<TestExpr>(false, 0));
    return exprs.back().get();
  }
  const nvinfer1::IDimensionExpr* declareSizeTensor(int32_t, const nvinfer1::IDimensionExpr&,
                                                    const nvinfer1::IDimensionExpr&) override {
    ++calls;
    return nullptr;
  }
  int calls = 0;
  std::deque<std::unique_ptr<TestExpr>> exprs;
};

class TestExprBuilder final : public nvinfer1::IExprBuilder {
 public:
  TestExprBuilder() { mImpl = &impl; }
  ~TestExprBuilder() noexcept override = default;
  TestExprBuilderImpl impl;
};

// ---- the library, loaded as TensorRT loads it ---------------------------------------------------

const char* g_library = ADSC_TENSORRT_PLUGIN_PATH;
TestLogger g_logger;
TestLoggerFinder g_logger_finder(&g_logger);

using GetCreators = nvinfer1::IPluginCreatorInterface* const* (*)(int32_t&);
using SetLoggerFinder = void (*)(nvinfer1::ILoggerFinder*);

nvinfer1::IPluginCreatorV3One* load_creator() {
  static nvinfer1::IPluginCreatorV3One* creator = [] () -> nvinfer1::IPluginCreatorV3One* {
    void* lib = dlopen(g_library, RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      std::fprintf(stderr, "dlopen(%s): %s\n", g_library, dlerror());
      return nullptr;
    }
    auto set_logger_finder = reinterpret_cast<SetLoggerFinder>(dlsym(lib, "setLoggerFinder"));
    auto get_creators = reinterpret_cast<GetCreators>(dlsym(lib, "getCreators"));
    if (set_logger_finder == nullptr || get_creators == nullptr) {
      std::fprintf(stderr, "%s lacks setLoggerFinder or getCreators\n", g_library);
      return nullptr;
    }
    set_logger_finder(&g_logger_finder);
    int32_t n = -1;
    nvinfer1::IPluginCreatorInterface* const* creators = get_creators(n);
    if (n != 1 || creators == nullptr || creators[0] == nullptr) {
      std::fprintf(stderr, "getCreators returned %d creators\n", n);
      return nullptr;
    }
    const nvinfer1::InterfaceInfo info = creators[0]->getInterfaceInfo();
    if (std::strcmp(info.kind, "PLUGIN CREATOR_V3ONE") != 0 || info.major != 1) {
      std::fprintf(stderr, "creator kind %s %d.%d, expected PLUGIN CREATOR_V3ONE 1\n", info.kind,
                   info.major, info.minor);
      return nullptr;
    }
    return static_cast<nvinfer1::IPluginCreatorV3One*>(creators[0]);
  }();
  return creator;
}

// The plugin and its three capabilities, as TensorRT obtains them.
struct Plugin {
  std::unique_ptr<nvinfer1::IPluginV3> plugin;
  nvinfer1::IPluginV3OneCore* core = nullptr;
  nvinfer1::IPluginV3OneBuild* build = nullptr;
  nvinfer1::IPluginV3OneRuntime* runtime = nullptr;
  explicit operator bool() const { return plugin && core && build && runtime; }
};

Plugin wrap(nvinfer1::IPluginV3* p) {
  Plugin out;
  out.plugin.reset(p);
  if (p == nullptr) return out;
  out.core = static_cast<nvinfer1::IPluginV3OneCore*>(
      p->getCapabilityInterface(nvinfer1::PluginCapabilityType::kCORE));
  out.build = static_cast<nvinfer1::IPluginV3OneBuild*>(
      p->getCapabilityInterface(nvinfer1::PluginCapabilityType::kBUILD));
  out.runtime = static_cast<nvinfer1::IPluginV3OneRuntime*>(
      p->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
  return out;
}

Plugin make_plugin(nvinfer1::TensorRTPhase phase = nvinfer1::TensorRTPhase::kBUILD,
                   const nvinfer1::PluginFieldCollection* fc = nullptr) {
  nvinfer1::IPluginCreatorV3One* creator = load_creator();
  if (creator == nullptr) return {};
  nvinfer1::PluginFieldCollection empty{};
  return wrap(creator->createPlugin("compact_0", fc != nullptr ? fc : &empty, phase));
}

nvinfer1::Dims dims(std::initializer_list<int64_t> d) {
  nvinfer1::Dims out{};
  out.nbDims = static_cast<int32_t>(d.size());
  int k = 0;
  for (int64_t v : d) out.d[k++] = v;
  return out;
}

nvinfer1::DynamicPluginTensorDesc dyn_desc(DataType type, nvinfer1::Dims d,
                                           TensorFormat format = TensorFormat::kLINEAR) {
  nvinfer1::DynamicPluginTensorDesc out{};
  out.desc.dims = d;
  out.desc.type = type;
  out.desc.format = format;
  out.desc.scale = 1.0f;
  out.min = d;
  out.opt = d;
  out.max = d;
  return out;
}

const DataType kAllTypes[] = {DataType::kFLOAT, DataType::kHALF,  DataType::kINT8,
                              DataType::kINT32, DataType::kBOOL,  DataType::kUINT8,
                              DataType::kFP8,   DataType::kBF16,  DataType::kINT64,
                              DataType::kINT4,  DataType::kFP4,   DataType::kE8M0};
const DataType kDataTypes[] = {DataType::kFLOAT, DataType::kHALF, DataType::kBF16};

bool is_data_type(DataType t) {
  return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16;
}

// ---- cases --------------------------------------------------------------------------------------

int entry_points() {
  CHECK(load_creator() != nullptr);
  return 0;
}

int names_version_namespace() {
  nvinfer1::IPluginCreatorV3One* creator = load_creator();
  CHECK(creator != nullptr);
  if (creator == nullptr) return 0;
  CHECK(std::strcmp(creator->getPluginName(), "AdscCompactTokens") == 0);
  CHECK(std::strcmp(creator->getPluginVersion(), "1") == 0);
  CHECK(std::strcmp(creator->getPluginNamespace(), "adsc") == 0);
  const nvinfer1::PluginFieldCollection* names = creator->getFieldNames();
  CHECK(names != nullptr && names->nbFields == 0);
  Plugin p = make_plugin();
  CHECK(static_cast<bool>(p));
  if (!p) return 0;
  CHECK(std::strcmp(p.plugin->getInterfaceInfo().kind, "PLUGIN") == 0);
  CHECK(std::strcmp(p.core->getInterfaceInfo().kind, "PLUGIN_V3ONE_CORE") == 0);
  CHECK(std::strcmp(p.build->getInterfaceInfo().kind, "PLUGIN_V3ONE_BUILD") == 0);
  CHECK(std::strcmp(p.runtime->getInterfaceInfo().kind, "PLUGIN_V3ONE_RUNTIME") == 0);
  CHECK(std::strcmp(p.core->getPluginName(), "AdscCompactTokens") == 0);
  CHECK(std::strcmp(p.core->getPluginVersion(), "1") == 0);
  CHECK(std::strcmp(p.core->getPluginNamespace(), "adsc") == 0);
  CHECK(p.plugin->getCapabilityInterface(static_cast<nvinfer1::PluginCapabilityType>(7)) == nullptr);
  return 0;
}

int outputs_and_types() {
  Plugin p = make_plugin();
  CHECK(static_cast<bool>(p));
  if (!p) return 0;
  CHECK(p.build->getNbOutputs() == 1);
  for (DataType x : kAllTypes) {
    for (DataType idx : kAllTypes) {
      const DataType in[2] = {x, idx};
      DataType out = DataType::kINT8;
      const int32_t rc = p.build->getOutputDataTypes(&out, 1, in, 2);
      if (is_data_type(x) && idx == DataType::kINT32) {
        CHECK(rc == 0);
        CHECK(out == x);
      } else {
        CHECK(rc != 0);
      }
    }
  }
  g_logger.errors.clear();
  const DataType wrong[2] = {DataType::kHALF, DataType::kINT64};
  DataType out;
  CHECK(p.build->getOutputDataTypes(&out, 1, wrong, 2) != 0);
  CHECK(g_logger.logged("AdscCompactTokens: index must be int32, got int64"));
  CHECK(p.build->getOutputDataTypes(&out, 2, wrong, 2) != 0);
  CHECK(p.build->getOutputDataTypes(&out, 1, wrong, 1) != 0);
  // configurePlugin checks the same rules on the descriptors TensorRT settles on.
  nvinfer1::DynamicPluginTensorDesc in[2] = {dyn_desc(DataType::kBF16, dims({-1, 64})),
                                             dyn_desc(DataType::kINT32, dims({-1}))};
  nvinfer1::DynamicPluginTensorDesc o = dyn_desc(DataType::kBF16, dims({-1, 64}));
  CHECK(p.build->configurePlugin(in, 2, &o, 1) == 0);
  o.desc.type = DataType::kFLOAT;
  CHECK(p.build->configurePlugin(in, 2, &o, 1) != 0);
  o.desc.type = DataType::kBF16;
  in[0].desc.dims = dims({1, 630, 64});
  CHECK(p.build->configurePlugin(in, 2, &o, 1) != 0);
  CHECK(g_logger.logged("x must be [T, D] (rank 2), got rank 3"));
  nvinfer1::DynamicPluginTensorDesc no_ws[2] = {dyn_desc(DataType::kHALF, dims({8, 4})),
                                                dyn_desc(DataType::kINT32, dims({3}))};
  nvinfer1::DynamicPluginTensorDesc no_ws_out = dyn_desc(DataType::kHALF, dims({3, 4}));
  CHECK(p.build->getWorkspaceSize(no_ws, 2, &no_ws_out, 1) == 0);  // enqueue allocates nothing
  return 0;
}

int shape_rule() {
  Plugin p = make_plugin();
  CHECK(static_cast<bool>(p));
  if (!p) return 0;
  TestExprBuilder builder;
  TestExpr T(false, 0), D(true, 4096), Ts(false, 0), one(true, 1);
  nvinfer1::DimsExprs in[2]{};
  in[0].nbDims = 2; in[0].d[0] = &T; in[0].d[1] = &D;
  in[1].nbDims = 1; in[1].d[0] = &Ts;
  nvinfer1::DimsExprs out[1]{};
  CHECK(p.build->getOutputShapes(in, 2, nullptr, 0, out, 1, builder) == 0);
  CHECK(out[0].nbDims == 2);
  CHECK(out[0].d[0] == &Ts);  // T_s: the index's length, symbolic
  CHECK(out[0].d[1] == &D);   // D: x's width, a build-time constant here
  CHECK(out[0].d[1]->isConstant() && out[0].d[1]->getConstantValue() == 4096);
  CHECK(!out[0].d[0]->isConstant());
  CHECK(builder.impl.calls == 0);  // pure forwarding: no new expressions
  // Wrong ranks, counts or shape inputs fail with a logged reason.
  g_logger.errors.clear();
  nvinfer1::DimsExprs bad[2] = {in[0], in[1]};
  bad[0].nbDims = 3; bad[0].d[2] = &one;
  CHECK(p.build->getOutputShapes(bad, 2, nullptr, 0, out, 1, builder) != 0);
  CHECK(g_logger.logged("x must be [T, D] (rank 2), got rank 3"));
  bad[0] = in[0]; bad[1].nbDims = 2; bad[1].d[1] = &one;
  CHECK(p.build->getOutputShapes(bad, 2, nullptr, 0, out, 1, builder) != 0);
  CHECK(g_logger.logged("index must be [T_s] (rank 1), got rank 2"));
  CHECK(p.build->getOutputShapes(in, 1, nullptr, 0, out, 1, builder) != 0);
  CHECK(p.build->getOutputShapes(in, 2, in, 1, out, 1, builder) != 0);
  CHECK(p.build->getOutputShapes(in, 2, nullptr, 0, out, 2, builder) != 0);
  // onShapeChange checks the concrete dims of a run against the same rule.
  nvinfer1::PluginTensorDesc rin[2]{}, rout{};
  rin[0].dims = dims({630, 64}); rin[0].type = DataType::kHALF; rin[0].format = TensorFormat::kLINEAR;
  rin[1].dims = dims({342}); rin[1].type = DataType::kINT32; rin[1].format = TensorFormat::kLINEAR;
  rout.dims = dims({342, 64}); rout.type = DataType::kHALF; rout.format = TensorFormat::kLINEAR;
  CHECK(p.runtime->onShapeChange(rin, 2, &rout, 1) == 0);
  rout.dims = dims({341, 64});
  CHECK(p.runtime->onShapeChange(rin, 2, &rout, 1) != 0);
  CHECK(g_logger.logged("output dims do not match [index.d[0], x.d[1]] = [342, 64]"));
  return 0;
}

int field_round_trip() {
  Plugin built = make_plugin(nvinfer1::TensorRTPhase::kBUILD);
  CHECK(static_cast<bool>(built));
  if (!built) return 0;
  const nvinfer1::PluginFieldCollection* fc = built.runtime->getFieldsToSerialize();
  CHECK(fc != nullptr && fc->nbFields == 0);
  // What TensorRT does when it deserialises an engine: the creator, the serialised fields,
  // the runtime phase.
  Plugin restored = make_plugin(nvinfer1::TensorRTPhase::kRUNTIME, fc);
  CHECK(static_cast<bool>(restored));
  if (!restored) return 0;
  CHECK(std::strcmp(restored.core->getPluginName(), built.core->getPluginName()) == 0);
  CHECK(std::strcmp(restored.core->getPluginVersion(), built.core->getPluginVersion()) == 0);
  CHECK(std::strcmp(restored.core->getPluginNamespace(), built.core->getPluginNamespace()) == 0);
  const nvinfer1::PluginFieldCollection* fc2 = restored.runtime->getFieldsToSerialize();
  CHECK(fc2 != nullptr && fc2->nbFields == fc->nbFields);
  // clone and attachToContext give independent, complete plugins.
  Plugin cloned = wrap(restored.plugin->clone());
  CHECK(static_cast<bool>(cloned) && cloned.plugin.get() != restored.plugin.get());
  Plugin attached = wrap(restored.runtime->attachToContext(nullptr));
  CHECK(static_cast<bool>(attached) && attached.plugin.get() != restored.plugin.get());
  // A field the plugin does not have (a node from another exporter, a stale engine) is refused
  // with its name, in either phase.
  g_logger.errors.clear();
  const int32_t one = 1;
  const nvinfer1::PluginField field("factor", &one, nvinfer1::PluginFieldType::kINT32, 1);
  const nvinfer1::PluginFieldCollection extra{1, &field};
  CHECK(!make_plugin(nvinfer1::TensorRTPhase::kBUILD, &extra));
  CHECK(!make_plugin(nvinfer1::TensorRTPhase::kRUNTIME, &extra));
  CHECK(g_logger.logged("AdscCompactTokens takes no fields, got 1 (the first is 'factor')"));
  const nvinfer1::PluginFieldCollection broken{2, nullptr};
  CHECK(!make_plugin(nvinfer1::TensorRTPhase::kBUILD, &broken));
  // A null collection is the same as an empty one.
  nvinfer1::IPluginCreatorV3One* creator = load_creator();
  Plugin null_fc = wrap(creator->createPlugin("compact_1", nullptr, nvinfer1::TensorRTPhase::kBUILD));
  CHECK(static_cast<bool>(null_fc));
  return 0;
}

int formats() {
  Plugin p = make_plugin();
  CHECK(static_cast<bool>(p));
  if (!p) return 0;
  const TensorFormat kFormats[] = {TensorFormat::kLINEAR, TensorFormat::kCHW2, TensorFormat::kHWC8,
                                   TensorFormat::kCHW32};
  for (DataType t : kAllTypes) {
    for (TensorFormat f : kFormats) {
      const bool linear = f == TensorFormat::kLINEAR;
      nvinfer1::DynamicPluginTensorDesc io[3] = {dyn_desc(t, dims({-1, 64}), f),
                                                 dyn_desc(t, dims({-1}), f),
                                                 dyn_desc(t, dims({-1, 64}), f)};
      CHECK(p.build->supportsFormatCombination(0, io, 2, 1) == (linear && is_data_type(t)));
      CHECK(p.build->supportsFormatCombination(1, io, 2, 1) == (linear && t == DataType::kINT32));
    }
  }
  for (DataType x : kDataTypes) {
    for (DataType o : kAllTypes) {
      nvinfer1::DynamicPluginTensorDesc io[3] = {dyn_desc(x, dims({-1, 64})),
                                                 dyn_desc(DataType::kINT32, dims({-1})),
                                                 dyn_desc(o, dims({-1, 64}))};
      CHECK(p.build->supportsFormatCombination(2, io, 2, 1) == (o == x));  // output: x's type
    }
  }
  // A wrong one: an fp16 x with a bf16 output, an int64 index, a position past the end.
  nvinfer1::DynamicPluginTensorDesc io[3] = {dyn_desc(DataType::kHALF, dims({-1, 64})),
                                             dyn_desc(DataType::kINT64, dims({-1})),
                                             dyn_desc(DataType::kBF16, dims({-1, 64}))};
  CHECK(p.build->supportsFormatCombination(0, io, 2, 1));
  CHECK(!p.build->supportsFormatCombination(1, io, 2, 1));
  CHECK(!p.build->supportsFormatCombination(2, io, 2, 1));
  CHECK(!p.build->supportsFormatCombination(3, io, 2, 1));
  CHECK(!p.build->supportsFormatCombination(0, io, 3, 1));
  return 0;
}

bool have_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

// enqueue on TensorRT's stream against the core's CPU compaction, bit for bit, every dtype.
int enqueue_matches_cpu() {
  if (!have_gpu()) return 77;
  Plugin p = make_plugin(nvinfer1::TensorRTPhase::kRUNTIME);
  CHECK(static_cast<bool>(p));
  if (!p) return 0;
  cudaStream_t stream = nullptr;
  CHECK(cudaStreamCreate(&stream) == cudaSuccess);
  uint64_t state = 99;
  auto next = [&state] { state = state * 6364136223846793005ull + 1442695040888963407ull; return static_cast<uint32_t>(state >> 33); };
  for (DataType type : kDataTypes) {
    const int64_t elem = type == DataType::kFLOAT ? 4 : 2;
    for (int64_t d : {1, 7, 64, 4096}) {
      const int64_t rows = 630, out_rows = 342, row_bytes = d * elem;
      std::vector<uint8_t> x(rows * row_bytes);
      for (auto& b : x) b = static_cast<uint8_t>(next());
      std::vector<int32_t> index(out_rows);
      for (auto& i : index) i = static_cast<int32_t>(next() % (rows + 1)) - 1;  // -1 .. rows-1
      index[0] = -1;
      std::vector<uint8_t> want(out_rows * row_bytes, 0xCD);
      adsc::trt::CompactCall host;
      host.type = static_cast<adsc::trt::ElemType>(static_cast<int32_t>(type));
      host.x = x.data(); host.x_rows = rows; host.row_elems = d;
      host.index = index.data(); host.out_rows = out_rows; host.out = want.data();
      CHECK(adsc::trt::compact_tokens_host(host) == adsc::Status::kOk);

      void *d_x = nullptr, *d_index = nullptr, *d_out = nullptr;
      CHECK(cudaMalloc(&d_x, x.size()) == cudaSuccess);
      CHECK(cudaMalloc(&d_index, index.size() * 4) == cudaSuccess);
      CHECK(cudaMalloc(&d_out, want.size()) == cudaSuccess);
      cudaMemcpy(d_x, x.data(), x.size(), cudaMemcpyHostToDevice);
      cudaMemcpy(d_index, index.data(), index.size() * 4, cudaMemcpyHostToDevice);
      cudaMemset(d_out, 0xCD, want.size());
      nvinfer1::PluginTensorDesc in[2]{}, out{};
      in[0].dims = dims({rows, d}); in[0].type = type; in[0].format = TensorFormat::kLINEAR;
      in[1].dims = dims({out_rows}); in[1].type = DataType::kINT32; in[1].format = TensorFormat::kLINEAR;
      out.dims = dims({out_rows, d}); out.type = type; out.format = TensorFormat::kLINEAR;
      CHECK(p.runtime->onShapeChange(in, 2, &out, 1) == 0);
      const void* inputs[2] = {d_x, d_index};
      void* outputs[1] = {d_out};
      CHECK(p.runtime->enqueue(in, &out, inputs, outputs, nullptr, stream) == 0);
      CHECK(cudaStreamSynchronize(stream) == cudaSuccess);
      std::vector<uint8_t> got(want.size());
      cudaMemcpy(got.data(), d_out, got.size(), cudaMemcpyDeviceToHost);
      CHECK(got == want);
      cudaFree(d_x); cudaFree(d_index); cudaFree(d_out);
    }
  }
  cudaStreamDestroy(stream);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, std::function<int()>> cases = {
      {"entry_points", entry_points},
      {"names_version_namespace", names_version_namespace},
      {"outputs_and_types", outputs_and_types},
      {"shape_rule", shape_rule},
      {"field_round_trip", field_round_trip},
      {"formats", formats},
      {"enqueue_matches_cpu", enqueue_matches_cpu},
  };
  if (argc < 2 || argc > 3 || !cases.count(argv[1])) {
    std::fprintf(stderr, "usage: %s <case> [libadsc_tensorrt.so]; cases:", argv[0]);
    for (const auto& c : cases) std::fprintf(stderr, " %s", c.first.c_str());
    std::fprintf(stderr, "\n");
    return 2;
  }
  if (argc == 3) g_library = argv[2];
  const int rc = cases.at(argv[1])();
  if (rc == 77) {
    std::printf("%s: skipped (no GPU)\n", argv[1]);
    return 77;
  }
  std::printf("%s: %s\n", argv[1], g_failures ? "FAILED" : "passed");
  return g_failures ? 1 : 0;
}
