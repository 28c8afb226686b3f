"""Backends: one adapter module per implementation of the LM-head work on a chunk of tokens.

What every chunked backend implements (its members, shapes, dtypes and numerics) is the contract of
``dpo_fast.backends.contract``; this module is the registry of the chunked backends and ``resolve``,
which turns ``backend="auto"`` into one of them.

The products with ``dL/dz`` and the loops over chunks are shared (``dpo_fast.chunking``). The
``reference`` backend is not chunked: it materializes the logits (``dpo_fast.backends.reference``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from .contract import ChunkStats, HeadSpec, accumulate_dtype

__all__ = ["CHUNKED_BACKENDS", "NAMES", "ChunkStats", "HeadSpec", "accumulate_dtype", "get", "resolve"]

CHUNKED_BACKENDS = {
    "torch": "dpo_fast.backends.torch_chunked",
    "triton": "dpo_fast.backends.triton",
    "cpp": "dpo_fast.backends.cpp",
    "cuda": "dpo_fast.backends.cuda",
}
# every value the public ``backend=`` argument takes
NAMES = ("auto", "reference", *CHUNKED_BACKENDS)


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
        raise ValueError(f"backend={name!r} is not built into this version of dpo_fast; available: {NAMES}")
    reason = get(name).unavailable_reason(device, dtype)
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run here: {reason}")
    return name
