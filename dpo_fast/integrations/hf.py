"""A Hugging Face causal LM run as backbone -> last hidden states -> dpo_fast's fused head, inside its forward.

The one place that knows how a ``transformers`` model turns its last hidden states into logits and
how to hand them to dpo_fast; ``dpo_fast.trainer`` and ``dpo_fast.integrations.trl`` both call it, so
both accept the same models:

- ``lm_head_of(model)``: the model's head as a ``dpo_fast.head.LMHead``: the weight (tied or not; kept sharded
  when tensor parallelism splits it over the vocabulary, ``dpo_fast.vocab_parallel``) and bias, the final
  soft-capping (Gemma 2) and the logit scale some models multiply by (Cohere, Granite, Falcon-H1, ...), read as
  TRL 1.16 reads them:
  ``z = softcap * tanh(scale * (h W^T + b) / softcap)``. The callers hand it to ``dpo_fast.core`` with the rows'
  ``HeadRows.layout()``.
- ``head_rows(model, ...)``: runs the backbone (``model.base_model``, never the ``lm_head`` module)
  and lays its last hidden states out as ``HeadRows``: padded ``(2P, T, H)``, packed ``(N, H)`` with
  segment ids, or the prefix-shared layout of ``dpo_fast.integrations.prefix_sharing``.
- ``run_head(model, fn, ...)``: both, then ``fn(rows, head)``; ``add_dpo_fast_head(model)`` patches
  ``model.forward`` so that ``model(..., dpo_fast_head=fn)`` does it (TRL's calling convention).
- ``token_metric_sums``: TRL's per-token metrics as sums and counts, from the fused pass's ``TokenMetrics``.

The head runs inside the module's forward on purpose: wrappers that shard parameters (FSDP,
DeepSpeed ZeRO-3) gather them for the forward, and data-parallel wrappers arm their gradient
reduction there, so ``lm_head.weight`` is whole and its gradient is reduced as usual. Where FSDP2 gives the head a
unit of its own (``fully_shard(model.lm_head)``), whose weight the model's forward leaves sharded, the loss runs
inside that unit's forward instead (``run_head``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
from collections.abc import Callable
from typing import TypeVar

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from ..core import TokenMetrics
from ..head import LMHead
from ..layout import IGNORE_INDEX, TokenLayout
from .prefix_sharing import SharedPrefixBatch, shared_attention_mask

_PATCHED = "_dpo_fast_head_installed"
# TRL's names of the per-token metrics, in the order of ``token_metric_sums``' (sum, count) pairs
TOKEN_METRICS = ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy")
# keyword arguments a wrapper (PEFT, TRL) may pass to the backbone that the prefix-shared layout replaces or ignores
_REPLACED_BY_SHARED_LAYOUT = ("input_ids", "attention_mask", "position_ids", "use_cache", "return_dict",
                              "output_attentions", "output_hidden_states")  # fmt: skip
Result = TypeVar("Result")


@dataclasses.dataclass
class HeadRows:
    """The hidden states the LM head scores and the next-token targets they predict, chosen sequences first.

    Attributes:
        hidden: (2P, T, H) padded, rows [0, P) chosen and [P, 2P) rejected; or (N, H) packed.
        labels: (2P, T) or (N,) int64, ``IGNORE_INDEX`` off the completion tokens.
        segment_ids: None (padded), or (N,) int64 in [0, 2P): p for pair p's chosen tokens, P + p for its rejected.
        num_pairs: P; None for packed rows of a pass that does not know it (read from the segment ids then).
        aux_loss: () a MoE backbone's load-balancing loss (``router_aux_loss``, unweighted) when it was called
            with ``output_router_logits=True``; else None.
    """

    hidden: torch.Tensor
    labels: torch.Tensor
    segment_ids: torch.Tensor | None = None
    num_pairs: int | None = None
    aux_loss: torch.Tensor | None = None

    def to(self, device: torch.device) -> HeadRows:
        segment_ids = None if self.segment_ids is None else self.segment_ids.to(device)
        return HeadRows(self.hidden.to(device), self.labels.to(device), segment_ids, self.num_pairs, self.aux_loss)

    @property
    def pairs(self) -> int:
        """P (a packed layout without ``num_pairs`` reads it from the segment ids: a device sync)."""
        if self.segment_ids is None:
            return self.hidden.shape[0] // 2
        if self.num_pairs is None:
            return (int(self.segment_ids.max()) + 2) // 2 if self.segment_ids.numel() else 0
        return self.num_pairs

    def sequence_of_tokens(self) -> torch.Tensor:
        """(labels.numel(),) int64: the sequence in [0, 2P) of every (flattened) token."""
        if self.segment_ids is not None:
            return self.segment_ids
        rows, length = self.labels.shape[0], self.labels[0].numel()
        return torch.arange(rows, device=self.labels.device).repeat_interleave(length)

    def completion_lengths(self) -> torch.Tensor:
        """(2P,) int64: the completion tokens (labels that are not ignored) of each sequence."""
        valid = (self.labels != IGNORE_INDEX).reshape(-1)
        return torch.bincount(self.sequence_of_tokens()[valid], minlength=2 * self.pairs)

    def layout(self, vocab: int) -> TokenLayout:
        """The rows' ``TokenLayout``: 2P sequences (chosen first) of a pairwise batch, or the padded rows' B."""
        num_sequences = None if self.segment_ids is None else 2 * self.pairs
        return TokenLayout.of(self.hidden, self.labels, vocab=vocab, segment_ids=self.segment_ids,
                              num_sequences=num_sequences)  # fmt: skip


def lm_head_of(model: torch.nn.Module) -> LMHead:
    """The head of a ``transformers`` causal LM (the LM itself, not a PEFT or parallel wrapper).

    Read it where FSDP has gathered the head (inside the forward of the unit that holds it, as ``run_head`` does):
    a ``DTensor`` weight there is a tensor-parallel head split over the vocabulary (``ColwiseParallel`` on
    ``lm_head``, transformers' ``tp_plan``, with or without FSDP2 over a data-parallel mesh dimension), kept sharded:
    the fused loss then runs on each rank's rows (``dpo_fast.vocab_parallel``).
    """
    text_config = model.config.get_text_config()
    lm_head = model.get_output_embeddings()
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return LMHead(weight, bias, softcap=softcap, logit_scale=logit_scale(text_config))


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


def last_hidden_state(model: torch.nn.Module, *args, **inputs) -> torch.Tensor:
    """(B, T, H) the backbone's last hidden states (``model.base_model``, no KV cache); the lm_head never runs."""
    return model.base_model(*args, **{**inputs, "use_cache": False}).last_hidden_state


def router_aux_loss(model: torch.nn.Module, router_logits, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """() the MoE load-balancing loss of a backbone's router logits, unweighted, as the model's own forward and
    TRL 1.16's fused head compute it (Mixtral's ``load_balancing_loss_func``, which every MoE family shares;
    padding excluded by ``attention_mask``)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    text_config = model.config.get_text_config()
    return load_balancing_loss_func(
        router_logits, text_config.num_experts, text_config.num_experts_per_tok, attention_mask
    )


def head_rows(
    model: torch.nn.Module,
    *args,
    labels: torch.Tensor | None = None,
    shift_labels: bool = False,
    segment_ids: torch.Tensor | None = None,
    num_pairs: int | None = None,
    shared: SharedPrefixBatch | None = None,
    **inputs,
) -> HeadRows:
    """Run the backbone of ``model`` (a ``transformers`` causal LM) and lay out its rows for the head.

    Args:
        args, inputs: the backbone's inputs (``input_ids``, ``attention_mask``, ``position_ids``, ...).
        labels: (2P, T) padded, or (N,) packed, int64 with ``IGNORE_INDEX`` off the completions.
        shift_labels: ``labels`` are the input ids (TRL's convention): the hidden state at t predicts
            ``labels[t + 1]``, so the last position and the first label are dropped. Otherwise
            ``labels[t]`` is already the target of position t.
        segment_ids: (N,) for packed input (``input_ids`` (1, N)), with ``num_pairs``.
        inputs["output_router_logits"]: True for a MoE backbone: the rows carry its load-balancing loss.
        shared: a prefix-shared batch (``prefix_sharing.collate_shared``) instead of all of the above;
            ``inputs`` may then only hold what the shared layout replaces (None values are ignored).
    """
    if shared is not None:
        extra = sorted(
            key for key, value in inputs.items() if value is not None and key not in _REPLACED_BY_SHARED_LAYOUT
        )
        if args or extra or labels is not None or segment_ids is not None:
            raise ValueError(
                f"a prefix-shared batch brings its own inputs and labels; got also {extra or 'positional inputs'}: "
                "prefix sharing takes text-only batches of input ids"
            )
        hidden = last_hidden_state(
            model, input_ids=shared.input_ids, attention_mask=shared_attention_mask(model, shared),
            position_ids=shared.position_ids,
        )  # fmt: skip
        return HeadRows(shared.gather(hidden), shared.labels, shared.segment_ids, shared.num_pairs)
    if labels is None:
        raise ValueError("the fused head needs labels: the input ids with -100 off the completion tokens")
    outputs = model.base_model(*args, **{**inputs, "use_cache": False})
    hidden, aux_loss = outputs.last_hidden_state, None
    if inputs.get("output_router_logits"):
        aux_loss = router_aux_loss(model, outputs.router_logits, inputs.get("attention_mask"))
    if segment_ids is not None:
        return HeadRows(hidden.squeeze(0), labels, segment_ids, num_pairs, aux_loss)
    if shift_labels:
        return HeadRows(hidden[:, :-1], labels[:, 1:], aux_loss=aux_loss)
    return HeadRows(hidden, labels, aux_loss=aux_loss)


def _no_gather(*params: torch.Tensor | None) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def run_head(
    model: torch.nn.Module,
    fn: Callable[[HeadRows, LMHead], Result],
    *args,
    gather: Callable[..., contextlib.AbstractContextManager] = _no_gather,
    **inputs,
) -> Result:
    """``fn(rows, head)`` on the backbone's rows (``head_rows(model, *args, **inputs)``) and ``lm_head_of(model)``.

    Call it inside the forward of the module a sharding wrapper wraps (see the module docstring).

    Args:
        gather: a context manager factory that makes the head's parameters whole for the call (e.g.
            TRL's ``maybe_gather_lm_head_ctx`` under ZeRO-3); by default nothing is gathered.
    """
    rows = head_rows(model, *args, **inputs)
    unit = _sharded_head_unit(model)
    if unit is not None:
        return _inside_forward_of(unit, lambda hidden: fn(dataclasses.replace(rows, hidden=hidden), lm_head_of(model)),
                                  rows.hidden)  # fmt: skip
    head = lm_head_of(model)
    with gather(head.weight, head.bias):
        return fn(rows.to(head.weight.device), head)


def _sharded_head_unit(model: torch.nn.Module) -> torch.nn.Module | None:
    """The FSDP2 unit below ``model`` that holds the head's weight, when it is sharded now (a unit of its own, as
    ``fully_shard(model.lm_head)``, or one whose forward has resharded it); None when the weight is whole here (in
    ``model``'s own unit, unsharded for its forward) or there is no FSDP."""
    weight = model.get_output_embeddings().weight
    if not isinstance(weight, DTensor):
        return None
    holders = [module for module in model.modules() if isinstance(module, FSDPModule)
               and any(param is weight for param in module.parameters())]  # fmt: skip
    innermost = holders[-1] if holders else None  # modules() lists a unit before the units inside it
    return None if innermost is model else innermost


def _inside_forward_of(unit: torch.nn.Module, body: Callable[[torch.Tensor], Result], hidden: torch.Tensor) -> Result:
    """``body(hidden)`` as ``unit``'s forward, for this one call: FSDP2 gathers the unit's parameters before it, takes
    ``hidden`` through its post-backward hook (which reduce-scatters their gradients) and hooks the tensors of the
    result for its pre-backward (which gathers them again if the forward resharded them)."""

    def forward(hidden: torch.Tensor):
        result = body(hidden)
        return result, *(value for value in _tensors_of(result) if value.requires_grad)

    unit.forward = forward  # an instance attribute: the class's forward is untouched, and restored below
    try:
        return unit(hidden)[0]
    finally:
        del unit.forward


def _tensors_of(value) -> list[torch.Tensor]:
    """The tensors in ``value``: itself, or in a dataclass's fields, a tuple, list or dict, recursively."""
    if isinstance(value, torch.Tensor):
        return [value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = [getattr(value, field.name) for field in dataclasses.fields(value)]
    elif isinstance(value, dict):
        value = list(value.values())
    elif not isinstance(value, (tuple, list)):
        return []
    return [tensor for item in value for tensor in _tensors_of(item)]


def add_dpo_fast_head(
    model: torch.nn.Module, gather: Callable[..., contextlib.AbstractContextManager] = _no_gather
) -> None:
    """Patch ``model.forward`` (a ``transformers`` causal LM) to accept ``dpo_fast_head=fn``. Idempotent.

    ``model(**inputs, labels=input_ids_masked, dpo_fast_head=fn)`` runs ``run_head`` with TRL's
    unshifted labels (``shift_labels=True``) and returns ``fn(rows, head)``;
    ``model(dpo_fast_head=fn, dpo_fast_shared=batch)`` runs it on a prefix-shared batch. Without
    ``dpo_fast_head`` the forward is the previous one, so generation and every other caller are unchanged.

    Args:
        model: the causal LM itself (for PEFT, ``peft_model.get_base_model()``); call the outer
            model (PEFT, DDP, FSDP wrappers) as usual, they pass the keywords through.
        gather: as for ``run_head``.
    """
    if getattr(model, _PATCHED, False):
        return
    previous_forward = model.forward

    @functools.wraps(type(model).forward)  # keep the signature: `generate` checks its kwargs against it
    def forward(self, *args, dpo_fast_head=None, dpo_fast_shared=None, labels=None, **kwargs):
        if dpo_fast_head is None:
            if dpo_fast_shared is not None:
                raise ValueError("dpo_fast_shared is the layout of the fused head: pass dpo_fast_head with it")
            if labels is not None:
                kwargs["labels"] = labels
            return previous_forward(*args, **kwargs)
        if dpo_fast_shared is None:
            return run_head(self, dpo_fast_head, *args, gather=gather, labels=labels, shift_labels=True, **kwargs)
        return run_head(self, dpo_fast_head, *args, gather=gather, labels=labels, shared=dpo_fast_shared, **kwargs)

    model.forward = types.MethodType(forward, model)
    setattr(model, _PATCHED, True)


def token_metric_sums(metrics: TokenMetrics, rows: HeadRows) -> torch.Tensor:
    """(8,) float64: the sum and the count behind each of TRL 1.16's token metrics (``TOKEN_METRICS``).

    With TRL's masks: ``entropy`` over every completion token; ``logits/chosen`` and
    ``logits/rejected``, the mean logit over the chosen and the rejected sequences' completion
    tokens; ``mean_token_accuracy``, the target's top-1 over the chosen ones. Sums of several
    batches (or processes) add up; ``token_metric_means`` divides them.

    Args:
        metrics: the fused pass's ``DPOOutput.token_metrics`` (labels' shape).
        rows: the rows they were computed on.
    """
    valid = (rows.labels != IGNORE_INDEX).reshape(-1)
    chosen = valid & (rows.sequence_of_tokens() < rows.pairs)
    rejected = valid & ~chosen
    entropy, mean_logit = metrics.entropy.reshape(-1).double(), metrics.mean_logit.reshape(-1).double()
    is_top1 = metrics.is_top1.reshape(-1)
    return torch.stack([
        entropy[valid].sum(), valid.sum().double(),
        mean_logit[chosen].sum(), chosen.sum().double(),
        mean_logit[rejected].sum(), rejected.sum().double(),
        is_top1[chosen].sum().double(), chosen.sum().double(),
    ])  # fmt: skip


def token_metric_means(sums: torch.Tensor) -> dict[str, float]:
    """``TOKEN_METRICS`` from ``token_metric_sums`` (of one batch, or added up); 0.0 where no token counts, as TRL."""
    values = sums.tolist()
    return {name: values[2 * i] / values[2 * i + 1] if values[2 * i + 1] > 0 else 0.0
            for i, name in enumerate(TOKEN_METRICS)}  # fmt: skip
