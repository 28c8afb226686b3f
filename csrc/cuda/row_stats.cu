// Forward row kernel: softmax statistics of each token's float32 logits, in one read.
//
// One thread block per token. Each thread walks the row with a stride of the block size, applies
// the head (writing z back when the logits are kept), and keeps an online logsumexp
// (m, s = sum e^(z-m), t = sum e^(z-m) (z-m)); when m moves to m' > m, s <- s e^(m-m') and
// t <- (t + (m-m') s) e^(m-m'). The threads' states are merged the same way, by warp shuffles and
// then across warps. The one thread that meets the target writes its logit.
#include <cuda_runtime.h>

#include <cmath>

#include "head.cuh"
#include "row_kernels.h"

namespace dpo_fast::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

struct SoftmaxState {
  float max;
  float sum;       // sum exp(z - max)
  float weighted;  // sum exp(z - max) (z - max)
};

// The state's sums re-expressed relative to a max >= its own (an empty state stays empty).
__device__ __forceinline__ SoftmaxState rebase(const SoftmaxState& state, float max) {
  if (state.sum == 0.0f) return {max, 0.0f, 0.0f};
  const float shift = state.max - max;
  const float scale = expf(shift);
  return {max, state.sum * scale, (state.weighted + shift * state.sum) * scale};
}

__device__ __forceinline__ SoftmaxState merge(const SoftmaxState& a, const SoftmaxState& b) {
  const float max = fmaxf(a.max, b.max);
  const SoftmaxState ra = rebase(a, max), rb = rebase(b, max);
  return {max, ra.sum + rb.sum, ra.weighted + rb.weighted};
}

__device__ __forceinline__ void add_logit(SoftmaxState& state, float z) {
  if (z > state.max) state = rebase(state, z);
  const float shifted = z - state.max;
  const float e = expf(shifted);
  state.sum += e;
  state.weighted += e * shifted;
}

__device__ __forceinline__ SoftmaxState warp_merge(SoftmaxState state) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const SoftmaxState other{__shfl_xor_sync(0xffffffffu, state.max, offset),
                             __shfl_xor_sync(0xffffffffu, state.sum, offset),
                             __shfl_xor_sync(0xffffffffu, state.weighted, offset)};
    state = merge(state, other);
  }
  return state;
}

__global__ void __launch_bounds__(kThreads) row_stats_kernel(RowStatsArgs args) {
  const int64_t row = blockIdx.x;
  float* logits = args.logits + row * args.stride;
  const int64_t target = args.targets[row];
  SoftmaxState state{-INFINITY, 0.0f, 0.0f};
  for (int64_t v = threadIdx.x; v < args.vocab; v += kThreads) {
    const float z = apply_head(logits[v], args.bias, v, args.head);
    if (args.keep) logits[v] = z;
    if (v == target) args.target_logit[row] = z;
    add_logit(state, z);
  }

  __shared__ SoftmaxState warp_states[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  state = warp_merge(state);
  if (lane == 0) warp_states[warp] = state;
  __syncthreads();
  if (warp != 0) return;
  state = lane < kWarps ? warp_states[lane] : SoftmaxState{-INFINITY, 0.0f, 0.0f};
  state = warp_merge(state);
  if (lane == 0) {
    args.max_logit[row] = state.max;
    args.log_sum_exp[row] = logf(state.sum);
    if (args.mean_shifted != nullptr) args.mean_shifted[row] = state.weighted / state.sum;
  }
}

}  // namespace

const char* launch_row_stats(const RowStatsArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return nullptr;
  row_stats_kernel<<<static_cast<unsigned int>(args.rows), kThreads, 0, stream>>>(args);
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace dpo_fast::cuda
