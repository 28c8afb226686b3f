// The CUDA backend's host side and its pybind11 bindings: module dpo_fast._cuda (ahead of time) or
// dpo_fast_cuda (just in time).
//
// Per chunk of C tokens: the (C, V) float32 logits from one cuBLAS product through torch
// (at::mm with a float32 output for 16-bit operands), then the row kernels of row_stats.cu and
// logits_grad.cu on the stream the caller hands in (torch.cuda.current_stream().cuda_stream, with
// the tensors' device current). Torch's CUDA headers are not needed here: only pointers and the
// stream cross into the kernels.
#include <torch/python.h>

#include <optional>
#include <tuple>

#include "row_kernels.h"

#ifndef DPO_FAST_BUILD_TAG
#define DPO_FAST_BUILD_TAG untagged
#endif
#define DPO_FAST_STRINGIFY_(x) #x
#define DPO_FAST_STRINGIFY(x) DPO_FAST_STRINGIFY_(x)

namespace dpo_fast::cuda {

namespace {

using ChunkStats = std::tuple<at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>>;

void check_chunk(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                 const at::Tensor& rows, const at::Tensor& targets) {
  TORCH_CHECK(hidden.is_cuda() && weight.device() == hidden.device() && rows.device() == hidden.device() &&
                  targets.device() == hidden.device() && (!bias || bias->device() == hidden.device()),
              "the cuda backend takes tensors on one CUDA device; got hidden on ", hidden.device(),
              " and weight on ", weight.device(), " (use backend='cpp' or 'torch' for CPU tensors)");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "hidden (N, H) and weight (V, H) must share H; got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == hidden.scalar_type(), "weight must have hidden's dtype");
  TORCH_CHECK(hidden.scalar_type() == at::kFloat || hidden.scalar_type() == at::kBFloat16 ||
                  hidden.scalar_type() == at::kHalf,
              "the cuda backend takes float32, bfloat16 or float16 inputs, got ", hidden.scalar_type());
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == weight.size(0)), "bias must have shape (V,)");
  TORCH_CHECK(rows.scalar_type() == at::kLong && targets.scalar_type() == at::kLong && rows.dim() == 1 &&
                  targets.sizes() == rows.sizes(),
              "rows and targets must be int64 tensors of one shape (C,)");
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

// A (C,) float32 statistic, contiguous (none: an undefined tensor).
at::Tensor per_row(const std::optional<at::Tensor>& values) {
  return values ? values->to(at::kFloat).contiguous() : at::Tensor();
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
                        double temperature, bool with_entropy, bool keep_logits, int64_t stream) {
  check_chunk(hidden, weight, bias, rows, targets);
  at::Tensor logits = float_logits(hidden, weight, rows);
  const int64_t num_rows = rows.size(0);
  const at::Tensor bias_float = per_row(bias), target_index = targets.contiguous();
  at::Tensor max_logit = at::empty({num_rows}, logits.options()), log_sum_exp = at::empty_like(max_logit);
  at::Tensor target_logit = at::empty_like(max_logit);
  at::Tensor mean_shifted = at::empty({with_entropy ? num_rows : 0}, logits.options());
  const RowStatsArgs args{logits.mutable_data_ptr<float>(), num_rows, weight.size(0), logits.stride(0),
                          data_or_null(bias_float), target_index.const_data_ptr<int64_t>(),
                          make_head(softcap, temperature), keep_logits, max_logit.mutable_data_ptr<float>(),
                          log_sum_exp.mutable_data_ptr<float>(), target_logit.mutable_data_ptr<float>(),
                          with_entropy ? mean_shifted.mutable_data_ptr<float>() : nullptr};
  check_launch(launch_row_stats(args, reinterpret_cast<cudaStream_t>(stream)), "row_stats");
  return {max_logit, log_sum_exp, target_logit, with_entropy ? std::optional(mean_shifted) : std::nullopt,
          keep_logits ? std::optional(logits) : std::nullopt};
}

at::Tensor logits_grad(const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& rows, const at::Tensor& targets, const at::Tensor& max_logit,
                       const at::Tensor& log_sum_exp, const std::optional<at::Tensor>& mean_shifted,
                       const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                       std::optional<double> softcap, double temperature, const std::optional<at::Tensor>& logits,
                       int64_t stream) {
  check_chunk(hidden, weight, bias, rows, targets);
  TORCH_CHECK(mean_shifted.has_value() == grad_entropy.has_value(),
              "mean_shifted and grad_entropy must be given together (the entropy's gradient needs both)");
  const int64_t num_rows = rows.size(0), vocab = weight.size(0);
  TORCH_CHECK(!logits || (logits->scalar_type() == at::kFloat && logits->is_contiguous() &&
                          logits->sizes() == at::IntArrayRef{num_rows, vocab}),
              "logits must be the contiguous (C, V) float32 logits kept by logits_stats");
  const at::Tensor source = logits ? *logits : float_logits(hidden, weight, rows);
  const at::ScalarType dtype = hidden.scalar_type();
  at::Tensor grad = dtype == at::kFloat ? source : at::empty({num_rows, vocab}, hidden.options());
  const at::Tensor bias_float = per_row(bias), target_index = targets.contiguous();
  const at::Tensor row_max = per_row(max_logit), row_lse = per_row(log_sum_exp), row_grad_logp = per_row(grad_logp);
  const at::Tensor row_mean = per_row(mean_shifted), row_grad_entropy = per_row(grad_entropy);
  const GradType grad_type = dtype == at::kFloat      ? GradType::kFloat32
                             : dtype == at::kBFloat16 ? GradType::kBFloat16
                                                      : GradType::kFloat16;
  const LogitsGradArgs args{source.const_data_ptr<float>(), num_rows, vocab, source.stride(0), !logits.has_value(),
                            data_or_null(bias_float), target_index.const_data_ptr<int64_t>(),
                            make_head(softcap, temperature), data_or_null(row_max), data_or_null(row_lse),
                            data_or_null(row_grad_logp), data_or_null(row_mean), data_or_null(row_grad_entropy),
                            grad.mutable_data_ptr(), grad.stride(0), grad_type};
  check_launch(launch_logits_grad(args, reinterpret_cast<cudaStream_t>(stream)), "logits_grad");
  return grad;
}

}  // namespace dpo_fast::cuda

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  namespace py = pybind11;
  module.doc() = "dpo_fast's CUDA kernels: softmax statistics and dL/dx of a chunk of tokens";
  module.attr("build_tag") = DPO_FAST_STRINGIFY(DPO_FAST_BUILD_TAG);
  module.def("logits_stats", &dpo_fast::cuda::logits_stats,
             "(max_logit, log_sum_exp, target_logit, mean_shifted or None, logits or None) of the tokens rows",
             py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("rows"), py::arg("targets"),
             py::arg("softcap"), py::arg("temperature"), py::arg("with_entropy"), py::arg("keep_logits"),
             py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  module.def("logits_grad", &dpo_fast::cuda::logits_grad, "dL/dx (C, V) in hidden's dtype for the tokens rows",
             py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("rows"), py::arg("targets"),
             py::arg("max_logit"), py::arg("log_sum_exp"), py::arg("mean_shifted"), py::arg("grad_logp"),
             py::arg("grad_entropy"), py::arg("softcap"), py::arg("temperature"), py::arg("logits"),
             py::arg("stream"), py::call_guard<py::gil_scoped_release>());
}
