// The AdscCompactTokens TensorRT plugin: TensorRT's interfaces over compact_tokens_rules.h.
#include "compact_tokens_plugin.h"

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <new>
#include <vector>

#include "compact_tokens_rules.h"

namespace adsc {
namespace trt {

// ElemType mirrors nvinfer1::DataType; these are the values the rules rely on.
static_assert(static_cast<int32_t>(nvinfer1::DataType::kFLOAT) == static_cast<int32_t>(ElemType::kFloat32));
static_assert(static_cast<int32_t>(nvinfer1::DataType::kHALF) == static_cast<int32_t>(ElemType::kFloat16));
static_assert(static_cast<int32_t>(nvinfer1::DataType::kINT32) == static_cast<int32_t>(ElemType::kInt32));
static_assert(static_cast<int32_t>(nvinfer1::DataType::kBF16) == static_cast<int32_t>(ElemType::kBFloat16));
static_assert(static_cast<int32_t>(nvinfer1::DataType::kINT64) == static_cast<int32_t>(ElemType::kInt64));

namespace {

std::atomic<nvinfer1::ILoggerFinder*> g_logger_finder{nullptr};

ElemType elem_type(nvinfer1::DataType type) noexcept {
  return static_cast<ElemType>(static_cast<int32_t>(type));
}

// Logs "AdscCompactTokens: <message>" as an error through TensorRT's logger (stderr if none).
void log_error(const char* format, ...) noexcept
#if defined(__GNUC__)
    __attribute__((format(printf, 1, 2)))
#endif
    ;
void log_error(const char* format, ...) noexcept {
  char message[1024];
  va_list args;
  va_start(args, format);
  std::vsnprintf(message, sizeof(message), format, args);
  va_end(args);
  if (nvinfer1::ILogger* logger = plugin_logger()) {
    logger->log(nvinfer1::ILogger::Severity::kERROR, message);
  } else {
    std::fprintf(stderr, "[adsc_tensorrt] error: %s\n", message);
  }
}

// 0 if `status` is ok, else logs what the core said (it names the plugin) and returns -1.
int32_t report(Status status) noexcept {
  if (status == Status::kOk) return 0;
  log_error("%s (%s)", last_error(), status_name(status));
  return -1;
}

bool is_linear(nvinfer1::TensorFormat format) noexcept {
  return format == nvinfer1::TensorFormat::kLINEAR;
}

}  // namespace

nvinfer1::ILogger* plugin_logger() noexcept {
  nvinfer1::ILoggerFinder* finder = g_logger_finder.load();
  if (finder == nullptr) return nullptr;
  try {
    return finder->findLogger();
  } catch (...) {
    return nullptr;
  }
}

void set_plugin_logger_finder(nvinfer1::ILoggerFinder* finder) noexcept {
  nvinfer1::ILoggerFinder* expected = nullptr;
  if (finder != nullptr) g_logger_finder.compare_exchange_strong(expected, finder);  // first wins
}

// ---- CompactTokensPlugin ------------------------------------------------------------------------

nvinfer1::IPluginCapability* CompactTokensPlugin::getCapabilityInterface(
    nvinfer1::PluginCapabilityType type) noexcept {
  switch (type) {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME:
      return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

nvinfer1::IPluginV3* CompactTokensPlugin::clone() noexcept {
  auto* copy = new (std::nothrow) CompactTokensPlugin(*this);
  if (copy == nullptr) log_error("%s: out of host memory in clone", kPluginName);
  return copy;
}

const char* CompactTokensPlugin::getPluginName() const noexcept { return kPluginName; }
const char* CompactTokensPlugin::getPluginVersion() const noexcept { return kPluginVersion; }
const char* CompactTokensPlugin::getPluginNamespace() const noexcept { return kPluginNamespace; }

int32_t CompactTokensPlugin::configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in,
                                             int32_t nb_inputs,
                                             const nvinfer1::DynamicPluginTensorDesc* out,
                                             int32_t nb_outputs) noexcept {
  if (in == nullptr || out == nullptr || nb_inputs != kNbInputs || nb_outputs != kNbOutputs)
    return report(fail(Status::kInvalidArgument, "%s: configurePlugin with %d inputs, %d outputs",
                       kPluginName, nb_inputs, nb_outputs));
  const ElemType types[kNbInputs] = {elem_type(in[kInputX].desc.type),
                                     elem_type(in[kInputIndex].desc.type)};
  ElemType out_type;
  if (const int32_t rc = report(output_type(types, kNbInputs, &out_type, kNbOutputs))) return rc;
  if (elem_type(out[0].desc.type) != out_type)
    return report(fail(Status::kInvalidArgument, "%s: output type %s differs from x's %s",
                       kPluginName, elem_type_name(elem_type(out[0].desc.type)),
                       elem_type_name(out_type)));
  int64_t want[kOutputRank];
  if (const int32_t rc = report(output_shape(in[kInputX].desc.dims.nbDims, in[kInputX].desc.dims.d,
                                             in[kInputIndex].desc.dims.nbDims,
                                             in[kInputIndex].desc.dims.d, want)))
    return rc;
  return 0;
}

int32_t CompactTokensPlugin::getOutputDataTypes(nvinfer1::DataType* output_types,
                                                int32_t nb_outputs,
                                                const nvinfer1::DataType* input_types,
                                                int32_t nb_inputs) const noexcept {
  if (input_types == nullptr || output_types == nullptr || nb_inputs != kNbInputs ||
      nb_outputs != kNbOutputs)
    return report(output_type(nullptr, nb_inputs, nullptr, nb_outputs));
  const ElemType in[kNbInputs] = {elem_type(input_types[kInputX]), elem_type(input_types[kInputIndex])};
  ElemType out;
  if (const int32_t rc = report(output_type(in, kNbInputs, &out, kNbOutputs))) return rc;
  output_types[0] = static_cast<nvinfer1::DataType>(static_cast<int32_t>(out));
  return 0;
}

int32_t CompactTokensPlugin::getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs,
                                             const nvinfer1::DimsExprs* /*shape_inputs*/,
                                             int32_t nb_shape_inputs, nvinfer1::DimsExprs* outputs,
                                             int32_t nb_outputs,
                                             nvinfer1::IExprBuilder& /*expr_builder*/) noexcept {
  if (inputs == nullptr || outputs == nullptr || nb_inputs != kNbInputs ||
      nb_outputs != kNbOutputs || nb_shape_inputs != 0)
    return report(fail(Status::kInvalidArgument,
                       "%s: getOutputShapes with %d inputs, %d shape inputs, %d outputs "
                       "(expected %d, 0, %d)",
                       kPluginName, nb_inputs, nb_shape_inputs, nb_outputs, kNbInputs, kNbOutputs));
  const int32_t ranks[kNbInputs] = {inputs[kInputX].nbDims, inputs[kInputIndex].nbDims};
  if (const int32_t rc = report(check_input_ranks(ranks, kNbInputs))) return rc;
  outputs[0].nbDims = kOutputRank;
  for (int32_t k = 0; k < kOutputRank; ++k)
    outputs[0].d[k] = inputs[kOutputDims[k].input].d[kOutputDims[k].dim];
  return 0;
}

bool CompactTokensPlugin::supportsFormatCombination(int32_t pos,
                                                    const nvinfer1::DynamicPluginTensorDesc* in_out,
                                                    int32_t nb_inputs, int32_t nb_outputs) noexcept {
  if (in_out == nullptr || nb_inputs != kNbInputs || nb_outputs != kNbOutputs || pos < 0 ||
      pos >= kNbInputs + kNbOutputs)
    return false;
  TensorFormatInfo info[kNbInputs + kNbOutputs];
  for (int32_t k = 0; k <= pos; ++k)  // TensorRT fixes positions < pos; later ones are not set yet
    info[k] = {elem_type(in_out[k].desc.type), is_linear(in_out[k].desc.format)};
  return supports_format(pos, info, nb_inputs, nb_outputs);
}

int32_t CompactTokensPlugin::getNbOutputs() const noexcept { return kNbOutputs; }

int32_t CompactTokensPlugin::onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nb_inputs,
                                           const nvinfer1::PluginTensorDesc* out,
                                           int32_t nb_outputs) noexcept {
  if (in == nullptr || out == nullptr || nb_inputs != kNbInputs || nb_outputs != kNbOutputs)
    return report(fail(Status::kInvalidArgument, "%s: onShapeChange with %d inputs, %d outputs",
                       kPluginName, nb_inputs, nb_outputs));
  int64_t want[kOutputRank];
  if (const int32_t rc = report(output_shape(in[kInputX].dims.nbDims, in[kInputX].dims.d,
                                             in[kInputIndex].dims.nbDims, in[kInputIndex].dims.d,
                                             want)))
    return rc;
  if (out[0].dims.nbDims != kOutputRank || out[0].dims.d[0] != want[0] || out[0].dims.d[1] != want[1])
    return report(fail(Status::kInvalidArgument,
                       "%s: output dims do not match [index.d[0], x.d[1]] = [%lld, %lld]",
                       kPluginName, static_cast<long long>(want[0]), static_cast<long long>(want[1])));
  return 0;
}

int32_t CompactTokensPlugin::enqueue(const nvinfer1::PluginTensorDesc* input_desc,
                                     const nvinfer1::PluginTensorDesc* /*output_desc*/,
                                     const void* const* inputs, void* const* outputs,
                                     void* /*workspace*/, cudaStream_t stream) noexcept {
  if (input_desc == nullptr || inputs == nullptr || outputs == nullptr)
    return report(fail(Status::kInvalidArgument, "%s: enqueue with null arguments", kPluginName));
  CompactCall call;
  call.type = elem_type(input_desc[kInputX].type);
  call.x = inputs[kInputX];
  call.x_rows = input_desc[kInputX].dims.d[0];
  call.row_elems = input_desc[kInputX].dims.d[1];
  call.index = static_cast<const int32_t*>(inputs[kInputIndex]);
  call.out_rows = input_desc[kInputIndex].dims.d[0];
  call.out = outputs[0];
  return report(compact_tokens_device(call, reinterpret_cast<adsc_stream_t>(stream)));
}

nvinfer1::IPluginV3* CompactTokensPlugin::attachToContext(
    nvinfer1::IPluginResourceContext* /*context*/) noexcept {
  return clone();  // no per-context resources
}

const nvinfer1::PluginFieldCollection* CompactTokensPlugin::getFieldsToSerialize() noexcept {
  return &fields_;
}

// ---- CompactTokensCreator -----------------------------------------------------------------------

nvinfer1::IPluginV3* CompactTokensCreator::createPlugin(const char* name,
                                                        const nvinfer1::PluginFieldCollection* fc,
                                                        nvinfer1::TensorRTPhase /*phase*/) noexcept {
  if (fc != nullptr && fc->nbFields != 0) {
    if (fc->nbFields < 0 || fc->fields == nullptr) {
      report(parse_fields(nullptr, fc->nbFields < 0 ? fc->nbFields : 1));
      return nullptr;
    }
    std::vector<const char*> names;
    try {
      names.reserve(static_cast<size_t>(fc->nbFields));
      for (int32_t k = 0; k < fc->nbFields; ++k) names.push_back(fc->fields[k].name);
    } catch (...) {
      log_error("%s: out of host memory in createPlugin", kPluginName);
      return nullptr;
    }
    if (report(parse_fields(names.data(), fc->nbFields)) != 0) {
      log_error("%s: cannot create plugin '%s'", kPluginName, name != nullptr ? name : "");
      return nullptr;
    }
  }
  auto* plugin = new (std::nothrow) CompactTokensPlugin();
  if (plugin == nullptr) log_error("%s: out of host memory in createPlugin", kPluginName);
  return plugin;
}

const nvinfer1::PluginFieldCollection* CompactTokensCreator::getFieldNames() noexcept {
  return &field_names_;
}
const char* CompactTokensCreator::getPluginName() const noexcept { return kPluginName; }
const char* CompactTokensCreator::getPluginVersion() const noexcept { return kPluginVersion; }
const char* CompactTokensCreator::getPluginNamespace() const noexcept { return kPluginNamespace; }

}  // namespace trt
}  // namespace adsc

// ---- entry points ---------------------------------------------------------------------------------

extern "C" ADSC_TRT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static adsc::trt::CompactTokensCreator compact_tokens_creator;
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&compact_tokens_creator};
  nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
  return creators;
}

extern "C" ADSC_TRT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  adsc::trt::set_plugin_logger_finder(finder);
}
