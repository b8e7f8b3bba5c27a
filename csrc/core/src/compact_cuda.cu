// CUDA compaction: rows are copied with the widest vector (16 bytes when the row size, the strides
// and the base pointers allow it) by a 2-D block: x walks a row's vectors, y walks rows. Padding
// rows (index -1) are zero-filled; an index out of range yields a zero row and raises error_flag.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "adsc/compact.h"
#include "compact_impl.h"
#include "cuda_util.cuh"

namespace adsc {
namespace {

using detail::Vec;

constexpr int kBlockThreads = 256;
constexpr int kMaxBlocks = 8192;  // grid-stride beyond this

template <int Bytes, typename Index>
__global__ void compact_tokens_kernel(const char* __restrict__ src, int64_t src_rows,
                                   int64_t src_stride,         // bytes
                                   char* __restrict__ dst, int64_t dst_rows,
                                   int64_t dst_stride,         // bytes
                                   int64_t vecs_per_row,
                                   const Index* __restrict__ index,  // [dst_rows]
                                   int32_t* error_flag) {
  using V = typename Vec<Bytes>::type;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < dst_rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t j = static_cast<int64_t>(index[row]);
    V* out = reinterpret_cast<V*>(dst + row * dst_stride);
    if (j >= 0 && j < src_rows) {
      const V* in = reinterpret_cast<const V*>(src + j * src_stride);
      for (int64_t c = threadIdx.x; c < vecs_per_row; c += blockDim.x) out[c] = in[c];
    } else {
      if (j != -1 && threadIdx.x == 0 && error_flag != nullptr) atomicExch(error_flag, 1);
      V zero;
      memset(&zero, 0, sizeof(V));
      for (int64_t c = threadIdx.x; c < vecs_per_row; c += blockDim.x) out[c] = zero;
    }
  }
}

template <int Bytes, typename Index>
void launch_gather(const CompactTokensParams& p, int32_t* error_flag, cudaStream_t stream) {
  const int64_t vecs = p.row_bytes / Bytes;
  const dim3 block = detail::row_block(vecs);
  compact_tokens_kernel<Bytes, Index><<<detail::row_grid(p.dst_rows, block), block, 0, stream>>>(
      static_cast<const char*>(p.src), p.src_rows, p.src_row_stride, static_cast<char*>(p.dst),
      p.dst_rows, p.dst_row_stride, vecs, static_cast<const Index*>(p.index), error_flag);
}

template <typename Index>
void dispatch_gather(const CompactTokensParams& p, int32_t* error_flag, cudaStream_t stream) {
  const uintptr_t bits = reinterpret_cast<uintptr_t>(p.src) | reinterpret_cast<uintptr_t>(p.dst) |
                         static_cast<uintptr_t>(p.row_bytes) |
                         static_cast<uintptr_t>(p.src_row_stride) |
                         static_cast<uintptr_t>(p.dst_row_stride);
  switch (detail::vector_bytes(bits)) {
    case 16: launch_gather<16, Index>(p, error_flag, stream); break;
    case 8: launch_gather<8, Index>(p, error_flag, stream); break;
    case 4: launch_gather<4, Index>(p, error_flag, stream); break;
    case 2: launch_gather<2, Index>(p, error_flag, stream); break;
    default: launch_gather<1, Index>(p, error_flag, stream); break;
  }
}

template <typename T, typename Index>
__global__ void scatter_add_rows_kernel(const T* __restrict__ src, int64_t src_rows,
                                        int64_t src_stride,  // elements
                                        T* __restrict__ dst, int64_t dst_rows,
                                        int64_t dst_stride,  // elements
                                        int64_t row_elems,
                                        const Index* __restrict__ index,  // [src_rows]
                                        int32_t* error_flag) {
  const int64_t n = src_rows * row_elems;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = e / row_elems, k = e % row_elems;
    const int64_t j = static_cast<int64_t>(index[i]);
    if (j >= 0 && j < dst_rows) {
      atomicAdd(dst + j * dst_stride + k, src[i * src_stride + k]);
    } else if (j != -1 && k == 0 && error_flag != nullptr) {
      atomicExch(error_flag, 1);
    }
  }
}

template <typename T, typename Index>
void launch_scatter_add(const ScatterAddRowsParams& p, int32_t* error_flag, cudaStream_t stream) {
  const int64_t n = p.src_rows * p.row_elems;
  const int64_t blocks = (n + kBlockThreads - 1) / kBlockThreads;
  scatter_add_rows_kernel<T, Index>
      <<<static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks), kBlockThreads, 0,
         stream>>>(static_cast<const T*>(p.src), p.src_rows, p.src_row_stride,
                   static_cast<T*>(p.dst), p.dst_rows, p.dst_row_stride, p.row_elems,
                   static_cast<const Index*>(p.index), error_flag);
}

template <typename Index>
void dispatch_scatter_add(const ScatterAddRowsParams& p, int32_t* error_flag, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: launch_scatter_add<float, Index>(p, error_flag, stream); break;
    case DType::kFloat64: launch_scatter_add<double, Index>(p, error_flag, stream); break;
    case DType::kFloat16: launch_scatter_add<__half, Index>(p, error_flag, stream); break;
    case DType::kBFloat16: launch_scatter_add<__nv_bfloat16, Index>(p, error_flag, stream); break;
  }
}

}  // namespace

Status compact_tokens_cuda(const CompactTokensParams& p, int32_t* error_flag,
                        adsc_stream_t stream) noexcept {
  ADSC_RETURN_IF_ERROR(detail::check_compact_params(p, error_flag));
  if (p.dst_rows == 0 || p.row_bytes == 0) return Status::kOk;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (p.index_is_int64) dispatch_gather<int64_t>(p, error_flag, s);
  else dispatch_gather<int32_t>(p, error_flag, s);
  return detail::launch_status("compact_tokens_cuda");
}

Status scatter_add_rows_cuda(const ScatterAddRowsParams& p, int32_t* error_flag,
                             adsc_stream_t stream) noexcept {
  ADSC_RETURN_IF_ERROR(detail::check_scatter_params(p, error_flag));
  if (p.src_rows == 0 || p.row_elems == 0) return Status::kOk;
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (p.index_is_int64) dispatch_scatter_add<int64_t>(p, error_flag, s);
  else dispatch_scatter_add<int32_t>(p, error_flag, s);
  return detail::launch_status("scatter_add_rows_cuda");
}

}  // namespace adsc
