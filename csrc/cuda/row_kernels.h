// The CUDA row kernels' launchers: raw pointers and a stream, no torch (they compile with plain nvcc).
//
// Both kernels read a chunk's float32 logits, (rows, vocab) with a row stride, formed beforehand by
// cuBLAS (the host side, bindings.cpp). The math is that of csrc/cpu/row_math.h:
//
//   z = softcap * tanh((x + b) / softcap) / temperature                         (the head)
//   max_logit = m = max z,  log_sum_exp = log sum exp(z - m),  target_logit = z[target]
//   mean_shifted = E_p[z] - m,  mean_logit = mean z,  log_sum_sq_probs = log sum p^2   (the metrics)
//   dL/dx = (a (onehot(y) - p) - e p ((z - m) - mean_shifted)) (1 - (z temperature / softcap)^2) / temperature
//
// with p = exp((z - m) - log_sum_exp), a = dL/dlogp and e = dL/dentropy per token. A -inf logit adds
// nothing (p = 0, gradient 0); +inf or NaN make the row NaN; a target outside [0, vocab) gives a
// NaN target_logit and a NaN gradient row. Offsets are 64-bit.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dpo_fast::cuda {

struct Head {
  bool has_softcap;
  float softcap;
  float inv_temperature;
};

// One thread block per token: the head applied to x (written back when keep), then max,
// exp-sums and metric sums by an online logsumexp, and the target's logit.
struct RowStatsArgs {
  float* logits;            // (rows, vocab), x on entry; z on exit when keep
  int64_t rows, vocab, stride;
  const float* bias;        // (vocab,) or null
  const int64_t* targets;   // (rows,)
  Head head;
  bool keep;
  float* max_logit;         // (rows,) each
  float* log_sum_exp;
  float* target_logit;
  float* mean_shifted;      // (rows,) each, or all three null: no metrics
  float* mean_logit;
  float* log_sum_sq_probs;
};

enum class GradType { kFloat32, kBFloat16, kFloat16 };

// dL/dx, written once in the compute dtype (over the logits when grad == logits, float32).
struct LogitsGradArgs {
  const float* logits;      // (rows, vocab): z when kept, x when apply_head
  int64_t rows, vocab, logits_stride;
  bool apply_head;
  const float* bias;        // (vocab,) or null; used with apply_head
  const int64_t* targets;   // (rows,)
  Head head;
  const float* max_logit;   // (rows,) each
  const float* log_sum_exp;
  const float* grad_logp;
  const float* mean_shifted;  // null when grad_entropy is null
  const float* grad_entropy;  // null: no entropy term
  void* grad;               // (rows, vocab) of grad_type
  int64_t grad_stride;
  GradType grad_type;
};

// Each returns null on success, or the CUDA error's description.
const char* launch_row_stats(const RowStatsArgs& args, cudaStream_t stream);
const char* launch_logits_grad(const LogitsGradArgs& args, cudaStream_t stream);

}  // namespace dpo_fast::cuda
