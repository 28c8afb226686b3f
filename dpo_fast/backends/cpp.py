"""The ``cpp`` backend: the C++ CPU kernel of ``csrc/cpu/`` on one chunk of tokens.

Each chunk's logits are formed by one ATen matmul straight into their destination (the kept
logits, or the float32 ``dL/dx`` itself; a 16-bit head one vocabulary block at a time from a
float32 copy of the block) and finished in place by fused row passes, parallel over tokens: head,
online logsumexp, target gather, entropy statistics; then ``dL/dx`` written over the logits. No
other ``(C, V)`` temporary exists, so a chunk holds four times as many tokens as the ``torch``
backend's under the same budget.
Built ahead of time by ``setup.py`` or just in time on first use (``dpo_fast._build``).
"""

from __future__ import annotations

import torch

from .. import _build
from . import Chunk, ChunkStats, accumulate_dtype, extension

NAME = "cpp"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cpu":
        return f"it runs on CPU tensors (got {device.type}); for CUDA tensors use backend='cuda' or 'triton'"
    if dtype not in _DTYPES:
        return f"it takes float32, bfloat16, float16 or float64 inputs, not {dtype}"
    return _build.unavailable_reason(NAME)


def is_built() -> bool:
    """Whether the extension is ready without compiling (``auto`` never starts a build)."""
    return _build.is_built(NAME)


def scratch_bytes_per_logit(keep_logits: bool, dtype: torch.dtype) -> int:
    # the logits in the accumulate dtype, and dL/dx written over them (float32, float64) or beside
    # them (16-bit: the same count whether they are kept or a block scratch)
    accumulate = accumulate_dtype(dtype).itemsize
    return accumulate if dtype.itemsize == accumulate else accumulate + dtype.itemsize


def logits_stats(chunk: Chunk, with_metrics: bool, keep_logits: bool) -> ChunkStats:
    return extension.logits_stats(_build.load(NAME), chunk, with_metrics, keep_logits)


def logits_grad(chunk: Chunk, stats: ChunkStats, grad_logp: torch.Tensor,
                grad_entropy: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    return extension.logits_grad(_build.load(NAME), chunk, stats, grad_logp, grad_entropy)
