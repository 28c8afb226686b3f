"""Run a dpo_fast call on a Hugging Face causal LM's last hidden states, inside the model's forward.

``add_dpo_fast_head(model)`` patches ``model.forward``: called with ``dpo_fast_head=fn`` (and the
unshifted ``labels``), it runs the backbone only, never the ``lm_head`` module, and returns
``fn(hidden, labels, head)`` with ``hidden (B, T-1, H)`` and ``labels (B, T-1)`` shifted for
next-token prediction and ``head`` the LM head's parameters. Without ``dpo_fast_head`` the forward is
the previous one, so generation and every other caller are unchanged.

The call runs inside the module's forward on purpose: wrappers that shard parameters (FSDP,
DeepSpeed ZeRO-3) gather them for the forward, and data-parallel wrappers arm their gradient
reduction there, so ``lm_head.weight`` is whole and its gradient is reduced as usual.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor

_PATCHED = "_dpo_fast_head_installed"


@dataclass
class HeadParams:
    """The LM head as dpo_fast needs it: ``z = softcap * tanh(logit_scale * (h W^T + b) / softcap)``.

    Attributes:
        weight: (V, H) ``lm_head.weight`` (gathered when the model shards it).
        bias: (V,) or None.
        softcap: the config's ``final_logit_softcapping``, or None.
        logit_scale: the config's multiplier of the logits (1.0 for most models).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    softcap: float | None
    logit_scale: float

    def prepare(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden states and bias ready for dpo_fast: in autocast's dtype when it is on, scaled.

        Args:
            hidden: (..., H) last hidden states, any float dtype.
        Returns:
            hidden (..., H) in the head's compute dtype, times ``logit_scale``; bias times ``logit_scale``.
        """
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            hidden = hidden.to(torch.get_autocast_dtype(device_type))
        if self.logit_scale == 1.0:
            return hidden, self.bias
        return hidden * self.logit_scale, None if self.bias is None else self.bias * self.logit_scale


def logit_scale(text_config) -> float:
    """The multiplier a model applies to its logits before any soft-capping, read as TRL 1.16 reads it."""
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        # Granite and MiniCPM3 divide by it; HyperCLOVA X multiplies
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return 1.0 if scale is None else float(scale)


def add_dpo_fast_head(
    model: torch.nn.Module,
    gather: Callable[..., contextlib.AbstractContextManager] = lambda *params: contextlib.nullcontext(),
) -> None:
    """Patch ``model.forward`` (a ``transformers`` causal LM) to accept ``dpo_fast_head=fn``. Idempotent.

    Args:
        model: the causal LM itself (for PEFT, ``peft_model.get_base_model()``); call the outer
            model (PEFT, DDP, FSDP wrappers) as usual, they pass the keyword through.
        gather: a context manager factory that makes the given parameters whole for the call
            (e.g. TRL's ``maybe_gather_lm_head_ctx`` under ZeRO-3); by default nothing is gathered.
    """
    if getattr(model, _PATCHED, False):
        return
    previous_forward = model.forward
    text_config = model.config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = logit_scale(text_config)

    @functools.wraps(type(model).forward)  # keep the signature: `generate` checks its kwargs against it
    def forward(self, *args, dpo_fast_head=None, labels=None, **kwargs):
        if dpo_fast_head is None:
            if labels is not None:
                kwargs["labels"] = labels
            return previous_forward(*args, **kwargs)
        if labels is None:
            raise ValueError("dpo_fast_head needs labels: input_ids with -100 off the completion tokens")
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        lm_head = self.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        if isinstance(weight, DTensor):  # FSDP2 outside an unsharded scope
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        with gather(weight, bias):
            return dpo_fast_head(
                hidden.to(weight.device), labels[:, 1:].to(weight.device), HeadParams(weight, bias, softcap, scale)
            )

    model.forward = types.MethodType(forward, model)
    setattr(model, _PATCHED, True)
