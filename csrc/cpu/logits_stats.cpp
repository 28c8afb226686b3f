// Forward: per-token softmax statistics of a chunk.
//
// The logits (all of them, or one vocabulary block of a 16-bit head at a time) are formed by one
// matmul into the kept (C, V) logits or into a scratch of the same width, then finished in place,
// row by row in parallel: the head (bias, softcap, temperature), the max, the exp-sums folded into
// each row's running statistics (the online logsumexp of row_math.h, across blocks; with the
// metrics, the sums of the entropy, of the logits and of the squared probabilities too) and the
// target logit. No other (C, V) temporary exists.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>

#include <limits>
#include <vector>

#include "logits.h"
#include "row_math.h"

namespace dpo_fast::cpu {

ChunkStats logits_stats(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& rows, const at::Tensor& targets, std::optional<double> softcap,
                        double temperature, bool with_metrics, bool keep_logits) {
  check_cpu_chunk(hidden, weight, bias, rows, targets);
  const VocabBlocks blocks(hidden, weight, rows, !keep_logits);
  const at::TensorOptions options = blocks.hidden_rows.options();
  const int64_t num_rows = rows.size(0), vocab = weight.size(0);
  const at::Tensor bias_acc = contiguous_as(bias, options.dtype().toScalarType());
  const at::Tensor target_index = targets.contiguous();
  at::Tensor max_logit = at::empty({num_rows}, options), log_sum_exp = at::empty({num_rows}, options);
  // NaN unless the target is in [0, V) and its logit is written below
  at::Tensor target_logit = at::full({num_rows}, std::numeric_limits<double>::quiet_NaN(), options);
  const int64_t metric_rows = with_metrics ? num_rows : 0;
  at::Tensor mean_shifted = at::empty({metric_rows}, options), mean_logit = at::empty({metric_rows}, options);
  at::Tensor log_sum_sq_probs = at::empty({metric_rows}, options);
  at::Tensor logits = at::empty({num_rows, keep_logits ? vocab : std::min(blocks.size, vocab)}, options);

  AT_DISPATCH_FLOATING_TYPES(options.dtype().toScalarType(), "dpo_fast logits_stats", [&] {
    using T = scalar_t;
    const Head<T> head{softcap.has_value(), static_cast<T>(softcap.value_or(1.0)), static_cast<T>(1.0 / temperature)};
    const T* bias_data = bias_acc.defined() ? bias_acc.const_data_ptr<T>() : nullptr;
    const int64_t* target = target_index.const_data_ptr<int64_t>();
    T* target_out = target_logit.mutable_data_ptr<T>();
    std::vector<RowStats<T>> stats(num_rows);

    for (int64_t start = 0; start < vocab; start += blocks.size) {
      const int64_t width = std::min(blocks.size, vocab - start);
      at::Tensor block = logits.narrow(1, keep_logits ? start : 0, width);
      blocks.logits(start, block);
      T* block_data = block.mutable_data_ptr<T>();
      const int64_t stride = block.stride(0);
      at::parallel_for(0, num_rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          T* z = block_data + row * stride;
          const T block_max = apply_head(z, bias_data == nullptr ? nullptr : bias_data + start, width, head);
          stats[row].update(z, width, block_max, with_metrics);
          if (target[row] >= start && target[row] < start + width) target_out[row] = z[target[row] - start];
        }
      });
    }

    T* max_out = max_logit.mutable_data_ptr<T>();
    T* lse_out = log_sum_exp.mutable_data_ptr<T>();
    for (int64_t row = 0; row < num_rows; ++row) {
      max_out[row] = stats[row].max;
      lse_out[row] = std::log(stats[row].sum);
    }
    if (with_metrics) {
      T* mean_shifted_out = mean_shifted.mutable_data_ptr<T>();
      T* mean_logit_out = mean_logit.mutable_data_ptr<T>();
      T* sum_sq_out = log_sum_sq_probs.mutable_data_ptr<T>();
      for (int64_t row = 0; row < num_rows; ++row) {
        const RowStats<T>& row_stats = stats[row];
        mean_shifted_out[row] = row_stats.weighted / row_stats.sum;
        mean_logit_out[row] = row_stats.sum_logits / static_cast<T>(vocab);
        sum_sq_out[row] = std::log(row_stats.sum_squares) - T(2) * std::log(row_stats.sum);
      }
    }
  });

  const auto metric = [&](const at::Tensor& values) { return with_metrics ? std::optional(values) : std::nullopt; };
  return {max_logit, log_sum_exp, target_logit, metric(mean_shifted), metric(mean_logit), metric(log_sum_sq_probs),
          keep_logits ? std::optional(logits) : std::nullopt};
}

}  // namespace dpo_fast::cpu
