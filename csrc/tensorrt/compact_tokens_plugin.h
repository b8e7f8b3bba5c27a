// compact_tokens_plugin.h: the AdscCompactTokens TensorRT plugin (IPluginV3) and its creator.
//
// A thin adapter: every decision is a call into compact_tokens_rules.h, and enqueue is the core's
// device compaction (adsc::compact_tokens_cuda, as for the torch op) on TensorRT's stream. The plugin
// is stateless (no fields, no workspace, nothing allocated); TensorRT finds the creator through
// the library's exported getCreators() (end of compact_tokens_plugin.cpp), so the library does not link
// libnvinfer. Built only with -DADSC_WITH_TENSORRT=ON -DTensorRT_INCLUDE_DIR=<dir> and CUDA.
#pragma once

#include <NvInferRuntime.h>

#include <string>

namespace adsc {
namespace trt {

class CompactTokensPlugin final : public nvinfer1::IPluginV3,
                                  public nvinfer1::IPluginV3OneCore,
                                  public nvinfer1::IPluginV3OneBuild,
                                  public nvinfer1::IPluginV3OneRuntime {
 public:
  CompactTokensPlugin() = default;
  ~CompactTokensPlugin() override = default;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(
      nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  const char* getPluginName() const noexcept override;
  const char* getPluginVersion() const noexcept override;
  const char* getPluginNamespace() const noexcept override;

  // IPluginV3OneBuild
  int32_t configurePlugin(const nvinfer1::DynamicPluginTensorDesc* in, int32_t nb_inputs,
                          const nvinfer1::DynamicPluginTensorDesc* out,
                          int32_t nb_outputs) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* output_types, int32_t nb_outputs,
                             const nvinfer1::DataType* input_types,
                             int32_t nb_inputs) const noexcept override;
  int32_t getOutputShapes(const nvinfer1::DimsExprs* inputs, int32_t nb_inputs,
                          const nvinfer1::DimsExprs* shape_inputs, int32_t nb_shape_inputs,
                          nvinfer1::DimsExprs* outputs, int32_t nb_outputs,
                          nvinfer1::IExprBuilder& expr_builder) noexcept override;
  bool supportsFormatCombination(int32_t pos, const nvinfer1::DynamicPluginTensorDesc* in_out,
                                 int32_t nb_inputs, int32_t nb_outputs) noexcept override;
  int32_t getNbOutputs() const noexcept override;

  // IPluginV3OneRuntime
  int32_t onShapeChange(const nvinfer1::PluginTensorDesc* in, int32_t nb_inputs,
                        const nvinfer1::PluginTensorDesc* out, int32_t nb_outputs) noexcept override;
  int32_t enqueue(const nvinfer1::PluginTensorDesc* input_desc,
                  const nvinfer1::PluginTensorDesc* output_desc, const void* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  const nvinfer1::PluginFieldCollection* getFieldsToSerialize() noexcept override;

 private:
  nvinfer1::PluginFieldCollection fields_{0, nullptr};  // no fields
};

class CompactTokensCreator final : public nvinfer1::IPluginCreatorV3One {
 public:
  CompactTokensCreator() = default;
  ~CompactTokensCreator() override = default;

  // Build phase (from the ONNX parser or INetworkDefinition::addPluginV3) and runtime phase
  // (engine deserialisation, with getFieldsToSerialize's fields): both take no fields. Returns
  // nullptr, with the reason logged, for any field given.
  nvinfer1::IPluginV3* createPlugin(const char* name, const nvinfer1::PluginFieldCollection* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;
  const nvinfer1::PluginFieldCollection* getFieldNames() noexcept override;
  const char* getPluginName() const noexcept override;
  const char* getPluginVersion() const noexcept override;
  const char* getPluginNamespace() const noexcept override;

 private:
  nvinfer1::PluginFieldCollection field_names_{0, nullptr};
};

// The logger TensorRT gave through setLoggerFinder (nullptr before that, or if it has none).
nvinfer1::ILogger* plugin_logger() noexcept;
void set_plugin_logger_finder(nvinfer1::ILoggerFinder* finder) noexcept;

}  // namespace trt
}  // namespace adsc

// The library's entry points (what IPluginRegistry::loadLibrary and trtexec --staticPlugins look
// up): the creator list and the logger finder. TensorRT's TENSORRTAPI only exports when building
// TensorRT itself, so the library marks them (everything else is hidden, see exports.map).
#define ADSC_TRT_EXPORT __attribute__((visibility("default")))
extern "C" ADSC_TRT_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
extern "C" ADSC_TRT_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
