// The TensorRT-free rules of the AdscCompactTokens plugin (see compact_tokens_rules.h).
#include "compact_tokens_rules.h"

#include <limits>

namespace adsc {
namespace trt {

const char* elem_type_name(ElemType type) noexcept {
  switch (type) {
    case ElemType::kFloat32: return "float32";
    case ElemType::kFloat16: return "float16";
    case ElemType::kInt8: return "int8";
    case ElemType::kInt32: return "int32";
    case ElemType::kBool: return "bool";
    case ElemType::kUInt8: return "uint8";
    case ElemType::kFP8: return "fp8";
    case ElemType::kBFloat16: return "bfloat16";
    case ElemType::kInt64: return "int64";
  }
  return "an unknown type";
}

int32_t data_elem_size(ElemType type) noexcept {
  switch (type) {
    case ElemType::kFloat32: return 4;
    case ElemType::kFloat16:
    case ElemType::kBFloat16: return 2;
    default: return 0;
  }
}

Status output_type(const ElemType* input_types, int32_t nb_inputs, ElemType* output_types,
                   int32_t nb_outputs) noexcept {
  if (nb_inputs != kNbInputs || nb_outputs != kNbOutputs)
    return fail(Status::kInvalidArgument,
                "%s: expected %d inputs (x, index) and %d output, got %d inputs and %d outputs",
                kPluginName, kNbInputs, kNbOutputs, nb_inputs, nb_outputs);
  if (input_types == nullptr || output_types == nullptr)
    return fail(Status::kInvalidArgument, "%s: null type array", kPluginName);
  if (data_elem_size(input_types[kInputX]) == 0)
    return fail(Status::kInvalidArgument, "%s: x must be float32, float16 or bfloat16, got %s",
                kPluginName, elem_type_name(input_types[kInputX]));
  if (input_types[kInputIndex] != ElemType::kInt32)
    return fail(Status::kInvalidArgument, "%s: index must be int32, got %s", kPluginName,
                elem_type_name(input_types[kInputIndex]));
  output_types[0] = input_types[kInputX];
  return Status::kOk;
}

bool supports_format(int32_t pos, const TensorFormatInfo* in_out, int32_t nb_inputs,
                     int32_t nb_outputs) noexcept {
  if (in_out == nullptr || nb_inputs != kNbInputs || nb_outputs != kNbOutputs || pos < 0 ||
      pos >= kNbInputs + kNbOutputs)
    return false;
  const TensorFormatInfo& t = in_out[pos];
  if (!t.linear) return false;
  switch (pos) {
    case kInputX: return data_elem_size(t.type) != 0;
    case kInputIndex: return t.type == ElemType::kInt32;
    default: return t.type == in_out[kInputX].type;  // the output: x's type
  }
}

Status check_input_ranks(const int32_t* input_ranks, int32_t nb_inputs) noexcept {
  if (nb_inputs != kNbInputs || input_ranks == nullptr)
    return fail(Status::kInvalidArgument, "%s: expected %d inputs (x, index), got %d", kPluginName,
                kNbInputs, nb_inputs);
  if (input_ranks[kInputX] != 2)
    return fail(Status::kInvalidArgument, "%s: x must be [T, D] (rank 2), got rank %d",
                kPluginName, input_ranks[kInputX]);
  if (input_ranks[kInputIndex] != 1)
    return fail(Status::kInvalidArgument, "%s: index must be [T_s] (rank 1), got rank %d",
                kPluginName, input_ranks[kInputIndex]);
  return Status::kOk;
}

Status output_shape(int32_t x_rank, const int64_t* x_dims, int32_t index_rank,
                    const int64_t* index_dims, int64_t out_dims[kOutputRank]) noexcept {
  const int32_t ranks[kNbInputs] = {x_rank, index_rank};
  ADSC_RETURN_IF_ERROR(check_input_ranks(ranks, kNbInputs));
  if (x_dims == nullptr || index_dims == nullptr || out_dims == nullptr)
    return fail(Status::kInvalidArgument, "%s: null dims", kPluginName);
  const int64_t* dims[kNbInputs] = {x_dims, index_dims};
  for (int32_t k = 0; k < kOutputRank; ++k) out_dims[k] = dims[kOutputDims[k].input][kOutputDims[k].dim];
  return Status::kOk;
}

Status parse_fields(const char* const* field_names, int32_t nb_fields) noexcept {
  if (nb_fields < 0) return fail(Status::kInvalidArgument, "%s: %d fields", kPluginName, nb_fields);
  if (nb_fields == 0) return Status::kOk;
  if (field_names == nullptr)
    return fail(Status::kInvalidArgument, "%s: %d fields but no field array", kPluginName, nb_fields);
  const char* name = field_names[0] != nullptr ? field_names[0] : "(null)";
  return fail(Status::kInvalidArgument,
              "%s takes no fields, got %d (the first is '%s'): was the node or engine made for "
              "another version of the plugin?",
              kPluginName, nb_fields, name);
}

Status compact_params(const CompactCall& call, CompactTokensParams* params) noexcept {
  if (params == nullptr) return fail(Status::kInvalidArgument, "%s: null params", kPluginName);
  const int32_t elem = data_elem_size(call.type);
  if (elem == 0)
    return fail(Status::kInvalidArgument, "%s: x must be float32, float16 or bfloat16, got %s",
                kPluginName, elem_type_name(call.type));
  if (call.x_rows < 0 || call.row_elems < 0 || call.out_rows < 0)
    return fail(Status::kInvalidArgument, "%s: negative size (x [%lld, %lld], index [%lld])",
                kPluginName, static_cast<long long>(call.x_rows),
                static_cast<long long>(call.row_elems), static_cast<long long>(call.out_rows));
  if (call.row_elems > std::numeric_limits<int64_t>::max() / elem)
    return fail(Status::kInvalidArgument, "%s: row of %lld elements overflows", kPluginName,
                static_cast<long long>(call.row_elems));
  const int64_t row_bytes = call.row_elems * elem;
  CompactTokensParams p;
  p.src = call.x;
  p.src_rows = call.x_rows;
  p.src_row_stride = row_bytes;
  p.dst = call.out;
  p.dst_rows = call.out_rows;
  p.dst_row_stride = row_bytes;
  p.row_bytes = row_bytes;
  p.index = call.index;
  p.index_is_int64 = false;
  *params = p;
  return Status::kOk;
}

Status compact_tokens_device(const CompactCall& call, adsc_stream_t stream) noexcept {
  CompactTokensParams p;
  ADSC_RETURN_IF_ERROR(compact_params(call, &p));
  return compact_tokens_cuda(p, /*error_flag=*/nullptr, stream);
}

Status compact_tokens_host(const CompactCall& call) noexcept {
  CompactTokensParams p;
  ADSC_RETURN_IF_ERROR(compact_params(call, &p));
  return compact_tokens_cpu(p);
}

}  // namespace trt
}  // namespace adsc
