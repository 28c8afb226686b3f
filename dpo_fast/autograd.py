"""The custom ops and their autograd: what the public API calls for the chunked backends.

Each op is a ``torch.library.custom_op`` with a fake (meta) function, so a ``torch.compile``d model
calls dpo_fast without a graph break and ``torch.library.opcheck`` can test it:

- ``dpo_fast::token_logps_forward`` / ``dpo_fast::token_logps_backward``: per-token log-probs (and
  the token metrics: entropy, mean logit, top-1) with gradients for any per-token upstream
  gradient of the log-probs and entropies; the backward recomputes each chunk's logits from the
  saved logsumexp.
- ``dpo_fast::preference_loss_forward``: a preference objective's loss (``dpo_fast.objectives``, passed
  as ``objectives.encode_objective``'s string) and the token metrics, with its gradients formed in the
  forward pass; its backward scales them by ``grad_output`` (and recomputes only for a gradient that
  reaches the returned per-sequence sums by another path, such as a loss added on the log-probs).

Each op's arguments are one dataclass (``TokenInputs``, ``TokenGradInputs``, ``PreferenceInputs``) whose
fields are the op's schema in order; the dataclasses among them (``HeadSpec``, ``GradsNeeded``,
``objectives.TokenWeights``) expand to their fields (``head_softcap``, ``weights_logps``, ...). The schema, the
flat argument list, its unpacking in the autograd formulas and the ``None`` gradients of the
non-tensor arguments are all derived from those dataclasses: adding an argument is one edit.

Under ``torch.no_grad()``, or when no input requires grad, the ops run forward only and save nothing.
Gradients that no input needs are not computed: a frozen ``weight`` costs no ``dL/dW`` work. The
gradients are not differentiable themselves: a double backward (``create_graph=True``, e.g. a
gradient penalty) raises an error rather than silently dropping the second-order terms.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, fields, is_dataclass

import torch
import torch.utils._python_dispatch
from torch import Tensor

from . import backends, chunking, objectives
from .backends import HeadSpec, accumulate_dtype
from .chunking import GradsNeeded
from .objectives import TokenWeights

_EMPTY = (0,)

# ----------------------------------------------------------------------------------------------
# The ops' arguments: one dataclass each, flattened into the op's schema


@dataclass(frozen=True)
class TokenInputs:
    """``token_logps_forward``: hidden (N, H), weight (V, H), bias (V,)?, labels (N,) int64."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    labels: Tensor
    ignore_index: int
    head: HeadSpec
    with_metrics: bool
    backend: str
    scratch_bytes: int


@dataclass(frozen=True)
class TokenGradInputs:
    """``token_logps_backward``: upstream gradients (N,), the forward's inputs and saved statistics."""

    grad_logp: Tensor
    grad_entropy: Tensor | None
    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    labels: Tensor
    normalizer: Tensor
    entropy: Tensor | None
    ignore_index: int
    head: HeadSpec
    needs: GradsNeeded
    backend: str
    scratch_bytes: int


@dataclass(frozen=True)
class PreferenceInputs:
    """``preference_loss_forward``: hidden (N, H), labels and segment_ids (N,), the token weights (N,) each,
    ref_logps (S,) or None, desirable (S,) bool or None, nll_tokens and kl () float64, ``objective`` the string of
    ``objectives.encode_objective``, ``num_units`` its P pairs (S = 2P) or S unpaired sequences."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    labels: Tensor
    segment_ids: Tensor
    weights: TokenWeights
    ref_logps: Tensor | None
    desirable: Tensor | None
    nll_tokens: Tensor
    kl: Tensor
    num_units: int
    objective: str
    ignore_index: int
    softcap: float | None
    needs: GradsNeeded
    with_metrics: bool
    backend: str
    scratch_bytes: int

    def num_sequences(self) -> int:
        return 2 * self.num_units if objectives.decode_objective(self.objective).paired else self.num_units


_SCHEMA_TYPES = {Tensor: "Tensor", int: "SymInt", float: "float", bool: "bool", str: "str"}


@functools.cache
def _field_types(cls: type) -> tuple[tuple[str, object], ...]:
    """(name, resolved type) of each field of a dataclass."""
    hints = typing.get_type_hints(cls)
    return tuple((field.name, hints[field.name]) for field in fields(cls))


def _leaves(cls: type) -> tuple[tuple[str, tuple[str, ...], str], ...]:
    """(schema name, attribute path, schema type) of each op argument; nested dataclasses expand."""
    leaves = []
    for name, hint in _field_types(cls):
        if is_dataclass(hint):
            leaves += [(f"{name}_{leaf}", (name, *path), kind) for leaf, path, kind in _leaves(hint)]
            continue
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next(arg for arg in args if arg is not type(None)) if optional else hint
        leaves.append((name, (name,), _SCHEMA_TYPES[base] + ("?" if optional else "")))
    return tuple(leaves)


_LEAVES = {cls: _leaves(cls) for cls in (TokenInputs, TokenGradInputs, PreferenceInputs)}


def _schema(cls: type, returns: str) -> str:
    return "(" + ", ".join(f"{kind} {name}" for name, _, kind in _LEAVES[cls]) + ") -> " + returns


def flatten(inputs: TokenInputs | TokenGradInputs | PreferenceInputs) -> tuple:
    """The op's positional arguments, in schema order."""
    flat = []
    for _, path, _ in _LEAVES[type(inputs)]:
        value = inputs
        for name in path:
            value = getattr(value, name)
        flat.append(value)
    return tuple(flat)


def _unflatten(cls: type, flat: tuple):
    """``cls`` rebuilt from the op's positional arguments (the inverse of ``flatten``)."""
    values = iter(flat)

    def build(kind: type):
        return kind(**{name: build(hint) if is_dataclass(hint) else next(values) for name, hint in _field_types(kind)})

    return build(cls)


def _input_grads(cls: type, **grads: Tensor | None) -> tuple:
    """The op's gradients in schema order: ``grads`` by argument name, None for every other argument."""
    return tuple(grads.get(name) for name, _, _ in _LEAVES[cls])


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


def _check_not_double_backward(*tensors: Tensor | None) -> None:
    """Refuse a backward with ``create_graph=True``: the gradients formed here are constants to autograd."""
    if torch.is_grad_enabled() and any(tensor is not None and tensor.requires_grad for tensor in tensors):
        raise RuntimeError(
            "dpo_fast's chunked backends form gradients that are not differentiable themselves: a backward with "
            "create_graph=True (a gradient penalty, a Hessian-vector product, double backward) would silently "
            "drop the second-order terms. Use backend='reference' for higher-order gradients."
        )


# ----------------------------------------------------------------------------------------------
# Per-token log-probs


# the token metrics an op returns: entropy, mean_logit, is_top1, log_sum_sq_probs, each (N,), or (0,) when not
# asked for
_METRICS = "Tensor, Tensor, Tensor, Tensor"


@torch.library.custom_op(
    "dpo_fast::token_logps_forward", mutates_args=(), schema=_schema(TokenInputs, f"(Tensor, {_METRICS}, Tensor)")
)
def token_logps_forward(*flat) -> tuple[Tensor, ...]:
    """``TokenInputs`` -> logp (N,), entropy, mean_logit, is_top1, log_sum_sq_probs (N,) or (0,), normalizer (2, N).

    Float32 (float64 for float64 inputs), ``is_top1`` bool; the metrics are (0,) unless
    ``with_metrics``. The normalizer holds each token's max logit and ``log sum exp(z - max)``
    (``dpo_fast.backends.ChunkStats``), saved for the backward. Differentiable: logp and entropy.
    """
    x = _unflatten(TokenInputs, flat)
    logp, normalizer, metrics = chunking.token_forward(
        backends.get(x.backend), x.hidden, x.weight, x.bias, x.labels, x.head, x.ignore_index, x.with_metrics,
        x.scratch_bytes,
    )  # fmt: skip
    return (logp, *metrics, normalizer)


@token_logps_forward.register_fake
def _(*flat):
    x = _unflatten(TokenInputs, flat)
    num_tokens, acc = x.labels.shape[0], accumulate_dtype(x.hidden.dtype)
    return (
        x.hidden.new_empty(num_tokens, dtype=acc),
        *_fake_metrics(x.hidden, num_tokens, x.with_metrics),
        x.hidden.new_empty((2, num_tokens), dtype=acc),
    )


def _fake_metrics(hidden: Tensor, num_tokens: int, with_metrics: bool) -> tuple[Tensor, ...]:
    size, acc = (num_tokens if with_metrics else 0), accumulate_dtype(hidden.dtype)
    return (
        hidden.new_empty(size, dtype=acc),
        hidden.new_empty(size, dtype=acc),
        hidden.new_empty(size, dtype=torch.bool),
        hidden.new_empty(size, dtype=acc),
    )


@torch.library.custom_op(
    "dpo_fast::token_logps_backward", mutates_args=(), schema=_schema(TokenGradInputs, "(Tensor, Tensor, Tensor)")
)
def token_logps_backward(*flat) -> tuple[Tensor, Tensor, Tensor]:
    """``TokenGradInputs`` -> dL/dhidden (N, H), dL/dweight (V, H), dL/dbias (V,); each (0,) when not needed."""
    x = _unflatten(TokenGradInputs, flat)
    grads = chunking.token_backward(
        backends.get(x.backend), x.hidden, x.weight, x.bias, x.labels, x.normalizer, x.entropy, x.grad_logp,
        x.grad_entropy, x.head, x.ignore_index, x.needs, x.scratch_bytes,
    )  # fmt: skip
    return tuple(x.hidden.new_empty(_EMPTY) if grad is None else grad for grad in grads)


@token_logps_backward.register_fake
def _(*flat):
    x = _unflatten(TokenGradInputs, flat)
    return _fake_grads(x.hidden, x.weight, x.bias, x.needs)


def _fake_grads(hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: GradsNeeded) -> tuple[Tensor, ...]:
    return (
        torch.empty_like(hidden) if needs.hidden else hidden.new_empty(_EMPTY),
        torch.empty_like(weight) if needs.weight else hidden.new_empty(_EMPTY),
        torch.empty_like(bias) if needs.bias else hidden.new_empty(_EMPTY),
    )


def _needs(ctx, cls: type) -> GradsNeeded:
    """Which of the op's arguments hidden, weight and bias need a gradient."""
    names = [name for name, _, _ in _LEAVES[cls]]
    return GradsNeeded(*(ctx.needs_input_grad[names.index(name)] for name in ("hidden", "weight", "bias")))


def _token_setup_context(ctx, inputs, output):
    x = _unflatten(TokenInputs, inputs)
    _logp, entropy, mean_logit, is_top1, log_sum_sq_probs, normalizer = output
    ctx.mark_non_differentiable(mean_logit, is_top1, log_sum_sq_probs, normalizer)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x.hidden, x.weight, x.bias, x.labels, normalizer, entropy if x.with_metrics else None)
    ctx.inputs = x


def _token_backward(ctx, grad_logp, grad_entropy, *_grads_of_nondifferentiable):
    hidden, weight, bias, labels, normalizer, entropy = ctx.saved_tensors
    needs = _needs(ctx, TokenInputs)
    if entropy is None:  # the (0,) placeholder of metrics not asked for carries no gradient
        grad_entropy = None
    if (grad_logp is None and grad_entropy is None) or not any((needs.hidden, needs.weight, needs.bias)):
        return _input_grads(TokenInputs)
    _check_not_double_backward(hidden, weight, bias, grad_logp, grad_entropy)
    x = ctx.inputs
    if grad_logp is None:
        grad_logp = torch.zeros_like(normalizer[0])
    grad_hidden, grad_weight, grad_bias = token_logps_backward(*flatten(TokenGradInputs(
        grad_logp, grad_entropy, hidden, weight, bias, labels, normalizer, entropy, x.ignore_index, x.head, needs,
        x.backend, x.scratch_bytes,
    )))  # fmt: skip
    return _input_grads(
        TokenInputs,
        hidden=grad_hidden if needs.hidden else None,
        weight=grad_weight if needs.weight else None,
        bias=grad_bias if needs.bias else None,
    )


token_logps_forward.register_autograd(_token_backward, setup_context=_token_setup_context)


def token_logps(inputs: TokenInputs) -> tuple[Tensor, ...]:
    """Call ``dpo_fast::token_logps_forward`` with ``inputs``."""
    return token_logps_forward(*flatten(inputs))


# ----------------------------------------------------------------------------------------------
# A preference objective's loss, gradients formed in the forward pass


@torch.library.custom_op(
    "dpo_fast::preference_loss_forward", mutates_args=(),
    schema=_schema(PreferenceInputs, f"(Tensor, Tensor, Tensor, Tensor, {_METRICS}, Tensor, Tensor, Tensor)"),
)  # fmt: skip
def preference_loss_forward(*flat) -> tuple[Tensor, ...]:
    """``PreferenceInputs`` -> loss (), logps (S,), nll_logps (S,) or (0,) without an NLL term, normalizer (2, N),
    the metrics as ``token_logps_forward``'s, and dL/dhidden, dL/dweight, dL/dbias for a unit grad_output ((0,)
    where not needed).

    ``logps`` and ``nll_logps`` are the objective's per-sequence sums ``sum_t w[t] logp[t]`` and
    ``sum_t m[t] logp[t]`` (``objectives.interface``), in the accumulate dtype. Differentiable: loss, logps and
    nll_logps.
    """
    x = _unflatten(PreferenceInputs, flat)
    objective = objectives.decode_objective(x.objective)
    batch = objectives.BatchConstants(num_units=x.num_units, nll_tokens=x.nll_tokens, kl=x.kl)
    loss, (logps, nll_logps), normalizer, metrics, grads = chunking.preference_forward_with_grads(
        backends.get(x.backend), x.hidden, x.weight, x.bias, x.labels, x.segment_ids, x.weights, x.ref_logps,
        x.desirable, batch, objective, HeadSpec(x.softcap), x.ignore_index, x.needs, x.with_metrics, x.scratch_bytes,
    )  # fmt: skip
    acc = loss.dtype
    return (
        loss, logps.to(acc), x.hidden.new_empty(_EMPTY, dtype=acc) if nll_logps is None else nll_logps.to(acc),
        normalizer, *metrics, *(x.hidden.new_empty(_EMPTY) if g is None else g for g in grads),
    )  # fmt: skip


@preference_loss_forward.register_fake
def _(*flat):
    x = _unflatten(PreferenceInputs, flat)
    acc, num_seq = accumulate_dtype(x.hidden.dtype), x.num_sequences()
    return (
        x.hidden.new_empty((), dtype=acc),
        x.hidden.new_empty(num_seq, dtype=acc),
        x.hidden.new_empty(_EMPTY if x.weights.nll is None else num_seq, dtype=acc),
        x.hidden.new_empty((2, x.labels.shape[0]), dtype=acc),
        *_fake_metrics(x.hidden, x.labels.shape[0], x.with_metrics),
        *_fake_grads(x.hidden, x.weight, x.bias, x.needs),
    )


def _preference_setup_context(ctx, inputs, output):
    x = _unflatten(PreferenceInputs, inputs)
    _loss, _logps, _nll_logps, normalizer, *metrics, grad_hidden, grad_weight, grad_bias = output
    ctx.mark_non_differentiable(normalizer, *metrics, grad_hidden, grad_weight, grad_bias)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(
        x.hidden, x.weight, x.bias, x.labels, x.segment_ids, x.weights.logps, x.weights.nll, normalizer, grad_hidden,
        grad_weight, grad_bias,
    )  # fmt: skip
    ctx.inputs = x


def _preference_backward(ctx, grad_loss, grad_logps, grad_nll_logps, *_grads_of_nondifferentiable):
    hidden, weight, bias, labels, segment_ids, logp_weights, nll_weights, normalizer, *saved_grads = ctx.saved_tensors
    needs = _needs(ctx, PreferenceInputs)
    _check_not_double_backward(hidden, weight, bias, grad_loss, grad_logps, grad_nll_logps)
    # With the usual grad_output of 1 the saved gradients are returned as they are (one scalar sync
    # to know it, skipped while a graph is traced): autograd then hands them to .grad without a
    # (V, H) copy. They are never modified here, so a retained graph can run backward again.
    unit = grad_loss is not None and _holds_values(grad_loss) and bool(grad_loss == 1)
    grads = []
    for needed, saved in zip((needs.hidden, needs.weight, needs.bias), saved_grads):
        if not needed:
            grads.append(None)
        elif grad_loss is None:
            grads.append(torch.zeros_like(saved))
        else:
            grads.append(saved if unit else saved * grad_loss.to(saved.dtype))
    if nll_weights is None:
        grad_nll_logps = None
    if (grad_logps is not None or grad_nll_logps is not None) and any((needs.hidden, needs.weight, needs.bias)):
        # a gradient that reaches the per-sequence sums by another path: recompute, per token
        x = ctx.inputs
        if grad_logps is None:
            grad_logps = logp_weights.new_zeros(x.num_sequences())
        per_sequence = objectives.ObjectiveValue(
            loss=None, grad_logps=grad_logps.double(),
            grad_nll_logps=None if grad_nll_logps is None else grad_nll_logps.double(),
        )  # fmt: skip
        weights = TokenWeights(logp_weights, nll_weights, completion=None)
        grad_logp = objectives.token_grads(per_sequence, segment_ids, weights).to(normalizer.dtype)
        extra = token_logps_backward(*flatten(TokenGradInputs(
            grad_logp, None, hidden, weight, bias, labels, normalizer, None, x.ignore_index, HeadSpec(x.softcap),
            needs, x.backend, x.scratch_bytes,
        )))  # fmt: skip
        grads = [grad if grad is None else grad + more for grad, more in zip(grads, extra)]
    return _input_grads(PreferenceInputs, hidden=grads[0], weight=grads[1], bias=grads[2])


preference_loss_forward.register_autograd(_preference_backward, setup_context=_preference_setup_context)


def preference_loss(inputs: PreferenceInputs) -> tuple[Tensor, ...]:
    """Call ``dpo_fast::preference_loss_forward`` with ``inputs``."""
    return preference_loss_forward(*flatten(inputs))
