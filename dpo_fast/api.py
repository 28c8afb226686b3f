"""The public functions: validate, lay the tokens out flat, dispatch to a backend, apply the objective.

Layouts:

- padded: ``hidden (R, T, H)``, ``labels (R, T)``; row r is sequence r.
- packed (padding-free): ``hidden (N, H)``, ``labels (N,)``, ``segment_ids (N,)`` giving each token's
  sequence in ``[0, R)``.

For DPO, ``R = 2P``: sequences ``[0, P)`` are the chosen completions, ``[P, 2P)`` the rejected ones
(TRL's concatenated order). ``labels[..., t]`` is the target of ``hidden[..., t]`` (already shifted);
positions equal to ``ignore_index`` (prompt, padding) are never multiplied.
"""

from __future__ import annotations

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
    """What ``fused_linear_dpo_loss`` returns. Float32 tensors; P is the number of pairs.

    Attributes:
        loss: () the mean DPO loss over pairs; differentiable w.r.t. hidden, weight and bias.
        chosen_logps, rejected_logps: (P,) policy log-probs (length-averaged when ``average_log_prob``);
            differentiable.
        chosen_rewards, rejected_rewards: (P,) ``beta * (logps - ref_logps)``, detached.
        reward_accuracy: () fraction of pairs whose chosen reward beats the rejected one, detached.
        reward_margin: () mean of ``chosen_rewards - rejected_rewards``, detached.
        token_metrics: with ``return_token_metrics=True``, the policy's ``TokenMetrics`` (labels'
            shape) from the same pass as the log-probs; None otherwise.
    """

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_accuracy: torch.Tensor
    reward_margin: torch.Tensor
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
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
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
) -> DPOOutput:
    """The DPO loss straight from the last hidden states and the lm_head weight.

    Args:
        hidden: (2P, T, H), rows [0, P) chosen and [P, 2P) rejected; or (N, H) packed with
            ``segment_ids`` (N,) in [0, 2P).
        weight: (V, H) lm_head weight; labels: (2P, T) or (N,) int64, ``ignore_index`` off the completions.
        bias: optional (V,) lm_head bias.
        ref_chosen_logps, ref_rejected_logps: (P,) the reference model's log-probs, in the same
            units as the policy's (averaged too when ``average_log_prob``); treated as constants.
            Not needed with ``reference_free=True`` (reference log-probs 0).
        beta, loss_type (one of ``dpo_fast.LOSS_TYPES``), label_smoothing: the objective, as in TRL
            (see ``dpo_fast.objectives``).
        average_log_prob: length-average each sequence's log-prob; None means True for "ipo" only.
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
    Returns:
        ``DPOOutput``. Gradients come back in the inputs' dtypes; ``dL/dW`` accumulates in float32
        and is rounded to the weight's dtype once (``dpo_fast.chunking``).

    Bad input: a ``ValueError`` naming the argument, the value and what is expected. ``-inf`` logits
    (a masked vocabulary entry) take no probability and give the exact finite loss, metrics and
    gradients; ``+inf``/NaN logits give NaN. Under ``torch.compile`` the value checks cannot raise:
    an out-of-range label or segment id then gives a NaN loss (see ``dpo_fast.validate``).
    Gradients are first-order only: a backward with ``create_graph=True`` raises on the chunked
    backends (``backend="reference"`` differentiates twice).
    """
    validate.check_objective(beta, loss_type, label_smoothing)
    for flag, value, optional in (
        ("reference_free", reference_free, False), ("average_log_prob", average_log_prob, True),
        ("grads_in_forward", grads_in_forward, True), ("return_token_metrics", return_token_metrics, False),
    ):  # fmt: skip
        validate.check_flag(flag, value, optional=optional)
    weight, bias, head, name = _prepare_head(hidden, weight, labels, bias, softcap, 1.0, ignore_index, backend,
                                             scratch_mib)  # fmt: skip
    if segment_ids is None:
        if hidden.dim() != 3 or hidden.shape[0] % 2 or hidden.shape[0] == 0:
            raise ValueError(
                f"hidden must be (2P, T, H) with chosen rows first and P >= 1, got {tuple(hidden.shape)}; "
                "for packed input pass (N, H) with segment_ids"
            )
        if num_pairs is not None:
            raise ValueError(
                f"num_pairs is for packed input (with segment_ids); padded input has P = hidden.shape[0] // 2 = "
                f"{hidden.shape[0] // 2} pairs, got num_pairs={num_pairs!r}"
            )
        pairs = hidden.shape[0] // 2
    else:
        pairs = _packed_num_pairs(ref_chosen_logps, reference_free, num_pairs)
    validate.check_reference(ref_chosen_logps, ref_rejected_logps, reference_free, pairs, hidden.device)
    if average_log_prob is None:
        average_log_prob = objectives.default_average_log_prob(loss_type)

    flat_labels, seg, num_seq = _segments(hidden, labels, segment_ids, 2 * pairs, weight.shape[0])
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    acc = backends.accumulate_dtype(hidden.dtype)
    ref = None if reference_free else torch.cat([ref_chosen_logps, ref_rejected_logps]).detach().to(acc)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))

    if grads_in_forward is None:
        grads_in_forward = name != "reference"
    elif grads_in_forward and name == "reference":
        raise ValueError("grads_in_forward=True needs a chunked backend (torch, triton, cpp, cuda), not 'reference'")
    if grads_in_forward and wants_grad:
        loss, seq_logps, _normalizer, *metrics, _, _, _ = autograd.dpo_loss(autograd.DPOInputs(
            flat_hidden, weight, bias, flat_labels, seg, ref, pairs,
            chunking.Objective(float(beta), loss_type, float(label_smoothing), average_log_prob), int(ignore_index),
            head.softcap,
            chunking.GradsNeeded(hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad),
            return_token_metrics, name, chunking.scratch_bytes(hidden.device, scratch_mib),
        ))  # fmt: skip
    else:
        logp, metrics = _per_token(flat_hidden, weight, bias, flat_labels, head, ignore_index, return_token_metrics,
                                   name, scratch_mib)  # fmt: skip
        sums = _segment_sum(logp, seg, num_seq, padded=segment_ids is None)
        seq_logps = sums * chunking.sequence_scale(flat_labels, seg, num_seq, ignore_index, average_log_prob, acc)
        logratios = seq_logps if ref is None else seq_logps - ref
        loss = objectives.pair_losses(
            *logratios.chunk(2), beta=beta, loss_type=loss_type, label_smoothing=label_smoothing
        ).mean()
    token_metrics = None
    if return_token_metrics:
        token_metrics = TokenMetrics(*(metric.detach().view(labels.shape) for metric in metrics))
    return _dpo_output(loss, seq_logps, ref, beta, token_metrics)


class FusedLinearDPOLoss(torch.nn.Module):
    """``fused_linear_dpo_loss`` as a module holding the objective's options.

    ``forward(hidden, weight, labels, ref_chosen_logps=None, ref_rejected_logps=None, bias=None,
    segment_ids=None, num_pairs=None) -> DPOOutput``.
    """

    def __init__(
        self,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        reference_free: bool = False,
        average_log_prob: bool | None = None,
        softcap: float | None = None,
        ignore_index: int = -100,
        backend: str = "auto",
        scratch_mib: int | None = None,
        grads_in_forward: bool | None = None,
        return_token_metrics: bool = False,
    ):
        super().__init__()
        validate.check_objective(beta, loss_type, label_smoothing)
        validate.check_backend(backend)
        self.options = dict(
            beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, reference_free=reference_free,
            average_log_prob=average_log_prob, softcap=softcap, ignore_index=ignore_index, backend=backend,
            scratch_mib=scratch_mib, grads_in_forward=grads_in_forward, return_token_metrics=return_token_metrics,
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
    """(N, H) hidden and (N,) labels -> (N,) logp, and the (N,) metrics (entropy, mean_logit, is_top1) or None.

    The entropy is differentiable, the other two metrics are not.
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


def _packed_num_pairs(ref_chosen_logps, reference_free, num_pairs):
    if num_pairs is not None:
        if not isinstance(num_pairs, int) or isinstance(num_pairs, bool) or num_pairs < 1:
            raise ValueError(f"num_pairs must be a positive int, got {num_pairs!r}")
        return num_pairs
    if not reference_free and isinstance(ref_chosen_logps, torch.Tensor) and ref_chosen_logps.dim() == 1:
        return ref_chosen_logps.shape[0]
    raise ValueError(
        "with segment_ids and reference_free=True, pass num_pairs (P, with segment ids in [0, 2P)): "
        "it cannot be told from the segment ids when the last sequences have no tokens"
    )


def _dpo_output(loss, seq_logps, ref, beta, token_metrics):
    chosen_logps, rejected_logps = seq_logps.chunk(2)
    logratios = seq_logps.detach() if ref is None else seq_logps.detach() - ref
    chosen_rewards, rejected_rewards = (beta * logratios).chunk(2)
    return DPOOutput(
        loss=loss,
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        reward_accuracy=(chosen_rewards > rejected_rewards).float().mean(),
        reward_margin=(chosen_rewards - rejected_rewards).mean(),
        token_metrics=token_metrics,
    )
