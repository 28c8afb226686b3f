"""Argument checks for the public API: a clear ``ValueError`` naming the argument and the fix.

Shape, dtype and option checks cost nothing and always run. Checks of tensor *values* (labels in
``[0, V)``, segment ids in range) need one device synchronisation; they run in eager mode and are
skipped while ``torch.compile`` traces, so that a compiled model has no graph break here.
"""

from __future__ import annotations

import math

import torch

from .backends import NAMES as BACKENDS
from .objectives import LOSS_TYPES

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
    temperature: float,
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
    if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an int64 (or int32) tensor, got {_describe(labels)}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}"
        )
    for name, tensor in (("weight", weight), ("labels", labels), ("bias", bias)):
        if tensor is not None and tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device} but hidden is on {hidden.device}; move them together")
    if bias is not None and (
        not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (vocab,) or bias.dtype not in FLOAT_DTYPES
    ):
        raise ValueError(f"bias must be a ({vocab},) floating-point tensor, got {_describe(bias)}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")


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


def check_segment_ids(segment_ids: torch.Tensor, num_tokens: int, num_segments: int, device: torch.device) -> None:
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"segment_ids must be an int64 (or int32) tensor, got {_describe(segment_ids)}")
    if tuple(segment_ids.shape) != (num_tokens,):
        raise ValueError(
            f"segment_ids must have shape ({num_tokens},), one sequence id per token, got {tuple(segment_ids.shape)}"
        )
    if segment_ids.device != device:
        raise ValueError(f"segment_ids is on {segment_ids.device} but hidden is on {device}")
    if _compiling() or num_tokens == 0:
        return
    low, high = int(segment_ids.min()), int(segment_ids.max())
    if low < 0 or high >= num_segments:
        raise ValueError(f"segment_ids must lie in [0, {num_segments}), found values in [{low}, {high}]")


def check_objective(beta: float, loss_type: str, label_smoothing: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive number, got {beta!r}")
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
    return type(value).__name__
