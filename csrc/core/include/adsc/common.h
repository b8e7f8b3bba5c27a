// adsc/common.h: small helpers shared by host and device code.
#pragma once

#if defined(__CUDACC__)
#define ADSC_HD __host__ __device__ __forceinline__
#else
#define ADSC_HD inline
#endif

// cudaStream_t without requiring the CUDA headers in CPU-only consumers (same as adsc.h's).
#ifndef ADSC_STREAM_T_DEFINED
#define ADSC_STREAM_T_DEFINED
typedef struct CUstream_st* adsc_stream_t;
#endif
