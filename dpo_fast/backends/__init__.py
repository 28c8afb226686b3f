"""Backends: one adapter module per implementation of the LM-head work on a chunk of tokens.

Every chunked backend (``torch``, ``triton``, ...) is a module with the same members:

``NAME``
    its name in the public ``backend=`` argument.
``unavailable_reason(device, dtype) -> str | None``
    why it cannot run here (and how to get it), or None when it can.
``scratch_bytes_per_logit(keep_logits, dtype) -> int``
    the scratch memory one logit costs it, used to size chunks under the memory budget.
``logits_stats(hidden, weight, bias, rows, targets, head, with_entropy, keep_logits) -> ChunkStats``
    the forward work on the tokens ``rows`` of ``hidden``.
``logits_grad(hidden, weight, bias, rows, targets, stats, grad_logp, grad_entropy, head) -> Tensor``
    ``dL/dz`` for those tokens, ``(C, V)`` in the compute dtype.

The products with ``dL/dz`` and the loops over chunks are shared (``dpo_fast.chunking``). The
``reference`` backend is not chunked: it materializes the logits (``dpo_fast.backends.reference``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import torch

CHUNKED_BACKENDS = {
    "torch": "dpo_fast.backends.torch_chunked",
    "triton": "dpo_fast.backends.triton",
    "cpp": "dpo_fast.backends.cpp",
    "cuda": "dpo_fast.backends.cuda",
}


@dataclass(frozen=True)
class HeadSpec:
    """How logits are formed from ``h W^T + b``: ``z = softcap*tanh(x/softcap) / temperature``."""

    softcap: float | None = None
    temperature: float = 1.0


@dataclass
class ChunkStats:
    """Per-token results of the forward work on one chunk of C tokens (float32; float64 inputs stay float64).

    The normalizer is kept in two parts, ``lse = max_logit + log_sum_exp``, as ``log_softmax`` does:
    ``z - max_logit`` is exact for the top logit, so a near-certain token keeps its small
    ``log p`` and ``1 - p`` instead of losing them to the rounding of ``lse``.

    Attributes:
        max_logit: (C,) ``max_v z``.
        log_sum_exp: (C,) ``log sum_v exp(z - max_logit)``.
        target_logit: (C,) logit of each token's target.
        mean_shifted: (C,) ``E_p[z] - max_logit``, when the entropy was asked for.
        logits: (C, V) the logits, when kept for the gradient pass (which consumes them).
    """

    max_logit: torch.Tensor
    log_sum_exp: torch.Tensor
    target_logit: torch.Tensor | None = None
    mean_shifted: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    @property
    def logp(self) -> torch.Tensor:
        return (self.target_logit - self.max_logit) - self.log_sum_exp

    @property
    def entropy(self) -> torch.Tensor:
        return self.log_sum_exp - self.mean_shifted


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 accumulation for every input dtype but float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def get(name: str) -> ModuleType:
    """The adapter module of a chunked backend."""
    return importlib.import_module(CHUNKED_BACKENDS[name])


# Run, not traced, under torch.compile: the answer depends only on the installation and arguments.
@torch.compiler.assume_constant_result
def resolve(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turn ``auto`` into a concrete backend and check that the backend can run on ``device``.

    ``auto`` picks, by measurement (csrc/README.md): ``triton`` for CUDA tensors when Triton is
    installed (the ``cuda`` backend has no GPU measurement yet); ``cpp`` for CPU tensors when its
    extension is already built (``auto`` never starts a build), being faster than ``torch`` there;
    ``torch`` otherwise.
    """
    if name == "auto":
        if device.type == "cuda" and get("triton").unavailable_reason(device, dtype) is None:
            return "triton"
        if device.type == "cpu" and get("cpp").is_built() and get("cpp").unavailable_reason(device, dtype) is None:
            return "cpp"
        return "torch"
    if name == "reference":
        return name
    if name not in CHUNKED_BACKENDS:
        raise ValueError(
            f"backend={name!r} is not built into this version of dpo_fast; available: "
            f"{('auto', 'reference', *CHUNKED_BACKENDS)}"
        )
    reason = get(name).unavailable_reason(device, dtype)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run here: {reason}")
    return name
