"""What TRL's trainers and their dpo_fast drop-ins share: the fused head installed inside a TRL trainer's models,
the reference pass (forward-only summed log-probs) and the PEFT reference context, as TRL 1.16 runs them.

``dpo_fast.integrations.trl`` (``FastDPOTrainer``) and ``dpo_fast.integrations.kto`` (``FastKTOTrainer``) build on it.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from transformers.utils import ModelOutput
from trl.trainer.utils import maybe_gather_lm_head_ctx, use_adapter

from .. import core, objectives
from ..head import LMHead
from .hf import HeadRows, add_dpo_fast_head


@dataclass
class ReferenceOutput(ModelOutput):
    """``logps``: (R,) float32 summed completion log-probs of R sequences, weighted as the objective's sums."""

    logps: torch.Tensor | None = None


@dataclass
class ReferenceHead:
    """Summed completion log-probs (a reference's, or KTO's mismatched pairs'), forward only; called inside the model's
    forward.

    Attributes:
        objective: whose sums (LD-DPO's weights); None for plain sums.
    """

    backend: str
    objective: objectives.Objective | None = None

    def __call__(self, rows: HeadRows, head: LMHead) -> ReferenceOutput:
        sums, _counts = core.sequence_sums(rows.hidden, rows.layout(head.vocab), head, objective=self.objective,
                                           backend=self.backend)  # fmt: skip
        return ReferenceOutput(logps=sums)


def install_head(trainer, model: torch.nn.Module) -> torch.nn.Module:
    """Patch the causal LM inside ``model``'s wrappers (``hf.add_dpo_fast_head``) for a TRL ``trainer``; returns that
    causal LM."""
    causal_lm = trainer.accelerator.unwrap_model(model)
    if is_peft_model(causal_lm):
        causal_lm = causal_lm.get_base_model()
    add_dpo_fast_head(causal_lm, gather=maybe_gather_lm_head_ctx)
    return causal_lm


def reference_context(trainer) -> contextlib.AbstractContextManager:
    """A PEFT policy without a separate reference runs as the reference with its adapters off (or "ref" on), as
    TRL's trainers run it."""
    if trainer.ref_model is None and is_peft_model(trainer.model):
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
    return contextlib.nullcontext()


def run_policy(model: torch.nn.Module, inputs: dict, head, aux_loss_enabled: bool):
    """The policy's forward with dpo_fast's ``head``; a MoE backbone also returns its router logits when TRL's
    load-balancing loss is on (TRL passes ``output_router_logits`` to the policy only)."""
    router = {"output_router_logits": True} if aux_loss_enabled else {}
    return model(**inputs, **router, dpo_fast_head=head)


def full_logits_outputs(model: torch.nn.Module, inputs: dict):
    """The model's own outputs (full logits) for ``compute_loss(return_outputs=True)``, as TRL recomputes them."""
    warnings.warn(
        "`return_outputs=True` (logits for `compute_metrics`) recomputes the full logits with an extra forward "
        "pass, as TRL does; it is deprecated in TRL and will be removed in v2.0.0.",
        FutureWarning,
        stacklevel=3,
    )
    with torch.no_grad():
        return model(**inputs)
