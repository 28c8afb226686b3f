// What the CPU and CUDA host sides share: the chunk statistics' tuple, the checks of every input
// (a clear error naming the argument, never a read outside a tensor), and the build-tag macros.
// Host code with torch's CPU headers only (the CUDA host side includes it too, built against a CPU
// torch in CI).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <tuple>

// Set by the build (dpo_fast/_build.py) from the sources and the torch version, so that a stale
// build is recognised and rebuilt; a module exposes it as its build_tag.
#ifndef DPO_FAST_BUILD_TAG
#define DPO_FAST_BUILD_TAG untagged
#endif
#define DPO_FAST_STRINGIFY_(x) #x
#define DPO_FAST_STRINGIFY(x) DPO_FAST_STRINGIFY_(x)

namespace dpo_fast {

// The fields of ChunkStats (dpo_fast/backends/contract.py), in its order: max_logit, log_sum_exp,
// target_logit (C,); mean_shifted, mean_logit, log_sum_sq_probs (C,) when with_metrics; the
// post-head logits (C, V) when kept for the gradient pass.
using ChunkStats = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>,
                              std::optional<at::Tensor>, std::optional<at::Tensor>>;

// The arguments both entry points take: hidden (N, H) and weight (V, H) of one of `dtypes` on one
// device of `device_type`; bias (V,) floating, any stride, or none; rows and targets (C,) int64.
// Targets may hold any value (one outside [0, V) gives NaN); rows are read by index_select.
inline void check_chunk(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& rows, const at::Tensor& targets, c10::DeviceType device_type,
                        const char* backend, std::initializer_list<at::ScalarType> dtypes) {
  const c10::Device device = hidden.device();
  TORCH_CHECK(device.type() == device_type, "the ", backend, " backend takes ", c10::DeviceTypeName(device_type),
              " tensors; got hidden on ", device);
  const auto check_device = [&](const at::Tensor& tensor, const char* name) {
    TORCH_CHECK(tensor.device() == device, name, " must be on hidden's device ", device, ", got ", tensor.device());
  };
  check_device(weight, "weight");
  check_device(rows, "rows");
  check_device(targets, "targets");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden (N, H) and weight (V, H) must share H; got ", hidden.sizes(), " and ", weight.sizes());
  bool known_dtype = false;
  for (const at::ScalarType dtype : dtypes) known_dtype = known_dtype || hidden.scalar_type() == dtype;
  TORCH_CHECK(known_dtype, "the ", backend, " backend does not take ", hidden.scalar_type(), " inputs");
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "weight must have hidden's dtype ", hidden.scalar_type(),
              ", got ", weight.scalar_type());
  if (bias) {
    check_device(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && at::isFloatingType(bias->scalar_type()),
                "bias must be a floating tensor of shape (V,) = (", weight.size(0), ",); got ", bias->sizes(), " ",
                bias->scalar_type());
  }
  TORCH_CHECK(rows.scalar_type() == at::kLong && targets.scalar_type() == at::kLong && rows.dim() == 1 &&
                  targets.sizes() == rows.sizes(),
              "rows and targets must be int64 tensors of one shape (C,); got ", rows.sizes(), " ", rows.scalar_type(),
              " and ", targets.sizes(), " ", targets.scalar_type());
}

// `values` in `dtype`, contiguous (none: an undefined tensor). A bias of any stride (an expanded
// or strided one) is read by the kernels through this copy.
inline at::Tensor contiguous_as(const std::optional<at::Tensor>& values, at::ScalarType dtype) {
  return values ? values->to(dtype).contiguous() : at::Tensor();
}

// A (C,) per-row input (max_logit, log_sum_exp, grad_logp, ...) checked for device, dtype and
// length, and returned in `dtype`, contiguous (none: an undefined tensor).
inline at::Tensor per_row(const std::optional<at::Tensor>& values, const char* name, const at::Tensor& hidden,
                          int64_t num_rows, at::ScalarType dtype) {
  if (!values) return at::Tensor();
  TORCH_CHECK(values->device() == hidden.device(), name, " must be on hidden's device ", hidden.device(), ", got ",
              values->device());
  TORCH_CHECK(at::isFloatingType(values->scalar_type()), name, " must be a floating tensor, got ",
              values->scalar_type());
  TORCH_CHECK(values->dim() == 1 && values->size(0) == num_rows, name, " must have shape (C,) = (", num_rows,
              ",), one value per row; got ", values->sizes());
  return contiguous_as(values, dtype);
}

// The logits kept by logits_stats for logits_grad: (C, V) in `dtype` on hidden's device, rows of
// unit stride (contiguous when `contiguous`).
inline void check_kept_logits(const std::optional<at::Tensor>& logits, const at::Tensor& hidden, int64_t num_rows,
                              int64_t vocab, at::ScalarType dtype, bool contiguous) {
  if (!logits) return;
  const bool as_kept = logits->device() == hidden.device() && logits->scalar_type() == dtype && logits->dim() == 2 &&
                       logits->size(0) == num_rows && logits->size(1) == vocab &&
                       (contiguous ? logits->is_contiguous() : logits->stride(1) == 1);
  TORCH_CHECK(as_kept,
              "logits must be the (C, V) = (", num_rows, ", ", vocab, ") ", dtype,
              contiguous ? " contiguous" : "", " logits kept by logits_stats on ", hidden.device(), "; got ",
              logits->sizes(), " ", logits->scalar_type(), " with strides ", logits->strides(), " on ",
              logits->device());
}

}  // namespace dpo_fast
