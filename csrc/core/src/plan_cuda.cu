// CUDA implementation of the plan: one launch of one block that runs the phases of plan_impl.h,
// with block-wide scans carried across chunks of the token axis. A plan is made once per batch
// and its work is a few passes over T int32s, so one block is fast (microseconds for thousands of
// tokens) and needs no grid-wide synchronisation or temporary allocation.
#include <cuda_runtime.h>

#include "adsc/adsc.h"
#include "adsc/plan.h"
#include "cuda_util.cuh"
#include "plan_impl.h"

namespace adsc {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;  // 32: warp 0 scans the warp totals in one pass

struct Sum {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a + b; }
};
struct Max {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a > b ? a : b; }
};

// Inclusive scan of x over the block; *total receives the block's aggregate. Every thread calls it.
template <typename Op>
__device__ int64_t block_scan(int64_t x, Op op, int64_t* smem, int64_t* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t y = __shfl_up_sync(0xffffffffu, x, o);
    if (lane >= o) x = op(y, x);
  }
  if (lane == 31) smem[warp] = x;
  __syncthreads();
  if (warp == 0) {
    int64_t v = smem[lane];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int64_t y = __shfl_up_sync(0xffffffffu, v, o);
      if (lane >= o) v = op(y, v);
    }
    smem[lane] = v;
  }
  __syncthreads();
  if (warp > 0) x = op(smem[warp - 1], x);
  *total = smem[kWarps - 1];
  __syncthreads();  // smem is reused by the next scan
  return x;
}

__device__ void report(int32_t* summary, int32_t code, const int64_t* details, int n) {
  if (atomicCAS(summary, 0, code) == 0)
    for (int i = 0; i < n; ++i) summary[1 + i] = detail::saturate_int32(details[i]);
}

constexpr long long kNoError = 0x7fffffffffffffffLL;

// The smallest key over the block (kNoError if none). Errors are reported by the thread holding
// the smallest key (the lowest sequence, span or run), so the GPU names the same error as the
// CPU, which stops at the first one. Every thread calls it.
__device__ long long block_min(long long key, long long* slot) {
  if (threadIdx.x == 0) *slot = kNoError;
  __syncthreads();
  if (key != kNoError) atomicMin(slot, key);
  __syncthreads();
  const long long m = *slot;
  __syncthreads();  // the slot is reused by the next call
  return m;
}

__device__ bool failed(const int32_t* summary) {
  __syncthreads();
  return *reinterpret_cast<const volatile int32_t*>(summary) != kPlanOk;
}

__global__ void __launch_bounds__(kThreads) plan_kernel(const PlanParams p) {
  __shared__ int64_t smem[kWarps];
  __shared__ int32_t max_lens[kMaxSteps + 1];
  __shared__ long long first_error;
  const int64_t T = p.num_tokens, B = p.batch_size;
  const int S = p.num_steps;
  const int tid = threadIdx.x;
  const detail::PlanWorkspace ws = detail::plan_workspace(p);
  int32_t* cu0 = p.cu_seqlens_out;

  for (int i = tid; i < plan_summary_size(S); i += kThreads) p.summary[i] = 0;
  __syncthreads();

  // Phase 1: stage-0 ranks, offsets and positions.
  if (p.layout == Layout::kPacked) {
    // The same checks, in the same terms, as plan_cpu; the lowest bad sequence is reported.
    long long bad = kNoError;
    for (int64_t b = tid; b < B && bad == kNoError; b += kThreads) {
      const int32_t lo = p.cu_seqlens[b], hi = p.cu_seqlens[b + 1];
      if ((b == 0 && lo != 0) || lo > hi || (b + 1 == B && hi != T)) bad = b;
    }
    if (block_min(bad, &first_error) == bad && bad != kNoError) {
      const int64_t d[3] = {bad, p.cu_seqlens[bad], p.cu_seqlens[bad + 1]};
      report(p.summary, kPlanBadCuSeqlens, d, 3);
    }
    if (B == 0 && tid == 0 && (p.cu_seqlens[0] != 0 || T != 0)) {
      const int64_t d[3] = {0, p.cu_seqlens[0], p.cu_seqlens[0]};
      report(p.summary, kPlanBadCuSeqlens, d, 3);
    }
    for (int64_t b = tid; b <= B; b += kThreads) cu0[b] = p.cu_seqlens[b];
    if (failed(p.summary)) return;
    for (int64_t t = tid; t < T; t += kThreads) {
      ws.rank[t] = static_cast<int32_t>(t);
      ws.pos[t] = static_cast<int32_t>(t - p.cu_seqlens[detail::row_of(p, t)]);
    }
  } else {
    int64_t carry = 0;
    for (int64_t base = 0; base < T; base += kThreads) {
      const int64_t t = base + tid;
      const int64_t real = t < T && detail::token_is_real(p, t);
      int64_t total;
      const int64_t incl = block_scan(real, Sum(), smem, &total);
      if (t < T) ws.rank[t] = static_cast<int32_t>(carry + incl - real);
      carry += total;
    }
    __syncthreads();
    for (int64_t b = tid; b <= B; b += kThreads) {
      const int64_t first = b * p.padded_len;  // == T for b == B (and for every b when S == 0)
      cu0[b] = static_cast<int32_t>(first < T ? ws.rank[first] : carry);
    }
    __syncthreads();
    for (int64_t t = tid; t < T; t += kThreads)
      ws.pos[t] = detail::token_is_real(p, t) ? ws.rank[t] - cu0[t / p.padded_len] : -1;
  }
  __syncthreads();

  // Phase 2: depth of every token.
  for (int64_t t = tid; t < T; t += kThreads) {
    if (detail::token_is_real(p, t)) ws.real[ws.rank[t]] = static_cast<int32_t>(t);
    else ws.depth[t] = -1;
  }
  __syncthreads();
  if (p.input_ids != nullptr) {
    // Runs of image tokens over the real tokens in position order (i indexes that order; row b
    // holds i in [cu0[b], cu0[b+1])): a max-scan carries the start of the current run.
    const int64_t hw = static_cast<int64_t>(p.grid_h) * p.grid_w, n = cu0[B];
    int64_t carry = -1;  // latest run start seen in earlier chunks
    for (int64_t base = 0; base < n; base += kThreads) {
      const int64_t i = base + tid;
      const bool image = i < n && detail::is_image_token(p, ws.real[i]);
      int64_t b = 0;
      bool starts = false;
      if (image) {
        b = detail::row_of_offsets(cu0, B, i);
        starts = i == cu0[b] || !detail::is_image_token(p, ws.real[i - 1]);
      }
      int64_t total;
      const int64_t incl = block_scan(starts ? i : -1, Max(), smem, &total);
      const int64_t run_start = incl > carry ? incl : carry;
      carry = total > carry ? total : carry;
      long long bad = kNoError;  // this token ends a run that is not whole images
      if (i < n) {
        const int64_t t = ws.real[i];
        if (!image) {
          ws.depth[t] = S;
        } else {
          ws.depth[t] = survived_steps(static_cast<int>((i - run_start) % hw), p.grid_h, p.grid_w,
                                       p.factors, S);
          const bool ends = i + 1 == cu0[b + 1] || !detail::is_image_token(p, ws.real[i + 1]);
          if (ends && (i - run_start + 1) % hw != 0) bad = i;
        }
      }
      // The first bad run of the first chunk that has one (report() keeps the first writer).
      if (block_min(bad, &first_error) == bad && bad != kNoError) {
        const int64_t d[3] = {b, run_start - cu0[b], i - run_start + 1};
        report(p.summary, kPlanPartialImage, d, 3);
      }
    }
  } else {
    long long bad = kNoError;  // the lowest bad span of this thread
    for (int64_t i = tid; i < p.num_spans && bad == kNoError; i += kThreads) {
      int64_t d[7];
      if (detail::check_span(p, i, cu0, d) != kPlanOk) bad = i;
    }
    if (block_min(bad, &first_error) == bad && bad != kNoError) {
      int64_t d[7];
      const int32_t code = detail::check_span(p, bad, cu0, d);
      report(p.summary, code, d, 7);
    }
    if (failed(p.summary)) return;
    for (int64_t t = tid; t < T; t += kThreads)
      if (ws.pos[t] >= 0) ws.depth[t] = detail::span_depth(p, detail::row_of(p, t), ws.pos[t]);
  }
  if (failed(p.summary)) return;

  // Phase 3: ranks of stages 1..S; phase 4: their offsets, then every stage's size.
  for (int s = 1; s <= S; ++s) {
    int32_t* rank = ws.rank + s * T;
    int64_t carry = 0;
    for (int64_t base = 0; base < T; base += kThreads) {
      const int64_t t = base + tid;
      const int64_t alive = t < T && ws.depth[t] >= s;
      int64_t total;
      const int64_t incl = block_scan(alive, Sum(), smem, &total);
      if (t < T) rank[t] = static_cast<int32_t>(carry + incl - alive);
      carry += total;
    }
    __syncthreads();
    int32_t* cu_s = p.cu_seqlens_out + s * (B + 1);
    for (int64_t b = tid; b <= B; b += kThreads) {
      const int64_t first = b < B ? detail::row_begin(p, b) : T;
      cu_s[b] = static_cast<int32_t>(first < T ? rank[first] : carry);
    }
  }
  __syncthreads();
  for (int s = 0; s <= S; ++s) {
    const int32_t* cu_s = p.cu_seqlens_out + s * (B + 1);
    int64_t longest = 0;
    for (int64_t base = 0; base < B; base += kThreads) {
      const int64_t b = base + tid;
      int64_t total;
      block_scan(b < B ? cu_s[b + 1] - cu_s[b] : 0, Max(), smem, &total);
      longest = total > longest ? total : longest;
    }
    if (tid == 0) {
      max_lens[s] = static_cast<int32_t>(longest);
      p.summary[summary_tokens(s)] = cu_s[B];
      p.summary[summary_max_len(s)] = static_cast<int32_t>(longest);
    }
  }
  __syncthreads();

  // Phase 5: the writes.
  for (int64_t t = tid; t < T; t += kThreads)
    if (ws.depth[t] >= 0) detail::write_token(p, ws, t, max_lens);
  if (p.layout == Layout::kPadded)
    for (int s = 0; s <= S; ++s) {
      const int64_t width = detail::stage_width(p, s, max_lens[s]);
      for (int64_t j = tid; j < B * width; j += kThreads) detail::write_padding_slot(p, s, j, width);
    }
}

}  // namespace

Status plan_cuda(const PlanParams& params, adsc_stream_t stream) noexcept {
  ADSC_RETURN_IF_ERROR(check_plan_params(params));
  plan_kernel<<<1, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(params);
  return detail::launch_status("plan_cuda");
}

}  // namespace adsc

extern "C" int adsc_cuda_compiled(void) { return 1; }
