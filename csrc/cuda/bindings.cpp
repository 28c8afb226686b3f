// The CUDA backend's host side and its pybind11 bindings: module dpo_fast._cuda (ahead of time) or
// dpo_fast_cuda (just in time).
//
// Per chunk of C tokens: every input checked (../common.h: device, dtype, shape, the length of each
// per-row tensor, the kept logits' layout), the tensors' device made current and its current stream
// taken here, then the (C, V) float32 logits from one cuBLAS product through torch (at::mm with a
// float32 output for 16-bit operands) and the row kernels of row_stats.cu and logits_grad.cu on that
// stream. Only c10's device-generic guard and stream interfaces are used, so this file needs no
// torch CUDA header (it compiles against a CPU build of torch); only pointers and the stream cross
// into the kernels.
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/python.h>

#include <optional>

#include "../common.h"
#include "row_kernels.h"

namespace dpo_fast::cuda {

namespace {

void check_cuda_chunk(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& rows, const at::Tensor& targets) {
  check_chunk(hidden, weight, bias, rows, targets, c10::DeviceType::CUDA, "cuda", {at::kFloat, at::kBFloat16, at::kHalf});
}

// The current stream of `device` (a CUDA device, made current by the caller's guard).
cudaStream_t current_stream(c10::Device device) {
  const c10::impl::DeviceGuardImplInterface* cuda = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(cuda->getStreamNativeHandle(cuda->getStream(device)));
}

// (C, V) float32 logits x = hidden[rows] @ weight^T, contiguous, by cuBLAS.
at::Tensor float_logits(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& rows) {
  const at::Tensor hidden_rows = hidden.index_select(0, rows);
  if (hidden.scalar_type() == at::kFloat) return at::mm(hidden_rows, weight.t());
  return at::mm(hidden_rows, weight.t(), at::kFloat);
}

Head make_head(std::optional<double> softcap, double temperature) {
  return {softcap.has_value(), static_cast<float>(softcap.value_or(1.0)), static_cast<float>(1.0 / temperature)};
}

const float* data_or_null(const at::Tensor& tensor) {
  return tensor.defined() ? tensor.const_data_ptr<float>() : nullptr;
}

void check_launch(const char* error, const char* kernel) {
  TORCH_CHECK(error == nullptr, "dpo_fast's CUDA ", kernel, " kernel failed to launch: ", error);
}

}  // namespace

ChunkStats logits_stats(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        const at::Tensor& rows, const at::Tensor& targets, std::optional<double> softcap,
                        double temperature, bool with_metrics, bool keep_logits) {
  check_cuda_chunk(hidden, weight, bias, rows, targets);
  const c10::DeviceGuard device_guard(hidden.device());
  at::Tensor logits = float_logits(hidden, weight, rows);
  const int64_t num_rows = rows.size(0);
  const at::Tensor bias_float = contiguous_as(bias, at::kFloat), target_index = targets.contiguous();
  at::Tensor max_logit = at::empty({num_rows}, logits.options()), log_sum_exp = at::empty_like(max_logit);
  at::Tensor target_logit = at::empty_like(max_logit);  // every row written by the kernel (NaN out of range)
  const int64_t metric_rows = with_metrics ? num_rows : 0;
  at::Tensor mean_shifted = at::empty({metric_rows}, logits.options());
  at::Tensor mean_logit = at::empty_like(mean_shifted), log_sum_sq_probs = at::empty_like(mean_shifted);
  const auto metric_data = [&](at::Tensor& values) { return with_metrics ? values.mutable_data_ptr<float>() : nullptr; };
  const RowStatsArgs args{logits.mutable_data_ptr<float>(), num_rows, weight.size(0), logits.stride(0),
                          data_or_null(bias_float), target_index.const_data_ptr<int64_t>(),
                          make_head(softcap, temperature), keep_logits, max_logit.mutable_data_ptr<float>(),
                          log_sum_exp.mutable_data_ptr<float>(), target_logit.mutable_data_ptr<float>(),
                          metric_data(mean_shifted), metric_data(mean_logit), metric_data(log_sum_sq_probs)};
  check_launch(launch_row_stats(args, current_stream(hidden.device())), "row_stats");
  const auto metric = [&](const at::Tensor& values) { return with_metrics ? std::optional(values) : std::nullopt; };
  return {max_logit, log_sum_exp, target_logit, metric(mean_shifted), metric(mean_logit), metric(log_sum_sq_probs),
          keep_logits ? std::optional(logits) : std::nullopt};
}

at::Tensor logits_grad(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& rows, const at::Tensor& targets, const at::Tensor& max_logit,
                       const at::Tensor& log_sum_exp, const std::optional<at::Tensor>& mean_shifted,
                       const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                       std::optional<double> softcap, double temperature, const std::optional<at::Tensor>& logits) {
  check_cuda_chunk(hidden, weight, bias, rows, targets);
  TORCH_CHECK(mean_shifted.has_value() == grad_entropy.has_value(),
              "mean_shifted and grad_entropy must be given together (the entropy's gradient needs both)");
  const int64_t num_rows = rows.size(0), vocab = weight.size(0);
  check_kept_logits(logits, hidden, num_rows, vocab, at::kFloat, /*contiguous=*/true);
  const at::Tensor row_max = per_row(max_logit, "max_logit", hidden, num_rows, at::kFloat);
  const at::Tensor row_lse = per_row(log_sum_exp, "log_sum_exp", hidden, num_rows, at::kFloat);
  const at::Tensor row_grad_logp = per_row(grad_logp, "grad_logp", hidden, num_rows, at::kFloat);
  const at::Tensor row_mean = per_row(mean_shifted, "mean_shifted", hidden, num_rows, at::kFloat);
  const at::Tensor row_grad_entropy = per_row(grad_entropy, "grad_entropy", hidden, num_rows, at::kFloat);

  const c10::DeviceGuard device_guard(hidden.device());
  const at::Tensor source = logits ? *logits : float_logits(hidden, weight, rows);
  const at::ScalarType dtype = hidden.scalar_type();
  at::Tensor grad = dtype == at::kFloat ? source : at::empty({num_rows, vocab}, hidden.options());
  const at::Tensor bias_float = contiguous_as(bias, at::kFloat), target_index = targets.contiguous();
  const GradType grad_type = dtype == at::kFloat      ? GradType::kFloat32
                             : dtype == at::kBFloat16 ? GradType::kBFloat16
                                                      : GradType::kFloat16;
  const LogitsGradArgs args{source.const_data_ptr<float>(), num_rows, vocab, source.stride(0), !logits.has_value(),
                            data_or_null(bias_float), target_index.const_data_ptr<int64_t>(),
                            make_head(softcap, temperature), data_or_null(row_max), data_or_null(row_lse),
                            data_or_null(row_grad_logp), data_or_null(row_mean), data_or_null(row_grad_entropy),
                            grad.mutable_data_ptr(), grad.stride(0), grad_type};
  check_launch(launch_logits_grad(args, current_stream(hidden.device())), "logits_grad");
  return grad;
}

}  // namespace dpo_fast::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  namespace py = pybind11;
  module.doc() = "dpo_fast's CUDA kernels: softmax statistics and dL/dx of a chunk of tokens";
  module.attr("build_tag") = DPO_FAST_STRINGIFY(DPO_FAST_BUILD_TAG);
  module.def("logits_stats", &dpo_fast::cuda::logits_stats,
             "The fields of ChunkStats in order (max_logit, log_sum_exp, target_logit, mean_shifted, mean_logit, "
             "log_sum_sq_probs, logits; None where not asked for) of the tokens rows",
             py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("rows"), py::arg("targets"),
             py::arg("softcap"), py::arg("temperature"), py::arg("with_metrics"), py::arg("keep_logits"),
             py::call_guard<py::gil_scoped_release>());
  module.def("logits_grad", &dpo_fast::cuda::logits_grad, "dL/dx (C, V) in hidden's dtype for the tokens rows",
             py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("rows"), py::arg("targets"),
             py::arg("max_logit"), py::arg("log_sum_exp"), py::arg("mean_shifted"), py::arg("grad_logp"),
             py::arg("grad_entropy"), py::arg("softcap"), py::arg("temperature"), py::arg("logits"),
             py::call_guard<py::gil_scoped_release>());
}
