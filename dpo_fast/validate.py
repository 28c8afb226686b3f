"""Argument checks for the public API: a clear ``ValueError`` naming the argument, the value and what is expected.

Type, shape, dtype and option checks cost nothing and always run. Checks of tensor *values*
(labels in ``[0, V)``, segment ids in range) need one device synchronisation; they run in eager
mode. While ``torch.compile`` traces they cannot raise without a graph break, so out-of-range
values are made to show instead: a label outside ``[0, V)`` gets a NaN log-prob from every backend
(the backend contract), and a token whose segment id is out of range is given such a label and a
segment id in range (``segment_values``), so that the loss, the log-probs of its sequence and the
gradients come out NaN and nothing is indexed out of bounds.
"""

from __future__ import annotations

import numbers

import torch

from .backends import NAMES as BACKENDS
from .objectives.checks import finite

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)
# scratch_mib's largest value: its bytes stay far inside int64, and no device has more memory
MAX_SCRATCH_MIB = 2**40
_INT64 = (-(2**63), 2**63 - 1)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_backend(backend: str) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_number(name: str, value: object, *, optional: bool = False, what: str = "a positive number") -> None:
    """A finite real number > 0 (a Python or NumPy float or int, not a bool or a string), or None if ``optional``."""
    if optional and value is None:
        return
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and finite(value) and value > 0):
        expected = what + (" or None" if optional else "")
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def check_flag(name: str, value: object, *, optional: bool = False) -> None:
    """A bool (or None if ``optional``)."""
    if not (isinstance(value, bool) or (optional and value is None)):
        raise ValueError(f"{name} must be True or False{' or None' if optional else ''}, got {value!r}")


def check_ignore_index(ignore_index: object) -> None:
    if not (
        isinstance(ignore_index, numbers.Integral)
        and not isinstance(ignore_index, bool)
        and _INT64[0] <= ignore_index <= _INT64[1]
    ):
        raise ValueError(
            f"ignore_index must be an int in the int64 range (the label of positions without a target, "
            f"usually -100), got {ignore_index!r}"
        )


def check_scratch_mib(scratch_mib: object) -> None:
    what = "a positive number of MiB up to 2**40"
    check_number("scratch_mib", scratch_mib, optional=True, what=what)
    if scratch_mib is not None and scratch_mib > MAX_SCRATCH_MIB:
        raise ValueError(f"scratch_mib must be {what} or None, got {scratch_mib!r}")


def check_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
    temperature: float,
    logit_scale: float = 1.0,
) -> None:
    """The hidden states and the LM head: dtypes, shapes, devices and the logit transform's numbers."""
    if not isinstance(hidden, torch.Tensor) or hidden.dtype not in FLOAT_DTYPES:
        raise ValueError(f"hidden must be a floating-point tensor, got {_describe(hidden)}")
    if hidden.dim() < 2:
        raise ValueError(f"hidden must have shape (..., H), got {tuple(hidden.shape)}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"weight must be a (V, H) floating-point tensor, got {_describe(weight)}")
    vocab, hidden_dim = weight.shape
    if hidden.shape[-1] != hidden_dim:
        raise ValueError(
            f"hidden's last dimension ({hidden.shape[-1]}) must equal weight's second dimension H ({hidden_dim}); "
            "weight is the (V, H) lm_head weight, e.g. model.lm_head.weight"
        )
    if vocab == 0 or hidden_dim == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    if bias is not None and (
        not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (vocab,) or bias.dtype not in FLOAT_DTYPES
    ):
        raise ValueError(f"bias must be a ({vocab},) floating-point tensor or None, got {_describe(bias)}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}; move them together")
    check_number("softcap", softcap, optional=True)
    check_number("temperature", temperature)
    check_number("logit_scale", logit_scale)


def check_labels(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> None:
    """Targets: an integer tensor of hidden's leading shape, on its device."""
    if not isinstance(labels, torch.Tensor) or labels.dtype not in INDEX_DTYPES:
        raise ValueError(f"labels must be an int64 (or int32) tensor, got {_describe(labels)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if labels.device != hidden.device:
        raise ValueError(f"labels is on {labels.device} but hidden is on {hidden.device}; move them together")
    check_ignore_index(ignore_index)


def check_label_values(labels: torch.Tensor, vocab: int, ignore_index: int, name: str = "labels") -> None:
    if _compiling() or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"{name} must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {value}. "
            "Mask prompt and padding positions with ignore_index."
        )


def check_segment_ids(segment_ids: torch.Tensor, num_tokens: int, device: torch.device) -> None:
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dtype not in INDEX_DTYPES:
        raise ValueError(f"segment_ids must be an int64 (or int32) tensor, got {_describe(segment_ids)}")
    if tuple(segment_ids.shape) != (num_tokens,):
        raise ValueError(
            f"segment_ids must have shape ({num_tokens},), one sequence id per token, got {tuple(segment_ids.shape)}"
        )
    if segment_ids.device != device:
        raise ValueError(f"segment_ids is on {segment_ids.device} but hidden is on {device}")


def check_num_segments(num_segments: object, name: str = "num_segments") -> None:
    """A positive int: the number of sequences R (segment ids lie in [0, R)), or ``num_pairs`` P."""
    if not (isinstance(num_segments, numbers.Integral) and not isinstance(num_segments, bool) and num_segments >= 1):
        what = "(the number of sequences R; segment ids lie in [0, R))" if name == "num_segments" else "P"
        raise ValueError(f"{name} must be a positive int {what}, got {num_segments!r}")


def segment_values(
    labels: torch.Tensor, segment_ids: torch.Tensor, num_segments: int, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and segment ids (N,) with every segment id in ``[0, num_segments)``.

    Eager: a ``ValueError`` for an id out of range; the inputs are returned as they are. While
    compiling: such a token is moved to a segment in range and given the label ``vocab``, whose
    log-prob every backend returns as NaN: the sums, the loss and the gradients show it.
    """
    if segment_ids.numel() == 0:
        return labels, segment_ids
    bad = (segment_ids < 0) | (segment_ids >= num_segments)
    if _compiling():
        return labels.masked_fill(bad, vocab), segment_ids.clamp(0, num_segments - 1)
    if bool(bad.any()):
        low, high = int(segment_ids.min()), int(segment_ids.max())
        raise ValueError(f"segment_ids must lie in [0, {num_segments}), found values in [{low}, {high}]")
    return labels, segment_ids


def check_desirable(desirable: object, num_sequences: int, device: torch.device) -> None:
    """KTO's (B,) bool labels: True for a desirable completion."""
    if (
        not isinstance(desirable, torch.Tensor)
        or desirable.dtype != torch.bool
        or tuple(desirable.shape) != (num_sequences,)
    ):
        raise ValueError(
            f"desirable must be a ({num_sequences},) bool tensor, True for a desirable completion (TRL's label), "
            f"got {_describe(desirable)}"
        )
    if desirable.device != device:
        raise ValueError(f"desirable is on {desirable.device} but hidden is on {device}")


def check_kl(kl: object, device: torch.device) -> None:
    """KTO's KL estimate: a finite number or a () / (1,) floating-point tensor (values unchecked: it may be traced)."""
    if kl is None:
        raise ValueError(
            "kl is required for loss_type='kto': the batch's KL estimate (dpo_fast.objectives.kto_kl_estimate of "
            "the policy's and the reference's log-probs of mismatched pairs), or 0.0 for KTO without it"
        )
    if isinstance(kl, torch.Tensor):
        if not kl.is_floating_point() or kl.numel() != 1 or kl.dim() > 1:
            raise ValueError(f"kl must be a number or a () floating-point tensor, got {_describe(kl)}")
        if kl.device != device:
            raise ValueError(f"kl is on {kl.device} but hidden is on {device}")
        return
    if not (isinstance(kl, numbers.Real) and not isinstance(kl, bool) and finite(kl)):
        raise ValueError(
            f"kl must be a finite number or a () tensor (the batch's KL estimate, e.g. "
            f"dpo_fast.objectives.kto_kl_estimate), got {kl!r}"
        )


def check_nll_labels(nll_labels: object, labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """ORPO's NLL targets: labels' shape, and the same target wherever both hold one (a token has one target)."""
    if not isinstance(nll_labels, torch.Tensor) or nll_labels.dtype not in INDEX_DTYPES:
        raise ValueError(f"nll_labels must be an int64 (or int32) tensor, got {_describe(nll_labels)}")
    if tuple(nll_labels.shape) != tuple(labels.shape) or nll_labels.device != labels.device:
        raise ValueError(
            f"nll_labels must have labels' shape {tuple(labels.shape)} and device {labels.device}, got "
            f"{_describe(nll_labels)} on {nll_labels.device}"
        )
    check_label_values(nll_labels, vocab, ignore_index, name="nll_labels")
    if _compiling():
        return
    both = (labels != ignore_index) & (nll_labels != ignore_index)
    if bool((both & (labels != nll_labels)).any()):
        raise ValueError(
            "nll_labels must equal labels wherever both are not ignore_index (each position has one next token: "
            "nll_labels only unmask more of them, e.g. the prompt's)"
        )


def check_reference(
    ref_chosen_logps: torch.Tensor | None, ref_rejected_logps: torch.Tensor | None, num_pairs: int, device: torch.device
) -> None:
    """A pairwise objective's reference log-probs, (P,) each."""
    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(
            "ref_chosen_logps and ref_rejected_logps are both required (the reference model's summed log-probs, "
            "e.g. from dpo_fast.sequence_logps under torch.no_grad()); pass reference_free=True to train without them"
        )
    for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        check_sequence_values(name, ref, num_pairs, device)


def check_reference_logps(ref_logps: object, size: int, device: torch.device) -> None:
    """KTO's (B,) summed reference log-probs."""
    if ref_logps is None:
        raise ValueError(
            "ref_logps is required (the reference model's summed log-probs of the completions, e.g. from "
            "dpo_fast.sequence_logps under torch.no_grad()); pass reference_free=True to train without them"
        )
    check_sequence_values("ref_logps", ref_logps, size, device)


def check_sequence_values(name: str, values: object, size: int, device: torch.device) -> None:
    """A (size,) floating-point tensor of per-sequence values (reference log-probs) on ``device``."""
    if not isinstance(values, torch.Tensor) or not values.is_floating_point() or tuple(values.shape) != (size,):
        raise ValueError(f"{name} must be a ({size},) floating-point tensor, got {_describe(values)}")
    if values.device != device:
        raise ValueError(f"{name} is on {values.device} but hidden is on {device}")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"[:200]
