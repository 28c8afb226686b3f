"""The one entry below every integration: an objective, a token layout and a head -> sums, counts, loss, metrics.

``preference_loss(objective, hidden, layout, head, ...)`` is what the public losses, ``dpo-fast train`` and the TRL
drop-ins all call. It runs either

- the **fused pass** (``autograd.preference_loss``): the chunked backends, when gradients are wanted; the LM-head
  gradients are formed during the forward pass, group by group of whole units (``6*N*H*V`` FLOPs); or
- the **recompute path**: per-token log-probs (``token_logps``, any backend), their sums, and the objective
  through ``objectives.objective_loss``; the logits are recomputed in backward (``8*N*H*V``). The reference
  backend, ``grads_in_forward=False`` and passes without gradients take it.

Both evaluate the objective with the same code (``objective.evaluate``: its value and closed-form gradients), so
they give the same numbers at every edge. ``token_logps`` and ``sequence_sums`` are the log-prob passes (a
reference model's, or differentiable ones).

Every function here takes reference log-probs as *sums* with the objective's token weights and returns sums and
token counts; converting to and from the objective's reported units (``objectives.reported_logps``) is the
caller's business, done once. The head's precision rule (autocast included) is ``dpo_fast.head``'s.

A head sharded over the vocabulary (``head.shard``: a ``DTensor`` weight, ``dpo_fast.vocab_parallel``) runs on every
entry and both paths with the chunked backends: each rank of its group passes the same tokens and gets the same
loss, sums and metrics, ``dL/dh`` summed over the group and the gradients of its own rows of the head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import autograd, backends, chunking, objectives, validate
from .backends import reference
from .chunking import GradsNeeded
from .head import LMHead, autocast_off, compute_dtype
from .layout import TokenLayout


@dataclass
class TokenMetrics:
    """Per-token statistics of the policy's logits ``z`` (after softcap), from the pass that forms the log-probs.

    Each has labels' shape, holds 0 (False) at ignored tokens, and is detached. TRL's logged metrics
    are means of these over the valid tokens (``labels != ignore_index``): ``entropy`` over all of
    them, ``logits/chosen`` and ``logits/rejected`` of ``mean_logit`` over the chosen and rejected
    sequences' tokens, ``mean_token_accuracy`` of ``is_top1``.

    Attributes:
        entropy: float32 (float64 for float64 inputs) ``-sum_v p_v log p_v`` of ``p = softmax(z)``.
        mean_logit: float32 (float64 for float64 inputs) ``mean_v z_v``.
        is_top1: bool, the target's logit is the largest (TRL's ``argmax == label``; an exact tie with
            another entry counts as top-1).
    """

    entropy: torch.Tensor
    mean_logit: torch.Tensor
    is_top1: torch.Tensor


@dataclass
class PreferenceResult:
    """A preference objective on S sequences, in the accumulate dtype (float32; float64 for float64 inputs).

    Attributes:
        loss: () the objective; differentiable w.r.t. hidden, weight and bias.
        logps: (S,) the objective's sums ``sum_t w[t] logp[t]`` (LD-DPO-weighted with ``ld_alpha``); differentiable.
        counts: (S,) completion tokens of each sequence.
        nll_loss: () the NLL of the chosen (paired) or of all the NLL tokens, mean over them, detached; None
            without an NLL term.
        kl: () the KL estimate the objective used (0 when it reads none).
        token_metrics: the policy's ``TokenMetrics`` when asked for, else None.
    """

    loss: torch.Tensor
    logps: torch.Tensor
    counts: torch.Tensor
    nll_loss: torch.Tensor | None
    kl: torch.Tensor
    token_metrics: TokenMetrics | None


def token_logps(
    hidden: torch.Tensor,
    layout: TokenLayout,
    head: LMHead,
    *,
    with_metrics: bool = False,
    backend: str = "auto",
    scratch_mib: float | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """(N,) per-token log-probs, and with ``with_metrics`` (entropy, mean_logit, is_top1, log_sum_sq_probs), each (N,).

    Float32 (float64 for float64 inputs), 0 at ignored tokens. The log-probs and the entropy are differentiable
    w.r.t. hidden, weight and bias for any upstream gradient; the other metrics are detached.
    """
    name = _resolve(backend, scratch_mib, hidden, head, loss=False)
    shard = head.shard
    hidden, weight, bias = _flat_operands(hidden, head)
    with autocast_off(hidden):
        return _token_pass(hidden, weight, bias, layout.labels, layout.ignore_index, head, with_metrics, name,
                           scratch_mib, shard)  # fmt: skip


def sequence_sums(
    hidden: torch.Tensor,
    layout: TokenLayout,
    head: LMHead,
    *,
    objective: objectives.Objective | None = None,
    backend: str = "auto",
    scratch_mib: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) per-sequence sums of the completion log-probs, weighted as ``objective``'s sums are (LD-DPO; plain sums
    without one), and (S,) float64 completion-token counts. A reference model's sums under ``torch.no_grad()``
    (forward only, nothing saved), or differentiable ones."""
    logp, _ = token_logps(hidden, layout, head, backend=backend, scratch_mib=scratch_mib)
    weights = layout.scored.to(torch.float64)
    if objective is not None and objective.ld_alpha is not None:
        weights = objectives.token_weights(objective, layout.scored, layout.segment_ids, layout.num_sequences).logps
    return layout.sums(torch.where(weights != 0, logp.double(), 0.0) * weights).to(logp.dtype), layout.counts()


def preference_loss(
    objective: objectives.Objective,
    hidden: torch.Tensor,
    layout: TokenLayout,
    head: LMHead,
    *,
    ref_sums: torch.Tensor | None = None,
    desirable: torch.Tensor | None = None,
    kl: torch.Tensor | float = 0.0,
    nll_labels: torch.Tensor | None = None,
    backend: str = "auto",
    scratch_mib: float | None = None,
    grads_in_forward: bool | None = None,
    token_metrics: bool = False,
) -> PreferenceResult:
    """``objective`` on the sequences of ``layout`` through ``head``.

    Args:
        hidden: (..., H) with ``layout``'s tokens (padded (R, T, H) or packed (N, H)).
        layout: S sequences: a paired objective's ``[chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}]``, or S
            unpaired ones.
        ref_sums: (S,) the reference model's sums with the objective's weights (``sequence_sums(objective=...)``),
            constants; None for 0 (reference-free).
        desirable: (S,) bool, KTO's labels. kl: () KTO's KL estimate, a constant.
        nll_labels: the targets of an NLL term beyond the completions (TRL's ORPO: the chosen prompts too), in
            labels' shape; where both hold a target it is the same (``validate.check_nll_labels``).
        grads_in_forward: None: the fused pass on chunked backends when gradients are wanted; False: the recompute
            path. True with ``backend="reference"`` is refused.
        token_metrics: also return the ``TokenMetrics``, from the pass that forms the log-probs.
    """
    validate.check_flag("grads_in_forward", grads_in_forward, optional=True)
    validate.check_flag("return_token_metrics", token_metrics)
    name = _resolve(backend, scratch_mib, hidden, head, loss=True)
    if grads_in_forward and name == "reference":
        raise ValueError("grads_in_forward=True needs a chunked backend (torch, triton, cpp, cuda), not 'reference'")
    num_seq = layout.num_sequences
    num_units = num_seq // 2 if objective.paired else num_seq
    completion, targets, nll_tokens = layout.scored, layout.labels, None
    if nll_labels is not None:
        flat_nll = nll_labels.reshape(-1).long()
        nll_tokens = (flat_nll != layout.ignore_index) & (layout.segment_ids < num_units)
        targets = torch.where(completion, targets, torch.where(nll_tokens, flat_nll, layout.ignore_index))
    weights = objectives.token_weights(objective, completion, layout.segment_ids, num_seq, nll_tokens)
    counts = layout.counts()
    kl = torch.as_tensor(kl, dtype=torch.float64, device=hidden.device).detach().reshape(())
    kl = kl if objective.needs.kl else torch.zeros_like(kl)
    ref = None if ref_sums is None else ref_sums.detach().double()
    needs = GradsNeeded(*(t is not None and t.requires_grad and torch.is_grad_enabled()
                          for t in (hidden, head.weight, head.bias)))  # fmt: skip
    fused = (name != "reference" if grads_in_forward is None else grads_in_forward) and any(
        (needs.hidden, needs.weight, needs.bias)
    )
    shard = head.shard
    hidden, weight, bias = _flat_operands(hidden, head)
    with autocast_off(hidden):
        acc = backends.accumulate_dtype(hidden.dtype)
        if fused:
            out = autograd.preference_loss(
                hidden, weight, bias, targets=targets, segment_ids=layout.segment_ids, weights=weights, ref_sums=ref,
                desirable=desirable, kl=kl, num_units=num_units, objective=objective, ignore_index=layout.ignore_index,
                head=head.spec, needs=needs, with_metrics=token_metrics, backend=name,
                scratch_bytes=chunking.scratch_bytes(hidden.device, scratch_mib), shard=shard,
            )  # fmt: skip
            loss, logps, nll_logps, metrics = out.loss, out.logps, out.nll_logps, out[4:]
        else:
            wpo = objective.needs.wpo
            logp, metrics = _token_pass(hidden, weight, bias, targets, layout.ignore_index, head, token_metrics or wpo,
                                        name, scratch_mib, shard)  # fmt: skip
            seqs = objectives.sequence_inputs(logp, layout.segment_ids, num_seq, weights, ref_logps=ref,
                                              log_sum_sq_probs=metrics[3] if wpo else None, desirable=desirable)  # fmt: skip
            nll_count = hidden.new_zeros((), dtype=torch.float64) if weights.nll is None else weights.nll.sum()
            batch = objectives.BatchConstants(num_units=num_units, nll_tokens=nll_count, kl=kl)
            loss = objectives.objective_loss(objective, seqs, batch).to(acc)
            logps, nll_logps = seqs.logps.to(acc), None if seqs.nll_logps is None else seqs.nll_logps.to(acc)
    nll_loss = None
    if weights.nll is not None:
        nll_sums = nll_logps.detach().double()
        nll_sums = nll_sums[:num_units] if objective.paired else nll_sums
        nll_loss = (-nll_sums.sum() / weights.nll.sum().clamp(min=1)).to(acc)
    metrics = TokenMetrics(*(layout.per_token(m.detach()) for m in metrics[:3])) if token_metrics else None
    return PreferenceResult(loss, logps, counts.to(acc), nll_loss, kl.to(acc), metrics)


def _resolve(backend: str, scratch_mib: float | None, hidden: torch.Tensor, head: LMHead, *, loss: bool) -> str:
    """The concrete backend for ``hidden``'s device and the head's compute dtype; refuses ``torch.func``."""
    validate.check_backend(backend)
    validate.check_scratch_mib(scratch_mib)
    head.check(hidden)
    name = backends.resolve(backend, hidden.device, compute_dtype(hidden))
    if name == "reference" and head.shard is not None:
        raise ValueError(
            "backend='reference' forms the whole (N, V) logits, which a head sharded over the vocabulary (a DTensor "
            "weight) never does: use a chunked backend (auto, torch, cpp, triton, cuda)"
        )
    if (loss or name != "reference") and _under_functorch(hidden, head.weight):
        raise RuntimeError(
            "dpo_fast does not support torch.func transforms (vmap, grad, jacrev, ...): its chunked backends are "
            "custom ops with their own autograd, and its losses are differentiable once. Use torch.autograd, or, "
            "for per-token log-probs, backend='reference'."
        )
    return name


def _under_functorch(*tensors: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def _flat_operands(hidden: torch.Tensor, head: LMHead) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    hidden, weight, bias = head.operands(hidden)
    return hidden.reshape(-1, hidden.shape[-1]), weight, bias


def _token_pass(hidden, weight, bias, labels, ignore_index, head, with_metrics, name, scratch_mib, shard=None):
    """(N, H) operands -> (N,) logp and the (N,) metrics or None (``token_logps``'s result); ``shard``: the operands
    are this rank's rows of a vocabulary-parallel head."""
    if name == "reference":
        return reference.token_logps(hidden, weight, labels, bias, head.spec, ignore_index, with_metrics)
    out = autograd.token_logps(
        hidden, weight, bias, labels, ignore_index=ignore_index, head=head.spec, with_metrics=with_metrics,
        backend=name, scratch_bytes=chunking.scratch_bytes(hidden.device, scratch_mib), shard=shard,
    )  # fmt: skip
    return out.logp, (tuple(out[1:5]) if with_metrics else None)
