// compact_tokens_rules.h: everything the AdscCompactTokens TensorRT plugin decides, without TensorRT.
//
// The plugin (compact_tokens_plugin.h) is a thin adapter: TensorRT's interfaces call these rules
// (names, type rule, format rule, shape rule, fields) and the launcher below, which fills the
// core's CompactTokensParams and calls adsc::compact_tokens_cuda, the launcher the torch op
// adsc::compact_tokens calls. This file and its .cpp build and are tested everywhere (ctest
// tensorrt_rules.*); the adapter only where TensorRT's headers are given.
//
// The node (adsc_ext/export/_plugin.py holds the same contract for the ONNX exporter):
//   input 0  x      [T, D]    float32 | float16 | bfloat16, linear
//   input 1  index  [T_s]     int32, linear; -1 = a zero row
//   output 0 out    [T_s, D]  the type of x, linear; out[i] = x[index[i]]
// No fields: the ONNX node carries only the parser's lookup attributes plugin_version and
// plugin_namespace, which the parser does not pass on as fields.
#pragma once

#include <cstdint>

#include "adsc/common.h"
#include "adsc/compact.h"
#include "adsc/status.h"

namespace adsc {
namespace trt {

inline constexpr const char* kPluginName = "AdscCompactTokens";
inline constexpr const char* kPluginVersion = "1";
inline constexpr const char* kPluginNamespace = "adsc";
inline constexpr int32_t kNbInputs = 2;
inline constexpr int32_t kNbOutputs = 1;
inline constexpr int32_t kInputX = 0;      // position of x in the plugin's inputs
inline constexpr int32_t kInputIndex = 1;  // position of index
inline constexpr int32_t kOutput = 2;      // position of the output in supportsFormatCombination

// Element types, numbered as TensorRT's nvinfer1::DataType (NvInferRuntimeBase.h) so that the
// adapter converts with a cast; the adapter static_asserts the values it relies on.
enum class ElemType : int32_t {
  kFloat32 = 0,
  kFloat16 = 1,
  kInt8 = 2,
  kInt32 = 3,
  kBool = 4,
  kUInt8 = 5,
  kFP8 = 6,
  kBFloat16 = 7,
  kInt64 = 8,
};

const char* elem_type_name(ElemType type) noexcept;

// Bytes per element of a type x may have (float32 4, float16 / bfloat16 2); 0 for any other type.
int32_t data_elem_size(ElemType type) noexcept;

// The type rule: out = type of x, after checking the counts, x's type (a float type) and the
// index's (int32). Errors name the input and the type given.
Status output_type(const ElemType* input_types, int32_t nb_inputs, ElemType* output_types,
                   int32_t nb_outputs) noexcept;

// The format rule for supportsFormatCombination: position `pos` of in_out (inputs, then the
// output) is accepted if linear and of the right type; the output must have x's type. Positions
// before `pos` have been fixed by TensorRT already, later ones are not looked at.
struct TensorFormatInfo {
  ElemType type;
  bool linear;
};
bool supports_format(int32_t pos, const TensorFormatInfo* in_out, int32_t nb_inputs,
                     int32_t nb_outputs) noexcept;

// The shape rule: out dim k is dim kOutputDims[k].dim of input kOutputDims[k].input, i.e.
// [T_s, D] = [index.d[0], x.d[1]]. check_input_ranks says whether the inputs have the ranks it
// needs (x 2, index 1).
struct DimSource {
  int32_t input;
  int32_t dim;
};
inline constexpr int32_t kOutputRank = 2;
inline constexpr DimSource kOutputDims[kOutputRank] = {{kInputIndex, 0}, {kInputX, 1}};
Status check_input_ranks(const int32_t* input_ranks, int32_t nb_inputs) noexcept;

// The shape rule on concrete dims (-1 = not known yet, passed through): also checks the ranks.
Status output_shape(int32_t x_rank, const int64_t* x_dims, int32_t index_rank,
                    const int64_t* index_dims, int64_t out_dims[kOutputRank]) noexcept;

// Fields: the plugin has none, so the creator's field names and getFieldsToSerialize are empty;
// parse_fields rejects any field it is given (a node from another exporter, a stale engine) with
// its name instead of silently ignoring it. Field names may be null only when nb_fields is 0.
Status parse_fields(const char* const* field_names, int32_t nb_fields) noexcept;

// One compaction: out[i] = x[index[i]] for i < out_rows, rows of row_elems elements of `type`,
// packed (row stride = row bytes), a zero row where index[i] == -1.
struct CompactCall {
  ElemType type = ElemType::kFloat32;
  const void* x = nullptr;          // [x_rows, row_elems]
  int64_t x_rows = 0;
  int64_t row_elems = 0;
  const int32_t* index = nullptr;   // [out_rows]
  int64_t out_rows = 0;
  void* out = nullptr;              // [out_rows, row_elems]
};

// The core's parameters for `call` (checks the type and sizes).
Status compact_params(const CompactCall& call, CompactTokensParams* params) noexcept;

// enqueue's body: the core's device compaction on `stream`, asynchronous, no allocation. An
// index outside [-1, x_rows) gives a zero row (the kernel never reads out of bounds); there is
// no error flag, since TensorRT gives a plugin no way to report after the launch.
// kNotCompiled in a core built without CUDA.
Status compact_tokens_device(const CompactCall& call, adsc_stream_t stream) noexcept;

// The same on host memory with the core's CPU compaction (the tests' oracle); it reports an
// index out of range instead.
Status compact_tokens_host(const CompactCall& call) noexcept;

}  // namespace trt
}  // namespace adsc
