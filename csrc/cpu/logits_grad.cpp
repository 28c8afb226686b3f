// Backward: dL/dx of a chunk, (C, V) in hidden's dtype, formed in place.
//
// From kept logits: one row pass each, writing dL/dx over the logits for float32/float64 inputs
// (into a new 16-bit matrix otherwise). Without them, the logits are recomputed by one matmul
// straight into the output (float32/float64), or one vocabulary block at a time into a (C, block)
// scratch (16-bit), put through the head and turned into dL/dx row by row. A row whose target is
// outside [0, V) is NaN.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <limits>

#include "logits.h"
#include "row_math.h"

namespace dpo_fast::cpu {

at::Tensor logits_grad(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& rows, const at::Tensor& targets, const at::Tensor& max_logit,
                       const at::Tensor& log_sum_exp, const std::optional<at::Tensor>& mean_shifted,
                       const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                       std::optional<double> softcap, double temperature, const std::optional<at::Tensor>& logits) {
  check_cpu_chunk(hidden, weight, bias, rows, targets);
  TORCH_CHECK(mean_shifted.has_value() == grad_entropy.has_value(),
              "mean_shifted and grad_entropy must be given together (the entropy's gradient needs both)");
  const at::ScalarType dtype = hidden.scalar_type(), acc = at::toOpMathType(dtype);
  const int64_t num_rows = rows.size(0), vocab = weight.size(0);
  check_kept_logits(logits, hidden, num_rows, vocab, acc, /*contiguous=*/false);
  const bool recompute = !logits.has_value(), in_place = dtype == acc;
  std::optional<VocabBlocks> blocks;
  if (recompute) blocks.emplace(hidden, weight, rows, !in_place);
  const int64_t block_size = recompute ? blocks->size : std::max(vocab, int64_t{1});
  at::Tensor grad = (logits && in_place) ? *logits : at::empty({num_rows, vocab}, hidden.options());
  at::Tensor scratch = (recompute && !in_place) ? at::empty({num_rows, std::min(block_size, vocab)},
                                                            hidden.options().dtype(acc))
                                                : at::Tensor();
  const at::Tensor bias_acc = contiguous_as(bias, acc), target_index = targets.contiguous();
  const at::Tensor row_max = per_row(max_logit, "max_logit", hidden, num_rows, acc);
  const at::Tensor row_lse = per_row(log_sum_exp, "log_sum_exp", hidden, num_rows, acc);
  const at::Tensor row_mean = per_row(mean_shifted, "mean_shifted", hidden, num_rows, acc);
  const at::Tensor row_grad_logp = per_row(grad_logp, "grad_logp", hidden, num_rows, acc);
  const at::Tensor row_grad_entropy = per_row(grad_entropy, "grad_entropy", hidden, num_rows, acc);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "dpo_fast logits_grad", [&] {
    using Out = scalar_t;
    using T = at::opmath_type<Out>;
    const Head<T> head{softcap.has_value(), static_cast<T>(softcap.value_or(1.0)), static_cast<T>(1.0 / temperature)};
    const T* bias_data = bias_acc.defined() ? bias_acc.const_data_ptr<T>() : nullptr;
    const int64_t* target = target_index.const_data_ptr<int64_t>();
    const T *max_data = row_max.const_data_ptr<T>(), *lse_data = row_lse.const_data_ptr<T>();
    const T* grad_logp_data = row_grad_logp.const_data_ptr<T>();
    const T* mean_data = row_mean.defined() ? row_mean.const_data_ptr<T>() : nullptr;
    const T* grad_entropy_data = row_grad_entropy.defined() ? row_grad_entropy.const_data_ptr<T>() : nullptr;

    for (int64_t start = 0; start < vocab; start += block_size) {
      const int64_t width = std::min(block_size, vocab - start);
      at::Tensor source;  // this block's logits, in the accumulate dtype
      if (!recompute) {
        source = logits->narrow(1, start, width);
      } else {
        source = in_place ? grad.narrow(1, start, width) : scratch.narrow(1, 0, width);
        blocks->logits(start, source);
      }
      T* source_data = source.mutable_data_ptr<T>();
      Out* grad_data = grad.mutable_data_ptr<Out>() + start;
      const int64_t source_stride = source.stride(0), grad_stride = grad.stride(0);
      at::parallel_for(0, num_rows, 1, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          if (target[row] < 0 || target[row] >= vocab) {
            std::fill_n(grad_data + row * grad_stride, width, static_cast<Out>(std::numeric_limits<T>::quiet_NaN()));
            continue;
          }
          T* z = source_data + row * source_stride;
          if (recompute) apply_head(z, bias_data == nullptr ? nullptr : bias_data + start, width, head);
          const RowGrad<T> stats{max_data[row], lse_data[row], mean_data == nullptr ? T(0) : mean_data[row],
                                 grad_logp_data[row], grad_entropy_data == nullptr ? T(0) : grad_entropy_data[row]};
          row_grad(z, grad_data + row * grad_stride, width, target[row] - start, stats, head);
        }
      });
    }
  });
  return grad;
}

}  // namespace dpo_fast::cpu
