"""The custom ops and their autograd: what the public API calls for the chunked backends.

Each op is a ``torch.library.custom_op`` with a fake (meta) function, so a ``torch.compile``d model
calls dpo_fast without a graph break and ``torch.library.opcheck`` can test it:

- ``dpo_fast::token_logps_forward`` / ``dpo_fast::token_logps_backward``: per-token log-probs (and
  entropies) with gradients for any per-token upstream gradient; the backward recomputes each
  chunk's logits from the saved logsumexp.
- ``dpo_fast::dpo_loss_forward``: the DPO loss with its gradients formed in the forward pass;
  its backward scales them by ``grad_output`` (and recomputes only for a gradient that reaches
  the returned log-probs by another path, such as an NLL term on the chosen log-probs).

Under ``torch.no_grad()``, or when no input requires grad, the ops run forward only and save nothing.
Gradients that no input needs are not computed: a frozen ``weight`` costs no ``dL/dW`` work.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import backends, chunking
from .backends import HeadSpec, accumulate_dtype

_EMPTY = (0,)


def _head(softcap: Optional[float], temperature: float) -> HeadSpec:
    return HeadSpec(softcap=softcap, temperature=temperature)


# ----------------------------------------------------------------------------------------------
# Per-token log-probs


@torch.library.custom_op("dpo_fast::token_logps_forward", mutates_args=())
def token_logps_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    ignore_index: int,
    softcap: Optional[float],
    temperature: float,
    with_entropy: bool,
    backend: str,
    scratch_bytes: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(N, H), (V, H), (V,)?, (N,) -> logp (N,), entropy (N,) or (0,), normalizer (2, N).

    Float32 (float64 for float64 inputs). The normalizer holds each token's max logit and
    ``log sum exp(z - max)`` (``dpo_fast.backends.ChunkStats``), saved for the backward.
    """
    return chunking.token_forward(
        backends.get(backend), hidden, weight, bias, labels, _head(softcap, temperature), ignore_index,
        with_entropy, scratch_bytes,
    )  # fmt: skip


@token_logps_forward.register_fake
def _(hidden, weight, bias, labels, ignore_index, softcap, temperature, with_entropy, backend, scratch_bytes):
    num_tokens, acc = labels.shape[0], accumulate_dtype(hidden.dtype)
    return (
        hidden.new_empty(num_tokens, dtype=acc),
        hidden.new_empty(num_tokens if with_entropy else 0, dtype=acc),
        hidden.new_empty((2, num_tokens), dtype=acc),
    )


@torch.library.custom_op("dpo_fast::token_logps_backward", mutates_args=())
def token_logps_backward(
    grad_logp: Tensor,
    grad_entropy: Optional[Tensor],
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    normalizer: Tensor,
    entropy: Optional[Tensor],
    ignore_index: int,
    softcap: Optional[float],
    temperature: float,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
    scratch_bytes: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """-> dL/dhidden (N, H), dL/dweight (V, H), dL/dbias (V,); each empty (0,) when not needed."""
    grads = chunking.token_backward(
        backends.get(backend), hidden, weight, bias, labels, normalizer, entropy, grad_logp, grad_entropy,
        _head(softcap, temperature), ignore_index, chunking.GradsNeeded(need_hidden, need_weight, need_bias),
        scratch_bytes,
    )  # fmt: skip
    return tuple(hidden.new_empty(_EMPTY) if grad is None else grad for grad in grads)


@token_logps_backward.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, labels, normalizer, entropy, ignore_index, softcap, temperature,
      need_hidden, need_weight, need_bias, backend, scratch_bytes):  # fmt: skip
    return _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias):
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(_EMPTY),
        torch.empty_like(weight) if need_weight else hidden.new_empty(_EMPTY),
        torch.empty_like(bias) if need_bias else hidden.new_empty(_EMPTY),
    )


def _token_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, softcap, temperature, with_entropy, backend, scratch_bytes = inputs
    _, entropy, normalizer = output
    ctx.mark_non_differentiable(normalizer)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, bias, labels, normalizer, entropy if with_entropy else None)
    ctx.options = (ignore_index, softcap, temperature, backend, scratch_bytes)


def _token_backward(ctx, grad_logp, grad_entropy, _grad_normalizer):
    hidden, weight, bias, labels, normalizer, entropy = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    if (grad_logp is None and grad_entropy is None) or not (need_hidden or need_weight or need_bias):
        return (None,) * 10
    ignore_index, softcap, temperature, backend, scratch_bytes = ctx.options
    if grad_logp is None:
        grad_logp = torch.zeros_like(normalizer[0])
    grad_hidden, grad_weight, grad_bias = token_logps_backward(
        grad_logp, grad_entropy, hidden, weight, bias, labels, normalizer, entropy, ignore_index, softcap, temperature,
        need_hidden, need_weight, need_bias, backend, scratch_bytes,
    )  # fmt: skip
    return (
        grad_hidden if need_hidden else None,
        grad_weight if need_weight else None,
        grad_bias if need_bias else None,
    ) + (None,) * 7


token_logps_forward.register_autograd(_token_backward, setup_context=_token_setup_context)


# ----------------------------------------------------------------------------------------------
# The fused DPO loss, gradients formed in the forward pass


@torch.library.custom_op("dpo_fast::dpo_loss_forward", mutates_args=())
def dpo_loss_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    labels: Tensor,
    segment_ids: Tensor,
    ref_logps: Optional[Tensor],
    num_pairs: int,
    beta: float,
    loss_type: str,
    label_smoothing: float,
    average_log_prob: bool,
    ignore_index: int,
    softcap: Optional[float],
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    backend: str,
    scratch_bytes: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> loss (), seq_logps (2P,), normalizer (2, N), and dL/dhidden, dL/dweight, dL/dbias for a unit grad_output."""
    loss, seq_logps, normalizer, grads = chunking.dpo_forward_with_grads(
        backends.get(backend), hidden, weight, bias, labels, segment_ids, num_pairs, ref_logps,
        chunking.Objective(beta, loss_type, label_smoothing, average_log_prob), _head(softcap, 1.0), ignore_index,
        chunking.GradsNeeded(need_hidden, need_weight, need_bias), scratch_bytes,
    )  # fmt: skip
    return (loss, seq_logps, normalizer) + tuple(hidden.new_empty(_EMPTY) if grad is None else grad for grad in grads)


@dpo_loss_forward.register_fake
def _(hidden, weight, bias, labels, segment_ids, ref_logps, num_pairs, beta, loss_type, label_smoothing,
      average_log_prob, ignore_index, softcap, need_hidden, need_weight, need_bias, backend, scratch_bytes):  # fmt: skip
    acc = accumulate_dtype(hidden.dtype)
    return (
        hidden.new_empty((), dtype=acc),
        hidden.new_empty(2 * num_pairs, dtype=acc),
        hidden.new_empty((2, labels.shape[0]), dtype=acc),
    ) + _fake_grads(hidden, weight, bias, need_hidden, need_weight, need_bias)


def _dpo_setup_context(ctx, inputs, output):
    (hidden, weight, bias, labels, segment_ids, _ref, num_pairs, _beta, _loss_type, _ls, average_log_prob,
     ignore_index, softcap, _nh, _nw, _nb, backend, scratch_bytes) = inputs  # fmt: skip
    _loss, _seq_logps, normalizer, grad_hidden, grad_weight, grad_bias = output
    ctx.mark_non_differentiable(normalizer, grad_hidden, grad_weight, grad_bias)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(hidden, weight, bias, labels, segment_ids, normalizer, grad_hidden, grad_weight, grad_bias)
    ctx.options = (num_pairs, average_log_prob, ignore_index, softcap, backend, scratch_bytes)


def _dpo_backward(ctx, grad_loss, grad_seq_logps, *_grads_of_nondifferentiable):
    hidden, weight, bias, labels, segment_ids, normalizer, *saved_grads = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    # With the usual grad_output of 1 the saved gradients are returned as they are (one scalar sync
    # to know it, skipped while torch.compile traces): autograd then hands them to .grad without a
    # (V, H) copy. They are never modified here, so a retained graph can run backward again.
    unit = grad_loss is not None and not torch.compiler.is_compiling() and bool(grad_loss == 1)
    grads = []
    for needed, saved in zip(need, saved_grads):
        if not needed:
            grads.append(None)
        elif grad_loss is None:
            grads.append(torch.zeros_like(saved))
        else:
            grads.append(saved if unit else saved * grad_loss.to(saved.dtype))
    if grad_seq_logps is not None and any(need):
        grads = _add_sequence_logps_grads(
            ctx, grads, grad_seq_logps, hidden, weight, bias, labels, segment_ids, normalizer
        )
    return tuple(grads) + (None,) * 15


def _add_sequence_logps_grads(ctx, grads, grad_seq_logps, hidden, weight, bias, labels, segment_ids, normalizer):
    """A gradient that reaches the returned log-probs by another path: recompute, per token."""
    num_pairs, average_log_prob, ignore_index, softcap, backend, scratch_bytes = ctx.options
    acc = normalizer.dtype
    scale = chunking.sequence_scale(labels, segment_ids, 2 * num_pairs, ignore_index, average_log_prob, acc)
    grad_logp = (grad_seq_logps.to(acc) * scale).index_select(0, segment_ids)
    need = ctx.needs_input_grad[:3]
    extra = token_logps_backward(
        grad_logp, None, hidden, weight, bias, labels, normalizer, None, ignore_index, softcap, 1.0, *need, backend,
        scratch_bytes,
    )  # fmt: skip
    return [grad if grad is None else grad + more for grad, more in zip(grads, extra)]


dpo_loss_forward.register_autograd(_dpo_backward, setup_context=_dpo_setup_context)
