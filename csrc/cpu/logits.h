// The CPU kernel's two entry points (one chunk of C valid tokens) and the block products they share.
//
// Shapes and dtypes: hidden (N, H) and weight (V, H) in float32, bfloat16, float16 or float64;
// bias (V,) or none; rows, targets (C,) int64 (the chunk's token indices into hidden, and their
// targets). Statistics are in the accumulate dtype: float32, or float64 for float64 inputs.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/OpMathType.h>

#include <optional>

#include "../common.h"

namespace dpo_fast::cpu {

// The statistics of a chunk (see ChunkStats in ../common.h and row_math.h for the math): the three
// with_metrics fields when asked for; the post-head logits (C, V) when keep_logits, for logits_grad
// to consume.
ChunkStats logits_stats(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& rows, const at::Tensor& targets, std::optional<double> softcap,
                        double temperature, bool with_metrics, bool keep_logits);

// dL/dx (C, V) in hidden's dtype, for the pre-head logits x = h W^T + b. grad_logp (C,); mean_shifted
// and grad_entropy (C,) both or neither; logits: what logits_stats kept, or none to recompute them.
// For float32 and float64 inputs the gradient is written over the kept logits, which are consumed.
// A row whose target is outside [0, V) gets NaN.
at::Tensor logits_grad(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& rows, const at::Tensor& targets, const at::Tensor& max_logit,
                       const at::Tensor& log_sum_exp, const std::optional<at::Tensor>& mean_shifted,
                       const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                       std::optional<double> softcap, double temperature, const std::optional<at::Tensor>& logits);

// The logits are formed by ATen's matmul in the accumulate dtype: in one product when the weight
// has that dtype, otherwise one block of vocabulary columns at a time, each from a float32 copy of
// that block of W (16-bit weights), and each block finished by the row passes before the next.
struct VocabBlocks {
  at::Tensor hidden_rows;  // (C, H) the chunk's rows of hidden, in the accumulate dtype
  at::Tensor weight;       // (V, H)
  int64_t size;            // columns per block: V, or fewer for 16-bit weights

  // Gathers the chunk's rows; the block size bounds a 16-bit weight's float32 copy, and when the
  // blocks go to a (C, size) scratch rather than into a (C, V) matrix, that scratch (vocab_blocks.cpp).
  VocabBlocks(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& rows, bool into_scratch);

  // out (C, n) = hidden_rows @ weight[start : start + n]^T; out may be a column slice of a wider matrix.
  void logits(int64_t start, at::Tensor out) const;
};

// check_chunk (../common.h) for this kernel: CPU tensors of float32, bfloat16, float16 or float64.
void check_cpu_chunk(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                     const at::Tensor& rows, const at::Tensor& targets);

}  // namespace dpo_fast::cpu
