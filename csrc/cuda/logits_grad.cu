// Backward row kernel: dL/dx of each token from its float32 logits, written once in the compute dtype.
//
// Elementwise over (rows, vocab): blockIdx.y walks the rows, the x dimension the vocabulary. The
// logits are the kept z, or x straight from cuBLAS with the head applied here (apply_head). For
// float32 inputs the host side passes grad == logits: each element is read, then overwritten.
// A -inf logit has p = 0 and gradient 0 (never 0 * -inf); a row whose target is outside [0, vocab)
// is NaN.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "head.cuh"
#include "row_kernels.h"

namespace dpo_fast::cuda {

namespace {

constexpr int kThreads = 256;
constexpr unsigned int kMaxBlocksPerRow = 64;
constexpr unsigned int kMaxRowBlocks = 65535;  // gridDim.y's limit; more rows are walked in a loop

__device__ __forceinline__ void store(float* out, float value) { *out = value; }
__device__ __forceinline__ void store(__nv_bfloat16* out, float value) { *out = __float2bfloat16_rn(value); }
__device__ __forceinline__ void store(__half* out, float value) { *out = __float2half_rn(value); }

template <typename Out>
__global__ void __launch_bounds__(kThreads) logits_grad_kernel(LogitsGradArgs args) {
  for (int64_t row = blockIdx.y; row < args.rows; row += gridDim.y) {
    const float* logits = args.logits + row * args.logits_stride;
    Out* grad = static_cast<Out*>(args.grad) + row * args.grad_stride;
    const float max_logit = args.max_logit[row], log_sum_exp = args.log_sum_exp[row];
    const float grad_logp = args.grad_logp[row];
    const float grad_entropy = args.grad_entropy == nullptr ? 0.0f : args.grad_entropy[row];
    const float mean_shifted = args.grad_entropy == nullptr ? 0.0f : args.mean_shifted[row];
    const int64_t target = args.targets[row];
    const bool target_in_vocab = target >= 0 && target < args.vocab;
    for (int64_t v = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; v < args.vocab;
         v += static_cast<int64_t>(gridDim.x) * kThreads) {
      const float z = args.apply_head ? apply_head(logits[v], args.bias, v, args.head) : logits[v];
      const float shifted = z - max_logit;
      const float p = expf(shifted - log_sum_exp);
      const float spread = p == 0.0f ? 0.0f : p * (grad_logp + grad_entropy * (shifted - mean_shifted));
      const float onehot = v == target ? grad_logp : 0.0f;
      store(grad + v, target_in_vocab ? (onehot - spread) * head_derivative(z, args.head) : NAN);
    }
  }
}

}  // namespace

const char* launch_logits_grad(const LogitsGradArgs& args, cudaStream_t stream) {
  if (args.rows == 0 || args.vocab == 0) return nullptr;
  const auto blocks_per_row = static_cast<unsigned int>(
      std::min<int64_t>((args.vocab + kThreads - 1) / kThreads, kMaxBlocksPerRow));
  const dim3 grid(blocks_per_row, static_cast<unsigned int>(std::min<int64_t>(args.rows, kMaxRowBlocks)));
  switch (args.grad_type) {
    case GradType::kFloat32:
      logits_grad_kernel<float><<<grid, kThreads, 0, stream>>>(args);
      break;
    case GradType::kBFloat16:
      logits_grad_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(args);
      break;
    case GradType::kFloat16:
      logits_grad_kernel<__half><<<grid, kThreads, 0, stream>>>(args);
      break;
  }
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace dpo_fast::cuda
