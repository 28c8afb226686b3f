// pybind11 bindings of the CPU kernel: the module dpo_fast._cpp (ahead of time) or dpo_fast_cpp (just in time).
#include <torch/python.h>

#include "../common.h"
#include "logits.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  namespace py = pybind11;
  module.doc() = "dpo_fast's C++ CPU kernel: softmax statistics and dL/dx of a chunk of tokens";
  module.attr("build_tag") = DPO_FAST_STRINGIFY(DPO_FAST_BUILD_TAG);
  module.def("logits_stats", &dpo_fast::cpu::logits_stats,
             "The fields of ChunkStats in order (max_logit, log_sum_exp, target_logit, mean_shifted, mean_logit, "
             "log_sum_sq_probs, logits; None where not asked for) of the tokens rows",
             py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("rows"), py::arg("targets"),
             py::arg("softcap"), py::arg("temperature"), py::arg("with_metrics"), py::arg("keep_logits"),
             py::call_guard<py::gil_scoped_release>());
  module.def("logits_grad", &dpo_fast::cpu::logits_grad, "dL/dx (C, V) in hidden's dtype for the tokens rows",
             py::arg("hidden"), py::arg("weight"), py::arg("bias"), py::arg("rows"), py::arg("targets"),
             py::arg("max_logit"), py::arg("log_sum_exp"), py::arg("mean_shifted"), py::arg("grad_logp"),
             py::arg("grad_entropy"), py::arg("softcap"), py::arg("temperature"), py::arg("logits"),
             py::call_guard<py::gil_scoped_release>());
}
