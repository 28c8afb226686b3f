"""What an objective consumes and returns: the contract between the objectives and the fused pass.

The fused pass goes once over the vocabulary, a group of whole *units* at a time (a unit is a
(chosen, rejected) pair for the paired objectives, one sequence for KTO). For each token ``t`` of
sequence ``s(t)`` it gets ``logp[t]`` (and, with metrics, ``log sum_v p_v^2``) and adds into
per-sequence sums with per-token weights (``TokenWeights``):

- ``logps[s]     = sum_t w[t] * logp[t]``     ``w``: 1 on completion tokens, LD-DPO's ``ld_alpha`` past the
  pair's shared length, 0 elsewhere;
- ``nll_logps[s] = sum_t m[t] * logp[t]``     ``m``: 1 on the tokens of the NLL term (chosen rows), when the
  objective has one;
- ``wpo_logps[s] = sum_t c[t] * (logp[t] - log_sum_sq_probs[t])``  ``c``: the completion tokens (WPO only).

Once a group's tokens are all summed, ``objective.evaluate(SequenceInputs, BatchConstants)`` gives that
group's share of the loss and ``dL/dlogps``, ``dL/dnll_logps`` for its sequences; the per-token upstream
gradient is then ``dL/dlogp[t] = dL/dlogps[s(t)] * w[t] + dL/dnll_logps[s(t)] * m[t]`` (``token_grads``),
which the backend's gradient pass turns into ``dL/dx`` for the group's logits. The groups' losses add
up to the batch loss. An objective whose ``local`` is False (TRL's ``aot``, ``aot_unpaired``: they sort
across the batch) must be evaluated on all units at once: one group holding every unit.

``sequence_inputs`` and ``token_grads`` are that contract in plain PyTorch, on whole per-token tensors:
the recompute path and the tests use them, the fused pass does the same sums chunk by chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class SequenceInputs:
    """Per-sequence inputs of ``S`` sequences making whole units: paired objectives lay them out
    ``[chosen_0 .. chosen_{G-1}, rejected_0 .. rejected_{G-1}]`` (``S = 2G``), unpaired ones in any order.

    Attributes:
        logps: (S,) float32/float64 ``sum_t w[t] * logp[t]`` over the completion tokens (differentiable input).
        token_counts: (S,) number of completion tokens (unweighted; averaging and WPO divide by it, clamped to 1).
        ref_logps: (S,) the reference model's ``logps``, same weights; None for reference-free (taken as 0).
        nll_logps: (S,) ``sum_t m[t] * logp[t]`` over the NLL tokens; None when ``needs.nll`` is False.
        wpo_logps: (S,) ``sum_t (logp[t] - log_sum_sq_probs[t])`` over the completion tokens; None unless ``needs.wpo``.
        desirable: (S,) bool, unpaired objectives only: True for a desirable (chosen) completion.
    """

    logps: torch.Tensor
    token_counts: torch.Tensor
    ref_logps: torch.Tensor | None = None
    nll_logps: torch.Tensor | None = None
    wpo_logps: torch.Tensor | None = None
    desirable: torch.Tensor | None = None


@dataclass(frozen=True)
class BatchConstants:
    """What an objective needs from the whole batch, known before the pass.

    Attributes:
        num_units: P pairs (or B sequences for unpaired objectives): the loss is a mean over units.
        nll_tokens: () or float, the number of NLL tokens in the whole batch (TRL's NLL is a mean over
            tokens); clamped to 1. Unused without an NLL term.
        kl: () or float, KTO's detached KL estimate (``kto_kl_estimate``); unused elsewhere.
    """

    num_units: int
    nll_tokens: torch.Tensor | float = 1.0
    kl: torch.Tensor | float = 0.0


@dataclass
class ObjectiveValue:
    """What ``evaluate`` returns for the units it was given.

    Attributes:
        loss: () float64, these units' share of the batch loss (the shares of all groups add up to it).
        grad_logps: (S,) float64 ``dL/dlogps``.
        grad_nll_logps: (S,) float64 ``dL/dnll_logps``, or None without an NLL term.
    """

    loss: torch.Tensor
    grad_logps: torch.Tensor
    grad_nll_logps: torch.Tensor | None = None


@dataclass(frozen=True)
class Needs:
    """Which optional sums and constants an objective reads.

    Attributes:
        reference: reference ``ref_logps`` (None is then taken as 0, the reference-free form).
        nll: ``nll_logps`` and ``BatchConstants.nll_tokens``.
        wpo: ``wpo_logps``, i.e. ``log sum_v p_v^2`` per token (``ChunkStats.log_sum_sq_probs``, ``with_metrics``).
        kl: ``BatchConstants.kl``.
    """

    reference: bool = False
    nll: bool = False
    wpo: bool = False
    kl: bool = False


class Objective(Protocol):
    """An objective on per-sequence sums. Implemented by ``DPOObjective``, ``CPOObjective``, ``ORPOObjective``,
    ``KTOObjective``: frozen dataclasses of Python scalars (hashable, so a compiled caller specializes on them)."""

    paired: bool
    """Units are (chosen, rejected) pairs, laid out chosen block then rejected block; else single sequences."""

    @property
    def local(self) -> bool:
        """Each unit's loss and gradients depend on its own sums and the ``BatchConstants`` alone."""

    @property
    def needs(self) -> Needs: ...

    @property
    def averaged(self) -> bool:
        """The objective compares length-averaged log-probs: the units in which a caller reports log-probs and
        rewards (the sums it takes stay sums)."""

    @property
    def ld_alpha(self) -> float | None:
        """LD-DPO's weight of the tokens past a pair's shared length (``TokenWeights.logps``), or None."""

    def evaluate(self, seqs: SequenceInputs, batch: BatchConstants) -> ObjectiveValue: ...

    def rewards(self, logps: torch.Tensor, ref_logps: torch.Tensor | None) -> torch.Tensor:
        """(S,) TRL's logged rewards of the log-probs (in the objective's units, ``reported_logps``), detached."""


def chosen_nll(seqs: SequenceInputs, batch: BatchConstants, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight * NLL`` of a paired group's chosen rows, ``-weight * sum(nll_logps[chosen]) / nll_tokens``
    (TRL's token mean over the batch; 0 when the batch has no NLL token), and its gradient (2G,) w.r.t.
    ``nll_logps``."""
    if seqs.nll_logps is None:
        raise ValueError("this objective has an NLL term: it needs SequenceInputs.nll_logps (see token_weights)")
    chosen = seqs.nll_logps.detach().double().chunk(2)[0]
    tokens = torch.as_tensor(batch.nll_tokens, dtype=torch.float64, device=chosen.device).clamp(min=1)
    grad = torch.cat([torch.ones_like(chosen) * (-weight / tokens), torch.zeros_like(chosen)])
    return -weight * chosen.sum() / tokens, grad


@dataclass
class TokenWeights:
    """Per-token weights of the sums, (N,) each, 0 on the tokens a sum does not cover.

    Attributes:
        logps: float ``w``: 1 on the completion tokens (LD-DPO: ``ld_alpha`` past the shared length).
        nll: float ``m``: 1 on the NLL tokens, or None without an NLL term.
        completion: bool, the completion tokens (``token_counts``, ``wpo_logps``).
    """

    logps: torch.Tensor
    nll: torch.Tensor | None
    completion: torch.Tensor


def _segment_count(tokens: torch.Tensor, segment_ids: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """(num_sequences,) float64 count of the ``tokens`` (bool (N,)) of each sequence; no device sync (unlike bincount)."""
    counts = torch.zeros(num_sequences, dtype=torch.float64, device=tokens.device)
    return counts.index_add_(0, segment_ids, tokens.to(torch.float64))


def completion_positions(completion: torch.Tensor, segment_ids: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """(N,) int64: 1-based position of each completion token within its sequence's completion, in token order.

    Args:
        completion: (N,) bool; segment_ids: (N,) int64 in ``[0, num_sequences)``. Tokens of one sequence
            appear in order, possibly interleaved with other sequences' tokens.
    """
    order = torch.argsort(segment_ids, stable=True)
    counts = _segment_count(completion, segment_ids, num_sequences).long()
    starts = counts.cumsum(0) - counts
    position_sorted = completion.index_select(0, order).long().cumsum(0) - starts.index_select(
        0, segment_ids.index_select(0, order)
    )
    return torch.empty_like(position_sorted).index_copy_(0, order, position_sorted)


def token_weights(
    objective: Objective,
    completion: torch.Tensor,
    segment_ids: torch.Tensor,
    num_sequences: int,
    nll_tokens: torch.Tensor | None = None,
) -> TokenWeights:
    """The per-token weights an objective's sums need.

    Args:
        completion: (N,) bool, tokens whose log-prob is scored (``labels != ignore_index``).
        segment_ids: (N,) int64 sequence of each token; paired objectives: ``[0, P)`` chosen, ``[P, 2P)`` rejected.
        nll_tokens: (N,) bool, the tokens of the NLL term; default: the completion tokens of the chosen rows
            (paired) or of every sequence. TRL's ORPO takes the chosen prompt tokens too: pass them here.
    Returns:
        ``TokenWeights``. LD-DPO (TRL 1.16): with ``c`` and ``r`` completion tokens in a pair, the first
        ``min(c, r)`` completion tokens of each sequence weigh 1 and the rest ``ld_alpha``.
    """
    weights = completion.to(torch.float64)
    if objective.ld_alpha is not None:
        num_pairs = num_sequences // 2
        counts = _segment_count(completion, segment_ids, num_sequences)
        shared = torch.minimum(counts[:num_pairs], counts[num_pairs:]).repeat(2)
        positions = completion_positions(completion, segment_ids, num_sequences)
        past_shared = positions > shared.index_select(0, segment_ids)
        weights = torch.where(past_shared, weights * objective.ld_alpha, weights)
    nll = None
    if objective.needs.nll:
        if nll_tokens is None:
            nll_tokens = completion & (segment_ids < num_sequences // 2) if objective.paired else completion
        nll = nll_tokens.to(torch.float64)
    return TokenWeights(logps=weights, nll=nll, completion=completion)


def sequence_inputs(
    token_logps: torch.Tensor,
    segment_ids: torch.Tensor,
    num_sequences: int,
    weights: TokenWeights,
    *,
    ref_logps: torch.Tensor | None = None,
    log_sum_sq_probs: torch.Tensor | None = None,
    desirable: torch.Tensor | None = None,
) -> SequenceInputs:
    """The per-sequence sums of ``SequenceInputs`` from per-token values, in float64, differentiably.

    Args:
        token_logps: (N,) per-token log-probs (any value where no weight covers the token).
        segment_ids: (N,) int64; weights: ``token_weights(...)``; ref_logps: (num_sequences,) or None.
        log_sum_sq_probs: (N,) ``log sum_v p_v^2`` per token, needed when WPO is on.
        desirable: (num_sequences,) bool for unpaired objectives.
    """
    logps64 = token_logps.double()

    def segment_sum(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(num_sequences).index_add(0, segment_ids, values)

    def weighted_sum(weight: torch.Tensor) -> torch.Tensor:
        """``sum_t weight[t] * logp[t]`` per sequence; a token of weight 0 adds 0, whatever its log-prob."""
        return segment_sum(torch.where(weight != 0, logps64, 0.0) * weight)

    wpo = None
    if log_sum_sq_probs is not None:
        wpo = segment_sum(torch.where(weights.completion, logps64 - log_sum_sq_probs.double(), 0.0)).detach()
    return SequenceInputs(
        logps=weighted_sum(weights.logps),
        token_counts=_segment_count(weights.completion, segment_ids, num_sequences),
        ref_logps=None if ref_logps is None else ref_logps.double(),
        nll_logps=None if weights.nll is None else weighted_sum(weights.nll),
        wpo_logps=wpo,
        desirable=desirable,
    )


def token_grads(value: ObjectiveValue, segment_ids: torch.Tensor, weights: TokenWeights) -> torch.Tensor:
    """(N,) float64 ``dL/dlogp[t] = dL/dlogps[s(t)] * w[t] + dL/dnll_logps[s(t)] * m[t]``."""
    grads = value.grad_logps.index_select(0, segment_ids) * weights.logps
    if value.grad_nll_logps is not None:
        grads = grads + value.grad_nll_logps.index_select(0, segment_ids) * weights.nll
    return grads


class _FirstOrderLoss(torch.autograd.Function):
    """``loss`` as a function of ``logps`` and ``nll_logps`` whose gradients are ``grad_logps`` and ``grad_nll``.

    The value and the gradients are ``evaluate``'s closed forms, so the recompute path and the fused pass agree at
    every edge (a saturated sigmoid at ``-inf`` log-probs gives a gradient of exactly 0, never ``0 * inf``). First
    order only: a backward that records a graph (``create_graph=True``) raises, since the objective's curvature is
    not formed.
    """

    @staticmethod
    def forward(logps, nll_logps, loss, grad_logps, grad_nll):
        return loss.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        _logps, _nll_logps, _loss, grad_logps, grad_nll = inputs
        ctx.save_for_backward(grad_logps, grad_nll)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_logps, grad_nll = ctx.saved_tensors
        if torch.is_grad_enabled():  # grad mode is on in a backward exactly when it records a graph
            check_first_order(grad_logps.detach().requires_grad_())
        grad_nll_logps = None if grad_nll is None else grad_nll * grad_loss
        return grad_logps * grad_loss, grad_nll_logps, None, None, None


def check_first_order(*tensors: torch.Tensor | None) -> None:
    """Refuse a backward with ``create_graph=True``: dpo_fast's loss gradients are constants to autograd."""
    if torch.is_grad_enabled() and any(tensor is not None and tensor.requires_grad for tensor in tensors):
        raise RuntimeError(
            "dpo_fast's losses are differentiable once: a backward with create_graph=True (a gradient penalty, a "
            "Hessian-vector product, double backward) would silently drop their second-order terms. Per-token "
            "log-probs (token_logps, sequence_logps) on backend='reference' are differentiable to any order."
        )


def objective_loss(objective: Objective, seqs: SequenceInputs, batch: BatchConstants) -> torch.Tensor:
    """The batch loss, differentiable once w.r.t. ``seqs.logps`` and ``seqs.nll_logps`` (the recompute path's loss).

    Value and gradients are ``evaluate``'s, the same numbers the fused pass forms. Returned in ``seqs.logps``'s
    dtype.
    """
    value = objective.evaluate(seqs, batch)
    grad_nll = None if value.grad_nll_logps is None else value.grad_nll_logps.detach()
    loss = _FirstOrderLoss.apply(seqs.logps, seqs.nll_logps, value.loss.detach(), value.grad_logps.detach(), grad_nll)
    return loss.to(seqs.logps.dtype)


def reported_logps(objective: Objective, sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(S,) per-sequence log-probs in the objective's units: the sums, or their means where it ``averaged``
    (0 for a sequence without tokens)."""
    return sums / counts.clamp(min=1).to(sums.dtype) if objective.averaged else sums


def sums_of_reported(objective: Objective, values: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The inverse of ``reported_logps``: (S,) sums from log-probs in the objective's units."""
    return values * counts.clamp(min=1).to(values.dtype) if objective.averaged else values
