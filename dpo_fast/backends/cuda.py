"""The ``cuda`` backend: cuBLAS products on a bounded chunk and fused CUDA row kernels (``csrc/cuda/``).

Forward: the chunk's float32 logits from one cuBLAS product (``at::mm`` with a float32 output for
16-bit operands), then one kernel, a thread block per token, applies the head and forms the online
logsumexp, target logit and (``with_metrics``) the token metrics in one read (writing the post-head
logits back when they are kept). Backward: one elementwise kernel writes ``dL/dx`` in the compute dtype from the kept
or recomputed logits (over them for float32 inputs); the two products with it are the shared ones.
The binding checks every input, makes the tensors' device current and runs on its current stream.
Built ahead of time by ``setup.py`` with a CUDA build of torch and nvcc, or just in time on first use.
"""

from __future__ import annotations

import torch

from .. import _build
from . import Chunk, ChunkStats, extension

NAME = "cuda"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cuda":
        return f"it runs on CUDA tensors (got {device.type}); on CPU use backend='cpp' or 'torch'"
    if dtype not in _DTYPES:
        return f"the CUDA kernels take float32, bfloat16 or float16 inputs, not {dtype}; use backend='torch'"
    return _build.unavailable_reason(NAME)


def scratch_bytes_per_logit(keep_logits: bool, dtype: torch.dtype) -> int:
    # the float32 logits from cuBLAS, and dL/dx written over them (float32) or beside them (16-bit)
    return 4 if dtype == torch.float32 else 4 + dtype.itemsize


def logits_stats(chunk: Chunk, with_metrics: bool, keep_logits: bool) -> ChunkStats:
    return extension.logits_stats(_build.load(NAME), chunk, with_metrics, keep_logits)


def logits_grad(chunk: Chunk, stats: ChunkStats, grad_logp: torch.Tensor,
                grad_entropy: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    return extension.logits_grad(_build.load(NAME), chunk, stats, grad_logp, grad_entropy)
