"""The public functions: validate, lay the tokens out flat, dispatch to a backend, apply the objective.

Layouts:

- padded: ``hidden (R, T, H)``, ``labels (R, T)``; row r is sequence r.
- packed (padding-free): ``hidden (N, H)``, ``labels (N,)``, ``segment_ids (N,)`` giving each token's
  sequence in ``[0, R)``.

For the pairwise objectives (DPO, CPO/SimPO, ORPO), ``R = 2P``: sequences ``[0, P)`` are the chosen
completions, ``[P, 2P)`` the rejected ones (TRL's concatenated order); for KTO, ``R = B`` unpaired
completions. ``labels[..., t]`` is the target of ``hidden[..., t]`` (already shifted); positions equal to
``ignore_index`` (prompt, padding) are never multiplied.

Each loss entry builds its objective (``dpo_fast.objectives``: where the rules of its options live, so a
bad option is refused there), the per-token weights of the objective's sums, and runs the fused pass
(``autograd.preference_loss``: gradients formed in the forward pass) or, for ``grads_in_forward=False`` and
the reference backend, per-token log-probs and ``objectives.objective_loss``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import autograd, backends, chunking, objectives, validate
from .backends import HeadSpec, reference


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
class DPOOutput:
    """What the pairwise losses (``fused_linear_dpo_loss``, ``fused_linear_cpo_loss``, ``fused_linear_orpo_loss``)
    return. Float32 tensors (float64 for float64 inputs); P is the number of pairs.

    Attributes:
        loss: () the objective; differentiable w.r.t. hidden, weight and bias.
        chosen_logps, rejected_logps: (P,) policy log-probs: the objective's sums (LD-DPO-weighted with
            ``ld_alpha``), length-averaged when the objective averages (``average_log_prob``); differentiable.
        chosen_rewards, rejected_rewards: (P,) TRL's rewards, detached: ``beta * (logps - ref_logps)`` for DPO,
            ``beta * logps`` for CPO (AlphaPO: ``beta`` times its reward) and ORPO.
        reward_accuracy: () fraction of pairs whose chosen reward beats the rejected one, detached.
        reward_margin: () mean of ``chosen_rewards - rejected_rewards``, detached.
        token_metrics: with ``return_token_metrics=True``, the policy's ``TokenMetrics`` (labels'
            shape) from the same pass as the log-probs; None otherwise.
        nll_loss: () the NLL of the chosen tokens (TRL's ``nll_loss``: mean over those tokens, before any
            weight), detached; None for an objective without one.
    """

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_accuracy: torch.Tensor
    reward_margin: torch.Tensor
    token_metrics: TokenMetrics | None = None
    nll_loss: torch.Tensor | None = None


@dataclass
class KTOOutput:
    """What ``fused_linear_kto_loss`` returns. Float32 tensors (float64 for float64 inputs); B completions.

    Attributes:
        loss: () the KTO loss; differentiable w.r.t. hidden, weight and bias.
        logps: (B,) summed policy log-probs of the completions; differentiable.
        rewards: (B,) ``beta * (logps - ref_logps)``, detached (TRL logs their means over the desirable and
            the undesirable completions as ``rewards/chosen`` and ``rewards/rejected``).
        kl: () the KL estimate the loss used (0 for ``apo_zero_unpaired``), detached.
        token_metrics: as ``DPOOutput.token_metrics``.
    """

    loss: torch.Tensor
    logps: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    token_metrics: TokenMetrics | None = None


def token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    backend: str = "auto",
    scratch_mib: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs ``log softmax(z)[y]`` of an LM head, without the full logits in memory.

    ``z = softcap*tanh((h W^T + b)/softcap) / temperature`` (softcap optional).

    Args:
        hidden: (..., H) float32/bf16/fp16 (float64: reference, torch and cpp backends).
        weight: (V, H) the lm_head weight; cast to hidden's dtype if it differs.
        labels: (...) int64 targets, ``ignore_index`` where there is none.
        bias: optional (V,) lm_head bias.
        return_entropy: also return each token's entropy of ``softmax(z)``.
        backend: "auto" | "reference" | "torch" | "triton" | "cpp" | "cuda". ``auto`` takes, on CUDA,
            triton for 16-bit inputs and for float32 with TF32 allowed, the cuBLAS products (cuda once
            built, else torch) for exact float32; on CPU cpp once its extension is built; else torch
            (``dpo_fast.backends.resolve``).
        scratch_mib: memory budget of one chunk of tokens, in MiB (default by device: see
            ``dpo_fast.chunking.DEFAULT_SCRATCH_MIB``).
    Returns:
        logp with labels' shape, float32 (float64 for float64 inputs), 0 at ignored tokens; and with
        ``return_entropy`` the entropies, same shape. Both differentiable w.r.t. hidden, weight and
        bias for any upstream gradient. ``dL/dW`` accumulates in float32 and is rounded to the
        weight's dtype once (``dpo_fast.chunking``).
    """
    validate.check_flag("return_entropy", return_entropy)
    weight, bias, head, name = _prepare_head(
        hidden, weight, labels, bias, softcap, temperature, ignore_index, backend, scratch_mib
    )
    logp, metrics = _per_token(hidden, weight, bias, labels, head, ignore_index, return_entropy, name, scratch_mib)
    if return_entropy:
        return logp.view(labels.shape), metrics[0].view(labels.shape)
    return logp.view(labels.shape)


def sequence_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    average_log_prob: bool = False,
    softcap: float | None = None,
    temperature: float = 1.0,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
    backend: str = "auto",
    scratch_mib: int | None = None,
) -> torch.Tensor:
    """Summed (or length-averaged) completion log-probs per sequence, e.g. a reference model's.

    Args:
        hidden: (R, T, H) padded, or (N, H) packed with ``segment_ids``.
        weight: (V, H); labels: (R, T) or (N,) int64 with ``ignore_index`` off the completion.
        segment_ids: (N,) sequence of each token, packed layout only; ``num_segments`` defaults to
            ``segment_ids.max() + 1``.
        average_log_prob: divide each sum by its number of valid tokens (0 for a sequence with none).
        Other arguments as for ``token_logps``.
    Returns:
        (R,) float32 (float64 for float64 inputs), differentiable w.r.t. hidden, weight and bias.
    """
    validate.check_flag("average_log_prob", average_log_prob)
    weight, bias, head, name = _prepare_head(
        hidden, weight, labels, bias, softcap, temperature, ignore_index, backend, scratch_mib
    )
    if num_segments is not None:
        validate.check_num_segments(num_segments)
    flat_labels, seg, num_seq = _segments(hidden, labels, segment_ids, num_segments, weight.shape[0])
    logp, _ = _per_token(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, flat_labels, head, ignore_index, False, name, scratch_mib
    )
    sums = _segment_sum(logp, seg, num_seq, padded=segment_ids is None)
    return sums * chunking.sequence_scale(flat_labels, seg, num_seq, ignore_index, average_log_prob, sums.dtype)


def fused_linear_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    use_weighting: bool = False,
    ld_alpha: float | None = None,
    reference_free: bool = False,
    average_log_prob: bool | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    segment_ids: torch.Tensor | None = None,
    num_pairs: int | None = None,
    backend: str = "auto",
    scratch_mib: int | None = None,
    grads_in_forward: bool | None = None,
    return_token_metrics: bool = False,
    objective: objectives.DPOObjective | None = None,
) -> DPOOutput:
    """The DPO loss (every loss type of TRL 1.16's ``DPOTrainer``) straight from the last hidden states and the
    lm_head weight.

    Args:
        hidden: (2P, T, H), rows [0, P) chosen and [P, 2P) rejected; or (N, H) packed with
            ``segment_ids`` (N,) in [0, 2P).
        weight: (V, H) lm_head weight; labels: (2P, T) or (N,) int64, ``ignore_index`` off the completions.
        bias: optional (V,) lm_head bias.
        ref_chosen_logps, ref_rejected_logps: (P,) the reference model's log-probs, in the same
            units as the returned ones (length-averaged too when the objective averages, see
            ``average_log_prob``; LD-DPO-weighted with ``ld_alpha``); treated as constants.
            Not needed with ``reference_free=True`` (reference log-probs 0), nor for ``loss_type="sft"`` alone.
        beta: the temperature of every loss type.
        loss_type: one of ``dpo_fast.LOSS_TYPES`` (TRL 1.16's DPO loss types), or several, summed with
            ``loss_weights`` (default 1 each). ``"sft"`` is the mean NLL of the chosen completion tokens.
            ``aot`` and ``aot_unpaired`` sort across the batch: their gradients are formed once every pair's
            log-probs are known (one group of every pair: the logits of the pairs past the memory budget
            are recomputed).
        label_smoothing: cDPO's flip rate for ``sigmoid`` and ``sigmoid_norm`` (in [0, 0.5]; TRL's sigmoid has
            none), ``robust``'s, EXO's epsilon for ``exo_pair``, and ``aot``'s.
        f_divergence_type, f_alpha_divergence_coef: f-DPO (``"reverse_kl"``, ``"forward_kl"``,
            ``"js_divergence"``, ``"alpha_divergence"``), as TRL 1.16.
        discopop_tau: DiscoPOP's temperature.
        use_weighting: WPO: each pair's loss times ``exp(mean_t(logp - log sum_v p_v^2))`` of its chosen and
            of its rejected completion (detached), from the same pass.
        ld_alpha: LD-DPO: the completion tokens past the shorter completion of a pair count ``ld_alpha`` in
            its log-probs (the reference's must be weighted alike).
        average_log_prob: length-average each sequence's log-ratio in every loss type; None means per loss
            type, True for "ipo" and "sigmoid_norm" only (TRL's). The returned and the reference log-probs
            are averaged when every pairwise loss type is.
        softcap: ``final_logit_softcapping`` of the model, or None.
        num_pairs: P for the packed layout when there are no reference log-probs to tell it.
        backend, scratch_mib: as for ``token_logps``.
        grads_in_forward: when gradients are needed, form them during this call, for groups of
            whole pairs, keeping each group's logits between its log-prob and gradient passes
            (``6*N*H*V`` FLOPs; ``backward`` only scales them by ``grad_output``). False: the
            recompute path (``8*N*H*V``: log-probs now, logits recomputed in ``backward``).
            None (default): True for the chunked backends.
        return_token_metrics: also return the policy's per-token entropy, mean logit and top-1 flag
            (``DPOOutput.token_metrics``), formed in the row pass that forms the log-probs: no extra
            product, no second pass over the vocabulary.
        objective: a ``dpo_fast.objectives.DPOObjective`` in place of the objective's keywords (``beta`` through
            ``average_log_prob``, which must then keep their defaults), e.g. ``objectives.trl_dpo_objective(...)``:
            TRL's reading of ``label_smoothing`` (none for ``sigmoid``), which one ``label_smoothing`` for every
            loss type cannot say when ``sigmoid`` is combined with ``robust``, ``exo_pair`` or ``aot``.
    Returns:
        ``DPOOutput``. Gradients come back in the inputs' dtypes; ``dL/dW`` accumulates in float32
        and is rounded to the weight's dtype once (``dpo_fast.chunking``).

    Bad input: a ``ValueError`` naming the argument, the value and what is expected. ``-inf`` logits
    (a masked vocabulary entry) take no probability and give the exact finite loss, metrics and
    gradients; ``+inf``/NaN logits give NaN. Under ``torch.compile`` the value checks cannot raise:
    an out-of-range label or segment id then gives a NaN loss (see ``dpo_fast.validate``).
    Gradients are first-order only: a backward with ``create_graph=True`` raises on the chunked
    backends.
    """
    options = dict(
        beta=beta, loss_type=loss_type, loss_weights=loss_weights, label_smoothing=label_smoothing,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        discopop_tau=discopop_tau, use_weighting=use_weighting, ld_alpha=ld_alpha, average_log_prob=average_log_prob,
    )  # fmt: skip
    if objective is None:
        objective = objectives.dpo_objective(**options)
    else:
        _check_objective_alone(objective, options)
    validate.check_flag("reference_free", reference_free)
    pairs = _num_pairs(hidden, segment_ids, num_pairs, None if reference_free else ref_chosen_logps)
    ref = None
    if objective.needs.reference and not reference_free:
        validate.check_reference(ref_chosen_logps, ref_rejected_logps, pairs, hidden.device)
        ref = torch.cat([ref_chosen_logps, ref_rejected_logps])
    result = _preference_loss(
        objective, pairs, hidden, weight, labels, bias=bias, ref_logps=ref, softcap=softcap,
        ignore_index=ignore_index, segment_ids=segment_ids, backend=backend, scratch_mib=scratch_mib,
        grads_in_forward=grads_in_forward, return_token_metrics=return_token_metrics,
    )  # fmt: skip
    logps = result.reported_logps(objective)
    rewards = objective.beta * (logps.detach() if ref is None else logps.detach() - ref.to(logps))
    return _pair_output(result, logps, rewards)


def _check_objective_alone(objective: object, options: dict) -> None:
    """``fused_linear_dpo_loss(objective=...)`` takes none of the keywords the objective replaces."""
    if not isinstance(objective, objectives.DPOObjective):
        raise ValueError(f"objective must be a dpo_fast.objectives.DPOObjective or None, got {objective!r}")
    defaults = inspect.signature(fused_linear_dpo_loss).parameters
    given = [name for name, value in options.items() if value != defaults[name].default]
    if given:
        raise ValueError(
            f"objective= replaces the objective's keywords; got also {given}: set them in the DPOObjective instead"
        )


def fused_linear_cpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    nll_weight: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    average_log_prob: bool | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    segment_ids: torch.Tensor | None = None,
    num_pairs: int | None = None,
    backend: str = "auto",
    scratch_mib: int | None = None,
    grads_in_forward: bool | None = None,
    return_token_metrics: bool = False,
) -> DPOOutput:
    """CPO, SimPO and AlphaPO (TRL 1.16's ``CPOTrainer``; Liger's ``LigerFusedLinearCPOLoss`` and
    ``LigerFusedLinearSimPOLoss``): reference-free, on the policy's log-probs, plus the NLL of the chosen
    completion tokens, all from one pass (``6*N*H*V``).

    ``loss = mean_pairs(term(rho(lp_c) - rho(lp_r))) + nll_weight * NLL``, with ``lp`` summed (length-averaged
    for ``ipo`` and ``simpo``), ``rho`` the identity (AlphaPO: ``(1 - exp(-alpha*lp)) / alpha``) and ``term``
    TRL's ``sigmoid`` (with ``label_smoothing``), ``hinge``, ``ipo``, or ``simpo`` (sigmoid of
    ``beta * margin - simpo_gamma``); see ``dpo_fast.objectives.CPOObjective``.

    Args:
        hidden, weight, labels, bias, softcap, ignore_index, segment_ids, backend, scratch_mib,
            grads_in_forward, return_token_metrics: as for ``fused_linear_dpo_loss``.
        loss_type: one of ``dpo_fast.CPO_LOSS_TYPES``.
        nll_weight: the NLL's weight (TRL's ``cpo_alpha``, Liger's ``alpha``; SimPO's paper uses 0).
        simpo_gamma: SimPO's target margin; alpha: AlphaPO's reward shape (0: log-prob rewards).
        average_log_prob: None: True for ``ipo`` and ``simpo`` (TRL's); the returned log-probs are in the
            objective's units.
        num_pairs: P for the packed layout (required there: there are no reference log-probs to tell it).
    Returns:
        ``DPOOutput`` with ``nll_loss`` (None when ``nll_weight == 0``).
    """
    objective = objectives.CPOObjective(
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, nll_weight=nll_weight,
        simpo_gamma=simpo_gamma, alpha=alpha, average_log_prob=average_log_prob,
    )  # fmt: skip
    result = _preference_loss(
        objective, _num_pairs(hidden, segment_ids, num_pairs, None), hidden, weight, labels, bias=bias,
        softcap=softcap, ignore_index=ignore_index, segment_ids=segment_ids, backend=backend,
        scratch_mib=scratch_mib, grads_in_forward=grads_in_forward, return_token_metrics=return_token_metrics,
    )  # fmt: skip
    logps = result.reported_logps(objective)
    return _pair_output(result, logps, objective.rewards(logps))


def fused_linear_orpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    beta: float = 0.1,
    nll_labels: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    segment_ids: torch.Tensor | None = None,
    num_pairs: int | None = None,
    backend: str = "auto",
    scratch_mib: int | None = None,
    grads_in_forward: bool | None = None,
    return_token_metrics: bool = False,
) -> DPOOutput:
    """ORPO (TRL 1.16's ``ORPOTrainer``; Liger's ``LigerFusedLinearORPOLoss``): the NLL of the chosen tokens minus
    ``beta`` times the mean ``logsigmoid`` of the log odds ratio of the length-averaged log-probs, from one pass.

    Args:
        hidden, weight, labels, bias, softcap, ignore_index, segment_ids, backend, scratch_mib,
            grads_in_forward, return_token_metrics: as for ``fused_linear_dpo_loss``.
        beta: the odds-ratio term's weight (the paper's lambda).
        nll_labels: labels' shape, the targets of the NLL term (Liger's ``nll_target``); only the chosen rows
            are read. Default: ``labels`` (the chosen completions, Liger's default). TRL's ORPO takes the
            chosen prompt tokens too: pass the shifted input ids with only the padding masked. Where both
            hold a target it must be the same.
        num_pairs: P for the packed layout (required there).
    Returns:
        ``DPOOutput`` (length-averaged log-probs, rewards ``beta * logps``, ``nll_loss``). The token metrics
        cover every token of the pass, the NLL's too. Every completion needs a token: an empty one raises a
        ``ValueError`` (under ``torch.compile``, where it cannot, the loss is NaN).
    """
    objective = objectives.ORPOObjective(beta=beta)
    result = _preference_loss(
        objective, _num_pairs(hidden, segment_ids, num_pairs, None), hidden, weight, labels, bias=bias,
        nll_labels=nll_labels, softcap=softcap, ignore_index=ignore_index, segment_ids=segment_ids,
        backend=backend, scratch_mib=scratch_mib, grads_in_forward=grads_in_forward,
        return_token_metrics=return_token_metrics,
    )  # fmt: skip
    if not torch.compiler.is_compiling() and bool((result.counts == 0).any()):
        empty = int((result.counts == 0).nonzero()[0])
        raise ValueError(
            f"labels: sequence {empty} has no completion token; ORPO's odds of an empty completion (average log-prob "
            "0, probability 1) are infinite and its loss undefined. Give every completion a token"
        )
    logps = result.reported_logps(objective)
    return _pair_output(result, logps, objective.beta * logps.detach())


def fused_linear_kto_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    desirable: torch.Tensor,
    ref_logps: torch.Tensor | None = None,
    kl: torch.Tensor | float | None = None,
    bias: torch.Tensor | None = None,
    beta: float = 0.1,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    reference_free: bool = False,
    softcap: float | None = None,
    ignore_index: int = -100,
    segment_ids: torch.Tensor | None = None,
    backend: str = "auto",
    scratch_mib: int | None = None,
    grads_in_forward: bool | None = None,
    return_token_metrics: bool = False,
) -> KTOOutput:
    """KTO (TRL 1.16's ``KTOTrainer``; Liger's ``LigerFusedLinearKTOLoss``) on B unpaired completions, from one pass.

    With ``x = logps - ref_logps`` (summed log-probs): a desirable completion's loss is
    ``1 - sigmoid(beta * (x - kl))``, an undesirable one's ``1 - sigmoid(beta * (kl - x))``
    (``apo_zero_unpaired``: ``kl = 0``), times ``desirable_weight`` or ``undesirable_weight``, averaged over B.

    Args:
        hidden: (B, T, H), or (N, H) packed with ``segment_ids`` (N,) in [0, B).
        weight, labels, bias, softcap, ignore_index, backend, scratch_mib, grads_in_forward,
            return_token_metrics: as for ``fused_linear_dpo_loss``.
        desirable: (B,) bool, True for a desirable completion (TRL's ``label``).
        ref_logps: (B,) summed reference log-probs; not needed with ``reference_free=True``.
        kl: the batch's KL estimate, a number or a () tensor, treated as a constant: TRL's is
            ``dpo_fast.objectives.kto_kl_estimate`` of the policy's and the reference's summed log-probs of
            mismatched (prompt, completion) pairs, averaged across processes. Required for ``loss_type="kto"``
            (pass 0.0 for KTO without it, as Liger does when given none); unused by ``apo_zero_unpaired``.
        loss_type: one of ``dpo_fast.KTO_LOSS_TYPES``.
    Returns:
        ``KTOOutput``.
    """
    objective = objectives.KTOObjective(
        beta=beta, loss_type=loss_type, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight
    )
    validate.check_flag("reference_free", reference_free)
    size = _num_sequences(hidden, segment_ids, desirable)
    validate.check_desirable(desirable, size, hidden.device)
    if objective.needs.kl:
        if kl is None:
            raise ValueError(
                "kl is required for loss_type='kto': the batch's KL estimate (dpo_fast.objectives.kto_kl_estimate of "
                "the policy's and the reference's log-probs of mismatched pairs), or 0.0 for KTO without it"
            )
        validate.check_kl(kl, hidden.device)
    ref = None
    if not reference_free:
        if ref_logps is None:
            raise ValueError(
                "ref_logps is required (the reference model's summed log-probs of the completions, e.g. from "
                "dpo_fast.sequence_logps under torch.no_grad()); pass reference_free=True to train without them"
            )
        validate.check_sequence_values("ref_logps", ref_logps, size, hidden.device)
        ref = ref_logps
    result = _preference_loss(
        objective, size, hidden, weight, labels, bias=bias, ref_logps=ref, desirable=desirable,
        kl=kl if objective.needs.kl else 0.0, softcap=softcap, ignore_index=ignore_index, segment_ids=segment_ids,
        backend=backend, scratch_mib=scratch_mib, grads_in_forward=grads_in_forward,
        return_token_metrics=return_token_metrics,
    )  # fmt: skip
    logps = result.logps
    rewards = beta * (logps.detach() if ref is None else logps.detach() - ref.to(logps))
    return KTOOutput(
        loss=result.loss, logps=logps, rewards=rewards, kl=result.kl.to(logps.dtype),
        token_metrics=result.token_metrics,
    )  # fmt: skip


class FusedLinearDPOLoss(torch.nn.Module):
    """``fused_linear_dpo_loss`` as a module holding the objective's options.

    ``forward(hidden, weight, labels, ref_chosen_logps=None, ref_rejected_logps=None, bias=None,
    segment_ids=None, num_pairs=None) -> DPOOutput``.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str | Sequence[str] = "sigmoid",
        label_smoothing: float = 0.0,
        reference_free: bool = False,
        average_log_prob: bool | None = None,
        softcap: float | None = None,
        ignore_index: int = -100,
        backend: str = "auto",
        scratch_mib: int | None = None,
        grads_in_forward: bool | None = None,
        return_token_metrics: bool = False,
        **objective_options,
    ):
        super().__init__()
        objectives.dpo_objective(
            loss_type, beta=beta, label_smoothing=label_smoothing, average_log_prob=average_log_prob,
            **objective_options,
        )  # fmt: skip
        validate.check_backend(backend)
        self.options = dict(
            beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, reference_free=reference_free,
            average_log_prob=average_log_prob, softcap=softcap, ignore_index=ignore_index, backend=backend,
            scratch_mib=scratch_mib, grads_in_forward=grads_in_forward, return_token_metrics=return_token_metrics,
            **objective_options,
        )  # fmt: skip

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        ref_chosen_logps: torch.Tensor | None = None,
        ref_rejected_logps: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        num_pairs: int | None = None,
    ) -> DPOOutput:
        return fused_linear_dpo_loss(
            hidden, weight, labels, bias=bias, ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps, segment_ids=segment_ids, num_pairs=num_pairs, **self.options,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())


# ----------------------------------------------------------------------------------------------
# The shared pass of the loss entries


@dataclass
class _PreferenceResult:
    """The fused pass's results, S sequences: loss (), logps (S,) the objective's sums (differentiable),
    nll_logps (S,) or None, counts (S,) completion tokens, nll_tokens () and kl () as the objective saw them."""

    loss: torch.Tensor
    logps: torch.Tensor
    nll_logps: torch.Tensor | None
    counts: torch.Tensor
    nll_tokens: torch.Tensor
    kl: torch.Tensor
    token_metrics: TokenMetrics | None

    def reported_logps(self, objective: objectives.Objective) -> torch.Tensor:
        """(S,) the log-probs in the objective's units: averaged over the completion tokens where it averages."""
        return self.logps / self.counts.clamp(min=1) if objective.averaged else self.logps

    def nll_loss(self) -> torch.Tensor | None:
        """() the NLL of the chosen tokens, mean over them, detached; None without an NLL term."""
        if self.nll_logps is None:
            return None
        chosen = self.nll_logps.detach().chunk(2)[0]
        return -chosen.sum() / self.nll_tokens.clamp(min=1).to(chosen.dtype)


def _preference_loss(
    objective: objectives.Objective,
    num_units: int,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None,
    ref_logps: torch.Tensor | None = None,
    desirable: torch.Tensor | None = None,
    kl: torch.Tensor | float = 0.0,
    nll_labels: torch.Tensor | None = None,
    softcap: float | None,
    ignore_index: int,
    segment_ids: torch.Tensor | None,
    backend: str,
    scratch_mib: int | None,
    grads_in_forward: bool | None,
    return_token_metrics: bool,
) -> _PreferenceResult:
    """Validate the head and layout, build the objective's token weights, run the fused pass or the recompute path.

    ref_logps: (S,) in the units of the returned log-probs (averaged where the objective averages; converted
    here to the sums the objective takes), or None.
    """
    validate.check_flag("grads_in_forward", grads_in_forward, optional=True)
    validate.check_flag("return_token_metrics", return_token_metrics)
    weight, bias, head, name = _prepare_head(hidden, weight, labels, bias, softcap, 1.0, ignore_index, backend,
                                             scratch_mib)  # fmt: skip
    num_seq = 2 * num_units if objective.paired else num_units
    flat_labels, seg, _ = _segments(hidden, labels, segment_ids, num_seq, weight.shape[0])
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    acc = backends.accumulate_dtype(hidden.dtype)
    completion = flat_labels != ignore_index
    nll_tokens, targets = None, flat_labels
    if nll_labels is not None:
        validate.check_nll_labels(nll_labels, labels, weight.shape[0], ignore_index)
        flat_nll = nll_labels.reshape(-1).long()
        nll_tokens = (flat_nll != ignore_index) & (seg < num_units)
        targets = torch.where(completion, flat_labels, torch.where(nll_tokens, flat_nll, ignore_index))
    weights = objectives.token_weights(objective, completion, seg, num_seq, nll_tokens)
    counts = hidden.new_zeros(num_seq, dtype=torch.float64).index_add_(0, seg, completion.to(torch.float64))
    nll_count = hidden.new_zeros((), dtype=torch.float64) if weights.nll is None else weights.nll.sum()
    kl = torch.as_tensor(kl, dtype=torch.float64, device=hidden.device).detach().reshape(())
    ref = None
    if ref_logps is not None:
        ref = ref_logps.detach().double()
        if objective.averaged:
            ref = ref * counts.clamp(min=1)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if grads_in_forward is None:
        grads_in_forward = name != "reference"
    elif grads_in_forward and name == "reference":
        raise ValueError("grads_in_forward=True needs a chunked backend (torch, triton, cpp, cuda), not 'reference'")

    if grads_in_forward and wants_grad:
        loss, logps, nll_logps, _normalizer, *metrics, _, _, _ = autograd.preference_loss(autograd.PreferenceInputs(
            flat_hidden, weight, bias, targets, seg, weights, ref, desirable, nll_count, kl, num_units,
            objectives.encode_objective(objective), int(ignore_index), head.softcap,
            chunking.GradsNeeded(hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad),
            return_token_metrics, name, chunking.scratch_bytes(hidden.device, scratch_mib),
        ))  # fmt: skip
        nll_logps = None if weights.nll is None else nll_logps
    else:
        wpo = objective.needs.wpo
        logp, metrics = _per_token(flat_hidden, weight, bias, targets, head, ignore_index,
                                   return_token_metrics or wpo, name, scratch_mib)  # fmt: skip
        seqs = objectives.sequence_inputs(logp, seg, num_seq, weights, ref_logps=ref,
                                          log_sum_sq_probs=metrics[3] if wpo else None, desirable=desirable)  # fmt: skip
        batch = objectives.BatchConstants(num_units=num_units, nll_tokens=nll_count, kl=kl)
        loss = objectives.objective_loss(objective, seqs, batch).to(acc)
        logps = seqs.logps.to(acc)
        nll_logps = None if seqs.nll_logps is None else seqs.nll_logps.to(acc)
    token_metrics = None
    if return_token_metrics:
        token_metrics = TokenMetrics(*(metric.detach().view(labels.shape) for metric in metrics[:3]))
    return _PreferenceResult(loss, logps, nll_logps, counts.to(acc), nll_count, kl, token_metrics)


def _pair_output(result: _PreferenceResult, logps: torch.Tensor, rewards: torch.Tensor) -> DPOOutput:
    """``DPOOutput`` from (2P,) reported log-probs and (2P,) detached rewards, chosen first."""
    chosen_logps, rejected_logps = logps.chunk(2)
    chosen_rewards, rejected_rewards = rewards.chunk(2)
    return DPOOutput(
        loss=result.loss,
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        reward_accuracy=(chosen_rewards > rejected_rewards).float().mean(),
        reward_margin=(chosen_rewards - rejected_rewards).mean(),
        token_metrics=result.token_metrics,
        nll_loss=result.nll_loss(),
    )


def _num_pairs(hidden: torch.Tensor, segment_ids: torch.Tensor | None, num_pairs: int | None,
               ref_chosen_logps: torch.Tensor | None) -> int:  # fmt: skip
    """P of a pairwise entry: the padded rows' half, or for packed input ``num_pairs`` or the reference's length."""
    if segment_ids is None:
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[0] % 2 or hidden.shape[0] == 0:
            raise ValueError(
                f"hidden must be (2P, T, H) with chosen rows first and P >= 1, got "
                f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else hidden!r}; for packed input pass "
                "(N, H) with segment_ids"
            )
        if num_pairs is not None:
            raise ValueError(
                f"num_pairs is for packed input (with segment_ids); padded input has P = hidden.shape[0] // 2 = "
                f"{hidden.shape[0] // 2} pairs, got num_pairs={num_pairs!r}"
            )
        return hidden.shape[0] // 2
    if num_pairs is not None:
        if not isinstance(num_pairs, int) or isinstance(num_pairs, bool) or num_pairs < 1:
            raise ValueError(f"num_pairs must be a positive int, got {num_pairs!r}")
        return num_pairs
    if isinstance(ref_chosen_logps, torch.Tensor) and ref_chosen_logps.dim() == 1:
        return ref_chosen_logps.shape[0]
    raise ValueError(
        "with segment_ids and no reference log-probs (reference_free=True, or a reference-free objective), pass "
        "num_pairs (P, with segment ids in [0, 2P)): it cannot be told from the segment ids when the last "
        "sequences have no tokens"
    )


def _num_sequences(hidden: torch.Tensor, segment_ids: torch.Tensor | None, desirable: object) -> int:
    """B of KTO: the padded rows, or for packed input the length of ``desirable``."""
    if segment_ids is None and isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
        return hidden.shape[0]
    if isinstance(desirable, torch.Tensor) and desirable.dim() == 1:
        return desirable.shape[0]
    raise ValueError(f"desirable must be a (B,) bool tensor, True for a desirable completion, got {desirable!r}")


# ----------------------------------------------------------------------------------------------


def _prepare_head(hidden, weight, labels, bias, softcap, temperature, ignore_index, backend, scratch_mib):
    """Validate; weight and bias cast to hidden's dtype (differentiably), the ``HeadSpec``, the resolved backend."""
    validate.check_backend(backend)
    validate.check_head(hidden, weight, labels, bias, softcap, temperature, ignore_index)
    validate.check_scratch_mib(scratch_mib)
    validate.check_label_values(labels, weight.shape[0], ignore_index)
    name = backends.resolve(backend, hidden.device, hidden.dtype)
    weight = weight.to(hidden.dtype)
    bias = None if bias is None else bias.to(hidden.dtype)
    head = HeadSpec(None if softcap is None else float(softcap), float(temperature))
    return weight, bias, head, name


def _per_token(hidden, weight, bias, labels, head, ignore_index, with_metrics, name, scratch_mib):
    """(N, H) hidden and (N,) labels -> (N,) logp, and the (N,) metrics (entropy, mean_logit, is_top1,
    log_sum_sq_probs) or None.

    The entropy is differentiable, the other metrics are not.
    """
    labels = labels.reshape(-1).long()
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if name == "reference":
        return reference.token_logps(hidden, weight, labels, bias, head, ignore_index, with_metrics)
    logp, *metrics, _normalizer = autograd.token_logps(autograd.TokenInputs(
        hidden, weight, bias, labels, int(ignore_index), head, with_metrics, name,
        chunking.scratch_bytes(hidden.device, scratch_mib),
    ))  # fmt: skip
    return logp, (tuple(metrics) if with_metrics else None)


def _segments(hidden, labels, segment_ids, num_segments, vocab):
    """Flat labels (N,), segment id per token (N,) int64, and the number of segments R."""
    if segment_ids is None:
        if hidden.dim() != 3:
            raise ValueError(
                f"hidden must be (R, T, H) for padded input, got {tuple(hidden.shape)}; "
                "for packed (N, H) input pass segment_ids"
            )
        rows, length = labels.shape
        seg = torch.arange(rows, device=labels.device).repeat_interleave(length)
        return labels.reshape(-1).long(), seg, rows
    if hidden.dim() != 2:
        raise ValueError(f"with segment_ids, hidden must be packed as (N, H), got {tuple(hidden.shape)}")
    validate.check_segment_ids(segment_ids, labels.shape[0], hidden.device)
    if num_segments is None:
        if torch.compiler.is_compiling():
            raise ValueError("under torch.compile, pass num_segments with segment_ids (it cannot be read from them)")
        num_segments = int(segment_ids.max()) + 1 if segment_ids.numel() else 0
    labels, segment_ids = validate.segment_values(labels.long(), segment_ids.long(), num_segments, vocab)
    return labels, segment_ids, num_segments


def _segment_sum(values, seg, num_segments, padded):
    """(N,) per-token values -> (R,) per-sequence sums, accumulated in float64 (R numbers: free)."""
    values64 = values.double()
    if padded:
        return values64.view(num_segments, -1).sum(1).to(values.dtype)
    return values64.new_zeros(num_segments).index_add(0, seg, values64).to(values.dtype)
