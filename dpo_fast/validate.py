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

import math
import numbers

import torch

from .backends import NAMES as BACKENDS
from .objectives import LOSS_TYPES

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
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
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
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
    temperature: float,
    ignore_index: int,
) -> None:
    """Checks shared by every entry point: the LM head and the targets."""
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
    if not isinstance(labels, torch.Tensor) or labels.dtype not in INDEX_DTYPES:
        raise ValueError(f"labels must be an int64 (or int32) tensor, got {_describe(labels)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if bias is not None and (
        not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (vocab,) or bias.dtype not in FLOAT_DTYPES
    ):
        raise ValueError(f"bias must be a ({vocab},) floating-point tensor or None, got {_describe(bias)}")
    for name, tensor in (("weight", weight), ("labels", labels), ("bias", bias)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}; move them together")
    check_number("softcap", softcap, optional=True)
    check_number("temperature", temperature)
    check_ignore_index(ignore_index)


def check_label_values(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    if _compiling() or labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(
            f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; found {value}. "
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


def check_num_segments(num_segments: object) -> None:
    if not (isinstance(num_segments, numbers.Integral) and not isinstance(num_segments, bool) and num_segments >= 1):
        raise ValueError(
            f"num_segments must be a positive int (the number of sequences R; segment ids lie in [0, R)), "
            f"got {num_segments!r}"
        )


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


def check_objective(beta: float, loss_type: str, label_smoothing: float) -> None:
    if not isinstance(loss_type, str) or loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    check_number("beta", beta)
    if not (isinstance(label_smoothing, numbers.Real) and not isinstance(label_smoothing, bool)):
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if loss_type == "sigmoid" and not 0 <= label_smoothing <= 0.5:
        raise ValueError(
            f"label_smoothing must lie in [0, 0.5] for loss_type='sigmoid' (cDPO's probability that a pair's "
            f"preference is flipped; above 0.5 the loss prefers the rejected completion), got {label_smoothing!r}"
        )
    if loss_type == "robust" and not 0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) for loss_type='robust', got {label_smoothing!r}")
    if loss_type == "exo_pair" and not 0 < label_smoothing < 1:
        raise ValueError(
            f"label_smoothing must lie in (0, 1) for loss_type='exo_pair' (it is EXO's epsilon; the paper uses 1e-3), "
            f"got {label_smoothing!r}"
        )
    if not 0 <= label_smoothing <= 1:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")


def check_reference(
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    reference_free: bool,
    num_pairs: int,
    device: torch.device,
) -> None:
    given = (ref_chosen_logps is not None, ref_rejected_logps is not None)
    if reference_free:
        return
    if given != (True, True):
        raise ValueError(
            "ref_chosen_logps and ref_rejected_logps are both required (the reference model's summed log-probs, "
            "e.g. from dpo_fast.sequence_logps under torch.no_grad()); pass reference_free=True to train without them"
        )
    for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if not isinstance(ref, torch.Tensor) or not ref.is_floating_point() or tuple(ref.shape) != (num_pairs,):
            raise ValueError(f"{name} must be a ({num_pairs},) floating-point tensor, got {_describe(ref)}")
        if ref.device != device:
            raise ValueError(f"{name} is on {ref.device} but hidden is on {device}")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"[:200]
