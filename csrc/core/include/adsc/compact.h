// adsc/compact.h: compaction (gather of token rows by a stage index) and its adjoint.
//
// A token tensor is seen as rows: row r starts at base + r * row_stride (bytes) and holds
// row_bytes contiguous bytes. compaction: dst[i] = src[index[i]], a zero row where index[i] == -1.
// Any other index outside [0, src_rows) is an error: the CPU path reports it before writing
// anything; the CUDA path, which cannot report synchronously, writes a zero row instead (it never
// reads out of bounds) and sets *error_flag to 1 when error_flag is not null.
#pragma once

#include <cstdint>

#include "adsc/common.h"
#include "adsc/status.h"

namespace adsc {

struct CompactTokensParams {
  const void* src = nullptr;     // [src_rows, row_bytes] with row stride src_row_stride
  int64_t src_rows = 0;
  int64_t src_row_stride = 0;    // bytes
  void* dst = nullptr;           // [dst_rows, row_bytes] with row stride dst_row_stride
  int64_t dst_rows = 0;
  int64_t dst_row_stride = 0;    // bytes
  int64_t row_bytes = 0;
  const void* index = nullptr;   // [dst_rows] int32 or int64
  bool index_is_int64 = false;
};

Status compact_tokens_cpu(const CompactTokensParams& params) noexcept;
Status compact_tokens_cuda(const CompactTokensParams& params, int32_t* error_flag,
                        adsc_stream_t stream) noexcept;

enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// dst[index[i]] += src[i] for every index[i] != -1 (duplicates accumulate): the backward of
// compaction when dst starts as zeros. Strides in elements; rows hold row_elems elements.
struct ScatterAddRowsParams {
  const void* src = nullptr;     // [src_rows, row_elems]
  int64_t src_rows = 0;
  int64_t src_row_stride = 0;    // elements
  void* dst = nullptr;           // [dst_rows, row_elems]
  int64_t dst_rows = 0;
  int64_t dst_row_stride = 0;    // elements
  int64_t row_elems = 0;
  DType dtype = DType::kFloat32;
  const void* index = nullptr;   // [src_rows] int32 or int64
  bool index_is_int64 = false;
};

Status scatter_add_rows_cpu(const ScatterAddRowsParams& params) noexcept;
Status scatter_add_rows_cuda(const ScatterAddRowsParams& params, int32_t* error_flag,
                             adsc_stream_t stream) noexcept;

}  // namespace adsc
