"""The chunk entry points of a compiled extension: ``csrc/cpu`` (``cpp``) and ``csrc/cuda`` (``cuda``) bind one
signature (``csrc/common.h``), so their adapters call them through here.

The bindings check every input themselves (dtypes, devices, shapes, strides) and return the statistics as a tuple in
``ChunkStats``' field order.
"""

from __future__ import annotations

from types import ModuleType

import torch

from .contract import Chunk, ChunkStats


def logits_stats(module: ModuleType, chunk: Chunk, with_metrics: bool, keep_logits: bool) -> ChunkStats:
    """``module.logits_stats`` on ``chunk``."""
    return ChunkStats.from_kernel(module.logits_stats(
        chunk.hidden, chunk.weight, chunk.bias, chunk.rows, chunk.targets, chunk.head.softcap, chunk.head.temperature,
        with_metrics, keep_logits,
    ))  # fmt: skip


def logits_grad(module: ModuleType, chunk: Chunk, stats: ChunkStats, grad_logp: torch.Tensor,
                grad_entropy: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """``module.logits_grad`` on ``chunk`` (the entropy's statistics only when its gradient is asked for)."""
    return module.logits_grad(
        chunk.hidden, chunk.weight, chunk.bias, chunk.rows, chunk.targets, stats.max_logit, stats.log_sum_exp,
        None if grad_entropy is None else stats.mean_shifted, grad_logp, grad_entropy, chunk.head.softcap,
        chunk.head.temperature, stats.logits,
    )  # fmt: skip
