// Internal CUDA helpers: vector types and block shapes for row copies, launch status.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "adsc/status.h"

namespace adsc {
namespace detail {

template <int Bytes> struct Vec;
template <> struct Vec<16> { using type = uint4; };
template <> struct Vec<8> { using type = uint2; };
template <> struct Vec<4> { using type = uint32_t; };
template <> struct Vec<2> { using type = uint16_t; };
template <> struct Vec<1> { using type = uint8_t; };

// The widest copy width (16, 8, 4, 2 or 1 bytes) that divides every address and size in `bits`
// (the OR of the base pointers, strides and row size).
inline int vector_bytes(uintptr_t bits) {
  for (int bytes = 16; bytes > 1; bytes /= 2)
    if ((bits & static_cast<uintptr_t>(bytes - 1)) == 0) return bytes;
  return 1;
}

// Block shape for row copies: x threads walk a row's vectors, y rows share a block of 256.
inline dim3 row_block(int64_t vecs_per_row) {
  int bx = 1;
  while (bx < vecs_per_row && bx < 256) bx *= 2;
  return dim3(bx, 256 / bx);
}

inline unsigned row_grid(int64_t rows, const dim3& block) {
  const int64_t blocks = (rows + block.y - 1) / block.y;
  return static_cast<unsigned>(blocks < 8192 ? (blocks > 0 ? blocks : 1) : 8192);  // grid-stride beyond
}

// The status of the launch just made (kCudaError with the runtime's message if it failed).
inline Status launch_status(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return fail(Status::kCudaError, "%s: launch failed: %s", what, cudaGetErrorString(err));
  return Status::kOk;
}

}  // namespace detail
}  // namespace adsc
