"""The custom ops of the chunked backends and their autograd: what ``dpo_fast.core`` calls.

Each op is a ``torch.library.custom_op`` with its schema written out and a fake (meta) function, so a
``torch.compile``d model calls dpo_fast without a graph break and ``torch.library.opcheck`` can test it:

- ``dpo_fast::token_logps_forward`` / ``dpo_fast::token_logps_backward``: per-token log-probs and the token
  metrics (entropy, mean logit, top-1, ``log sum_v p_v^2``), differentiable for any per-token upstream gradient
  of the log-probs and entropies; the backward recomputes each chunk's logits from the saved normalizer.
- ``dpo_fast::preference_loss_forward``: a preference objective's loss (``dpo_fast.objectives``, passed as
  ``objectives.encode_objective``'s string), its per-sequence sums and the token metrics, with the gradients
  formed in the forward pass; its backward scales them by ``grad_output`` (and recomputes only for a gradient
  that reaches the returned sums by another path, such as a loss added on the log-probs).

Under ``torch.no_grad()``, or when no input requires grad, the ops run forward only and save nothing; a frozen
``weight`` costs no ``dL/dW`` work. The gradients are first-order only: a backward with ``create_graph=True``
raises (``objectives.check_first_order``) rather than silently dropping the second-order terms.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.utils._python_dispatch
from torch import Tensor

from . import backends, chunking, objectives
from .backends import HeadSpec, accumulate_dtype
from .chunking import GradsNeeded
from .head import autocast_off
from .objectives import TokenWeights
from .vocab_parallel import VocabShard

_EMPTY = (0,)
_METRICS = "Tensor entropy, Tensor mean_logit, Tensor is_top1, Tensor log_sum_sq_probs"
_HEAD = "SymInt ignore_index, float? softcap, float temperature"
_RUN = "str backend, SymInt scratch_bytes"
# a vocabulary-parallel head (``vocab_parallel``): the tensor-parallel group's name and V; None and 0 otherwise
_SHARD = "str? vocab_group=None, SymInt vocab_size=0"
_NEEDS = "bool need_hidden, bool need_weight, bool need_bias"


class TokenPass(NamedTuple):
    """``token_logps_forward``'s outputs over N tokens, in the accumulate dtype (``is_top1`` bool), 0 at ignored
    tokens; the four metrics are (0,) unless asked for. ``normalizer`` (2, N): each token's max logit and
    ``log sum exp(z - max)`` (``backends.ChunkStats``)."""

    logp: Tensor
    entropy: Tensor
    mean_logit: Tensor
    is_top1: Tensor
    log_sum_sq_probs: Tensor
    normalizer: Tensor


class PreferencePass(NamedTuple):
    """``preference_loss_forward``'s outputs over N tokens in S sequences: ``loss`` (), ``logps`` (S,) the
    objective's sums ``sum_t w[t] logp[t]``, ``nll_logps`` (S,) or (0,) without an NLL term, the normalizer and
    the metrics as ``TokenPass``'s; ``loss``, ``logps`` and ``nll_logps`` differentiable."""

    loss: Tensor
    logps: Tensor
    nll_logps: Tensor
    normalizer: Tensor
    entropy: Tensor
    mean_logit: Tensor
    is_top1: Tensor
    log_sum_sq_probs: Tensor


def _holds_values(tensor: Tensor) -> bool:
    """Whether ``tensor``'s value can be read here: not while torch.compile, export or make_fx trace it.

    ``torch.compiler.is_compiling()`` alone does not tell: AOTAutograd traces a custom op's backward
    with FunctionalTensors over FakeTensors under its dispatch modes, and on torch 2.11 with that
    flag unset (reading the value then fails with ``GuardOnDataDependentSymNode``).
    """
    return (
        not torch.compiler.is_compiling()
        and type(tensor) is Tensor
        and not torch.utils._python_dispatch.is_in_torch_dispatch_mode()
    )


def _fake_metrics(hidden: Tensor, num_tokens: int, with_metrics: bool) -> tuple[Tensor, ...]:
    size, acc = (num_tokens if with_metrics else 0), accumulate_dtype(hidden.dtype)
    return (
        hidden.new_empty(size, dtype=acc),
        hidden.new_empty(size, dtype=acc),
        hidden.new_empty(size, dtype=torch.bool),
        hidden.new_empty(size, dtype=acc),
    )


def _fake_grads(hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: GradsNeeded) -> tuple[Tensor, ...]:
    return (
        torch.empty_like(hidden) if needs.hidden else hidden.new_empty(_EMPTY),
        torch.empty_like(weight) if needs.weight else hidden.new_empty(_EMPTY),
        torch.empty_like(bias) if needs.bias else hidden.new_empty(_EMPTY),
    )


def _shard(vocab_group: str | None, vocab_size: int) -> VocabShard | None:
    """This rank's ``VocabShard`` of the ops' ``vocab_group`` and ``vocab_size`` arguments, or None."""
    return None if vocab_group is None else VocabShard.from_group_name(vocab_group, vocab_size)


def _shard_args(shard: VocabShard | None) -> tuple[str | None, int]:
    """A ``VocabShard`` (or None) as the ops' ``vocab_group`` and ``vocab_size`` arguments."""
    return (None, 0) if shard is None else (shard.group_name, shard.vocab)


def _or_empty(hidden: Tensor, grads: tuple[Tensor | None, ...]) -> tuple[Tensor, ...]:
    return tuple(hidden.new_empty(_EMPTY) if grad is None else grad for grad in grads)


# ----------------------------------------------------------------------------------------------
# Per-token log-probs


@torch.library.custom_op(
    "dpo_fast::token_logps_forward", mutates_args=(),
    schema=f"(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, {_HEAD}, bool with_metrics, {_RUN}, "
    f"{_SHARD}) -> (Tensor logp, {_METRICS}, Tensor normalizer)",
)  # fmt: skip
def token_logps_forward(hidden, weight, bias, labels, ignore_index, softcap, temperature, with_metrics, backend,
                        scratch_bytes, vocab_group=None, vocab_size=0) -> tuple[Tensor, ...]:  # fmt: skip
    """hidden (N, H), weight (V, H), bias (V,)?, labels (N,) int64 -> ``TokenPass``'s fields. With ``vocab_group``
    (a vocabulary-parallel head of ``vocab_size`` rows), weight and bias are this rank's rows."""
    with autocast_off(hidden):
        logp, normalizer, metrics = chunking.token_forward(
            backends.get(backend), hidden, weight, bias, labels, HeadSpec(softcap, temperature), ignore_index,
            with_metrics, scratch_bytes, _shard(vocab_group, vocab_size),
        )  # fmt: skip
    return (logp, *metrics, normalizer)


@token_logps_forward.register_fake
def _(hidden, weight, bias, labels, ignore_index, softcap, temperature, with_metrics, backend, scratch_bytes,
      vocab_group=None, vocab_size=0):  # fmt: skip
    num_tokens, acc = labels.shape[0], accumulate_dtype(hidden.dtype)
    return (
        hidden.new_empty(num_tokens, dtype=acc),
        *_fake_metrics(hidden, num_tokens, with_metrics),
        hidden.new_empty((2, num_tokens), dtype=acc),
    )


@torch.library.custom_op(
    "dpo_fast::token_logps_backward", mutates_args=(),
    schema=f"(Tensor grad_logp, Tensor? grad_entropy, Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, "
    f"Tensor normalizer, Tensor? entropy, {_HEAD}, {_NEEDS}, {_RUN}, {_SHARD}) "
    "-> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)",
)  # fmt: skip
def token_logps_backward(grad_logp, grad_entropy, hidden, weight, bias, labels, normalizer, entropy, ignore_index,
                         softcap, temperature, need_hidden, need_weight, need_bias, backend, scratch_bytes,
                         vocab_group=None, vocab_size=0) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The gradients of ``sum(grad_logp * logp + grad_entropy * entropy)``: dL/dhidden (N, H), dL/dweight (V, H),
    dL/dbias (V,); each (0,) when not needed. With ``vocab_group``: dL/dhidden summed over the group, dL/dweight
    and dL/dbias this rank's rows."""
    with autocast_off(hidden):
        grads = chunking.token_backward(
            backends.get(backend), hidden, weight, bias, labels, normalizer, entropy, grad_logp, grad_entropy,
            HeadSpec(softcap, temperature), ignore_index, GradsNeeded(need_hidden, need_weight, need_bias),
            scratch_bytes, _shard(vocab_group, vocab_size),
        )  # fmt: skip
    return _or_empty(hidden, grads)


@token_logps_backward.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, labels, normalizer, entropy, ignore_index, softcap, temperature,
      need_hidden, need_weight, need_bias, backend, scratch_bytes, vocab_group=None, vocab_size=0):  # fmt: skip
    return _fake_grads(hidden, weight, bias, GradsNeeded(need_hidden, need_weight, need_bias))


def _token_setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, ignore_index, softcap, temperature, with_metrics, backend, scratch_bytes,
     vocab_group, vocab_size) = inputs  # fmt: skip
    _logp, entropy, mean_logit, is_top1, log_sum_sq_probs, normalizer = output
    ctx.mark_non_differentiable(mean_logit, is_top1, log_sum_sq_probs, normalizer)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, bias, labels, normalizer, entropy if with_metrics else None)
    ctx.options = (ignore_index, softcap, temperature, backend, scratch_bytes)
    ctx.shard = (vocab_group, vocab_size)


def _token_backward(ctx, grad_logp, grad_entropy, *_grads_of_nondifferentiable):
    hidden, weight, bias, labels, normalizer, entropy = ctx.saved_tensors
    needs = GradsNeeded(*ctx.needs_input_grad[:3])
    if entropy is None:  # the (0,) placeholder of metrics not asked for carries no gradient
        grad_entropy = None
    nothing = (None,) * 12
    if (grad_logp is None and grad_entropy is None) or not any((needs.hidden, needs.weight, needs.bias)):
        return nothing
    objectives.check_first_order(hidden, weight, bias, grad_logp, grad_entropy)
    ignore_index, softcap, temperature, backend, scratch_bytes = ctx.options
    if grad_logp is None:
        grad_logp = torch.zeros_like(normalizer[0])
    grad_hidden, grad_weight, grad_bias = token_logps_backward(
        grad_logp, grad_entropy, hidden, weight, bias, labels, normalizer, entropy, ignore_index, softcap, temperature,
        needs.hidden, needs.weight, needs.bias, backend, scratch_bytes, *ctx.shard,
    )  # fmt: skip
    return (
        grad_hidden if needs.hidden else None, grad_weight if needs.weight else None,
        grad_bias if needs.bias else None, *nothing[3:],
    )  # fmt: skip


token_logps_forward.register_autograd(_token_backward, setup_context=_token_setup_context)


def token_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, *, ignore_index: int,
                head: HeadSpec, with_metrics: bool, backend: str, scratch_bytes: int,
                shard: VocabShard | None = None) -> TokenPass:  # fmt: skip
    """``dpo_fast::token_logps_forward`` on hidden (N, H) and labels (N,); ``shard``: weight and bias are this rank's
    rows of a vocabulary-parallel head."""
    return TokenPass(*token_logps_forward(
        hidden, weight, bias, labels, ignore_index, head.softcap, head.temperature, with_metrics, backend,
        scratch_bytes, *_shard_args(shard),
    ))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# A preference objective's loss, gradients formed in the forward pass


@torch.library.custom_op(
    "dpo_fast::preference_loss_forward", mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor segment_ids, Tensor logp_weights, "
    "Tensor? nll_weights, Tensor completion, Tensor? ref_sums, Tensor? desirable, Tensor kl, SymInt num_units, "
    f"str objective, {_HEAD}, {_NEEDS}, bool with_metrics, {_RUN}, {_SHARD}) -> (Tensor loss, Tensor logps, "
    f"Tensor nll_logps, Tensor normalizer, {_METRICS}, Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)",
)  # fmt: skip
def preference_loss_forward(hidden, weight, bias, targets, segment_ids, logp_weights, nll_weights, completion,
                            ref_sums, desirable, kl, num_units, objective, ignore_index, softcap, temperature,
                            need_hidden, need_weight, need_bias, with_metrics, backend, scratch_bytes, vocab_group=None,
                            vocab_size=0) -> tuple[Tensor, ...]:  # fmt: skip
    """The fused pass (``chunking.preference_forward_with_grads``) on hidden (N, H), targets and segment_ids (N,):
    ``PreferencePass``'s fields, then dL/dhidden, dL/dweight, dL/dbias for a unit grad_output ((0,) where not
    needed). The token weights are ``objectives.token_weights``' (N,) each; ``ref_sums`` (S,) the reference's sums
    with the same weights, ``desirable`` (S,) KTO's labels, ``kl`` () KTO's estimate; ``num_units`` P pairs
    (S = 2P) or S unpaired sequences. With ``vocab_group`` (a vocabulary-parallel head of ``vocab_size`` rows),
    weight and bias are this rank's rows: the loss, sums and metrics are the whole vocabulary's, dL/dhidden is summed
    over the group, dL/dweight and dL/dbias are the rank's rows."""
    decoded = objectives.decode_objective(objective)
    weights = TokenWeights(logp_weights, nll_weights, completion)
    nll_tokens = hidden.new_zeros((), dtype=torch.float64) if nll_weights is None else nll_weights.sum()
    batch = objectives.BatchConstants(num_units=num_units, nll_tokens=nll_tokens, kl=kl)
    with autocast_off(hidden):
        loss, (logps, nll_logps), normalizer, metrics, grads = chunking.preference_forward_with_grads(
            backends.get(backend), hidden, weight, bias, targets, segment_ids, weights, ref_sums, desirable, batch,
            decoded, HeadSpec(softcap, temperature), ignore_index, GradsNeeded(need_hidden, need_weight, need_bias),
            with_metrics, scratch_bytes, _shard(vocab_group, vocab_size),
        )  # fmt: skip
    acc = loss.dtype
    nll_logps = hidden.new_empty(_EMPTY, dtype=acc) if nll_logps is None else nll_logps.to(acc)
    return (loss, logps.to(acc), nll_logps, normalizer, *metrics, *_or_empty(hidden, grads))


@preference_loss_forward.register_fake
def _(hidden, weight, bias, targets, segment_ids, logp_weights, nll_weights, completion, ref_sums, desirable, kl,
      num_units, objective, ignore_index, softcap, temperature, need_hidden, need_weight, need_bias, with_metrics,
      backend, scratch_bytes, vocab_group=None, vocab_size=0):  # fmt: skip
    acc, num_tokens = accumulate_dtype(hidden.dtype), targets.shape[0]
    num_seq = 2 * num_units if objectives.decode_objective(objective).paired else num_units
    return (
        hidden.new_empty((), dtype=acc),
        hidden.new_empty(num_seq, dtype=acc),
        hidden.new_empty(_EMPTY if nll_weights is None else num_seq, dtype=acc),
        hidden.new_empty((2, num_tokens), dtype=acc),
        *_fake_metrics(hidden, num_tokens, with_metrics),
        *_fake_grads(hidden, weight, bias, GradsNeeded(need_hidden, need_weight, need_bias)),
    )


def _preference_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, segment_ids, logp_weights, nll_weights, *_rest = inputs
    ignore_index, softcap, temperature = inputs[13:16]
    backend, scratch_bytes, vocab_group, vocab_size = inputs[20:24]
    _loss, logps, _nll_logps, normalizer, *metrics, grad_hidden, grad_weight, grad_bias = output
    ctx.mark_non_differentiable(normalizer, *metrics, grad_hidden, grad_weight, grad_bias)
    ctx.num_sequences = logps.shape[0]
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, bias, targets, segment_ids, logp_weights, nll_weights, normalizer,
                          grad_hidden, grad_weight, grad_bias)  # fmt: skip
    ctx.options = (ignore_index, softcap, temperature, backend, scratch_bytes)
    ctx.shard = (vocab_group, vocab_size)


def _preference_backward(ctx, grad_loss, grad_logps, grad_nll_logps, *_grads_of_nondifferentiable):
    hidden, weight, bias, targets, segment_ids, logp_weights, nll_weights, normalizer, *saved = ctx.saved_tensors
    needs = GradsNeeded(*ctx.needs_input_grad[:3])
    objectives.check_first_order(hidden, weight, bias, grad_loss, grad_logps, grad_nll_logps)
    # With the usual grad_output of 1 the saved gradients are returned as they are (one scalar sync
    # to know it, skipped while a graph is traced): autograd then hands them to .grad without a
    # (V, H) copy. They are never modified here, so a retained graph can run backward again.
    unit = grad_loss is not None and _holds_values(grad_loss) and bool(grad_loss == 1)
    grads = []
    for needed, grad in zip((needs.hidden, needs.weight, needs.bias), saved):
        if not needed:
            grads.append(None)
        elif grad_loss is None:
            grads.append(torch.zeros_like(grad))
        else:
            grads.append(grad if unit else grad * grad_loss.to(grad.dtype))
    if nll_weights is None:
        grad_nll_logps = None
    if (grad_logps is not None or grad_nll_logps is not None) and any((needs.hidden, needs.weight, needs.bias)):
        # a gradient that reaches the per-sequence sums by another path: recompute, per token
        ignore_index, softcap, temperature, backend, scratch_bytes = ctx.options
        if grad_logps is None:
            grad_logps = torch.zeros(ctx.num_sequences, dtype=normalizer.dtype, device=normalizer.device)
        per_sequence = objectives.ObjectiveValue(
            loss=None, grad_logps=grad_logps.double(),
            grad_nll_logps=None if grad_nll_logps is None else grad_nll_logps.double(),
        )  # fmt: skip
        weights = TokenWeights(logp_weights, nll_weights, completion=None)
        grad_logp = objectives.token_grads(per_sequence, segment_ids, weights).to(normalizer.dtype)
        extra = token_logps_backward(
            grad_logp, None, hidden, weight, bias, targets, normalizer, None, ignore_index, softcap, temperature,
            needs.hidden, needs.weight, needs.bias, backend, scratch_bytes, *ctx.shard,
        )  # fmt: skip
        grads = [grad if grad is None else grad + more for grad, more in zip(grads, extra)]
    return (*grads, *(None,) * 21)


preference_loss_forward.register_autograd(_preference_backward, setup_context=_preference_setup_context)


def preference_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    *,
    targets: Tensor,
    segment_ids: Tensor,
    weights: TokenWeights,
    ref_sums: Tensor | None,
    desirable: Tensor | None,
    kl: Tensor,
    num_units: int,
    objective: objectives.Objective,
    ignore_index: int,
    head: HeadSpec,
    needs: GradsNeeded,
    with_metrics: bool,
    backend: str,
    scratch_bytes: int,
    shard: VocabShard | None = None,
) -> PreferencePass:
    """``dpo_fast::preference_loss_forward`` (see it for the arguments; ``shard``: weight and bias are this rank's rows
    of a vocabulary-parallel head)."""
    loss, logps, nll_logps, normalizer, *metrics, _grad_hidden, _grad_weight, _grad_bias = preference_loss_forward(
        hidden, weight, bias, targets, segment_ids, weights.logps, weights.nll, weights.completion, ref_sums,
        desirable, kl, num_units, objectives.encode_objective(objective), ignore_index, head.softcap,
        head.temperature, needs.hidden, needs.weight, needs.bias, with_metrics, backend, scratch_bytes,
        *_shard_args(shard),
    )  # fmt: skip
    return PreferencePass(loss, logps, nll_logps, normalizer, *metrics)
