// Forward row kernel: softmax statistics of each token's float32 logits, in one read.
//
// One thread block per token (a block walks several tokens when there are more than a grid holds).
// Each thread walks the row with a stride of the block size, applies the head (writing z back when
// the logits are kept), and keeps an online logsumexp (m, s = sum e^(z-m), t = sum e^(z-m) (z-m),
// q = sum e^(2(z-m))) and the plain sum of z; when m moves to m' > m, s <- s e^(m-m'),
// t <- (t + (m-m') s) e^(m-m') and q <- q e^(2(m-m')). The threads' states are merged the same way,
// by warp shuffles and then across warps. The one thread that meets the target writes its logit
// (thread 0 writes NaN when the target is outside [0, vocab)).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "head.cuh"
#include "row_kernels.h"

namespace dpo_fast::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = 2147483647;  // gridDim.x's limit; more rows are walked in a loop

struct SoftmaxState {
  float max;
  float sum;       // sum exp(z - max)
  float weighted;  // sum exp(z - max) (z - max)
  float squares;   // sum exp(2 (z - max))
};

__device__ __forceinline__ SoftmaxState empty_state() { return {-INFINITY, 0.0f, 0.0f, 0.0f}; }

// The state's sums re-expressed relative to a max >= its own (an empty state stays empty).
__device__ __forceinline__ SoftmaxState rebase(const SoftmaxState& state, float max) {
  if (state.sum == 0.0f) return {max, 0.0f, 0.0f, 0.0f};
  const float shift = state.max - max;
  const float scale = expf(shift);
  return {max, state.sum * scale, (state.weighted + shift * state.sum) * scale, state.squares * scale * scale};
}

__device__ __forceinline__ SoftmaxState merge(const SoftmaxState& a, const SoftmaxState& b) {
  const float max = fmaxf(a.max, b.max);
  const SoftmaxState ra = rebase(a, max), rb = rebase(b, max);
  return {max, ra.sum + rb.sum, ra.weighted + rb.weighted, ra.squares + rb.squares};
}

__device__ __forceinline__ void add_logit(SoftmaxState& state, float z) {
  if (z > state.max) state = rebase(state, z);
  if (z == -INFINITY) return;  // p = 0: it adds nothing (and -inf - -inf would be NaN)
  const float shifted = z - state.max;
  const float e = expf(shifted);
  state.sum += e;
  state.weighted += e * shifted;
  state.squares += e * e;
}

__device__ __forceinline__ SoftmaxState warp_merge(SoftmaxState state) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const SoftmaxState other{__shfl_xor_sync(0xffffffffu, state.max, offset),
                             __shfl_xor_sync(0xffffffffu, state.sum, offset),
                             __shfl_xor_sync(0xffffffffu, state.weighted, offset),
                             __shfl_xor_sync(0xffffffffu, state.squares, offset)};
    state = merge(state, other);
  }
  return state;
}

__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

__global__ void __launch_bounds__(kThreads) row_stats_kernel(RowStatsArgs args) {
  __shared__ SoftmaxState warp_states[kWarps];
  __shared__ float warp_logit_sums[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t row = blockIdx.x; row < args.rows; row += gridDim.x) {
    float* logits = args.logits + row * args.stride;
    const int64_t target = args.targets[row];
    if (threadIdx.x == 0 && (target < 0 || target >= args.vocab)) args.target_logit[row] = NAN;
    SoftmaxState state = empty_state();
    float logit_sum = 0.0f;
    for (int64_t v = threadIdx.x; v < args.vocab; v += kThreads) {
      const float z = apply_head(logits[v], args.bias, v, args.head);
      if (args.keep) logits[v] = z;
      if (v == target) args.target_logit[row] = z;
      add_logit(state, z);
      logit_sum += z;
    }

    state = warp_merge(state);
    logit_sum = warp_sum(logit_sum);
    if (lane == 0) {
      warp_states[warp] = state;
      warp_logit_sums[warp] = logit_sum;
    }
    __syncthreads();
    if (warp == 0) {
      state = warp_merge(lane < kWarps ? warp_states[lane] : empty_state());
      logit_sum = warp_sum(lane < kWarps ? warp_logit_sums[lane] : 0.0f);
      if (lane == 0) {
        args.max_logit[row] = state.max;
        args.log_sum_exp[row] = logf(state.sum);
        if (args.mean_shifted != nullptr) {
          args.mean_shifted[row] = state.weighted / state.sum;
          args.mean_logit[row] = logit_sum / static_cast<float>(args.vocab);
          args.log_sum_sq_probs[row] = logf(state.squares) - 2.0f * logf(state.sum);
        }
      }
    }
    __syncthreads();  // the block's next row reuses warp_states
  }
}

}  // namespace

const char* launch_row_stats(const RowStatsArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return nullptr;
  const auto blocks = static_cast<unsigned int>(std::min(args.rows, kMaxBlocks));
  row_stats_kernel<<<blocks, kThreads, 0, stream>>>(args);
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace dpo_fast::cuda
