"""The ``triton`` backend: the fused kernels of ``dpo_fast.kernels`` on one chunk of tokens.

Forward: one fused kernel (``h W^T`` tiles, online logsumexp, target gather, token metrics) reads
the valid rows in place; no logits exist outside registers unless they are kept for a gradient
pass. Backward: one kernel forms ``dL/dx`` tiles in registers (from recomputed or kept logits) and
writes them once in the compute dtype; the two products with it run as matmuls (cuBLAS) on that
bounded chunk. ``kernels/README.md`` gives the launch configurations and their sm_90 compile report.
Runs on CUDA tensors, and on CPU tensors inside Triton's interpreter (``TRITON_INTERPRET=1``; its
``tl.dot`` multiplies bfloat16 bit patterns as integers in triton 3.6 to 3.9, which ``triton_interpreter``
fixes before the first launch).

The kernels read every tensor with unit stride along its last dimension and the 1-D ones
contiguous; this adapter hands them such views (copying only what is not already laid out so), so
that strided, sliced, transposed or expanded arguments give the contiguous answer and no read
leaves their storage.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch

from . import Chunk, ChunkStats, float32_matmul_precision

NAME = "triton"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton; CUDA builds of PyTorch on Linux include it)"
    if dtype not in _DTYPES:
        return f"the Triton kernels take float32, bfloat16 or float16 inputs, not {dtype}; use backend='torch'"
    if device.type == "cuda" or (device.type == "cpu" and _interpreting()):
        return None
    return (
        f"it needs CUDA tensors (got {device.type}); on CPU Triton runs only in its interpreter, enabled by "
        "TRITON_INTERPRET=1 in the environment before triton is imported (slow: for tests); or use backend='torch'"
    )


@functools.cache
def _kernels() -> ModuleType:
    """``dpo_fast.kernels``, imported on first use, with the interpreter's bfloat16 fix when it interprets."""
    if _interpreting():
        from .triton_interpreter import patch_bf16_dot

        patch_bf16_dot()
    return importlib.import_module("dpo_fast.kernels")


def scratch_bytes_per_logit(keep_logits: bool, dtype: torch.dtype) -> int:
    # kept logits are float32; dL/dx is written in the compute dtype
    return (4 if keep_logits else 0) + dtype.itemsize


def _unit_stride(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """A view with unit stride along the last dimension (rows may be strided), copied only if needed."""
    return tensor if tensor is None or tensor.stride(-1) == 1 else tensor.contiguous()


def _contiguous(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """1-D arguments (bias, rows, targets, per-token statistics): read as dense arrays by the kernels."""
    return None if tensor is None else tensor.contiguous()


def logits_stats(chunk: Chunk, with_metrics: bool, keep_logits: bool) -> ChunkStats:
    return ChunkStats.from_kernel(_kernels().logits_stats(
        _unit_stride(chunk.hidden), _unit_stride(chunk.weight), _contiguous(chunk.bias), _contiguous(chunk.rows),
        _contiguous(chunk.targets), chunk.head.softcap, chunk.head.temperature, with_metrics, keep_logits,
        float32_matmul_precision(),
    ))  # fmt: skip


def logits_grad(chunk: Chunk, stats: ChunkStats, grad_logp: torch.Tensor,
                grad_entropy: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    return _kernels().logits_grad(
        _unit_stride(chunk.hidden), _unit_stride(chunk.weight), _contiguous(chunk.bias), _contiguous(chunk.rows),
        _contiguous(chunk.targets), _contiguous(stats.max_logit), _contiguous(stats.log_sum_exp),
        None if grad_entropy is None else _contiguous(stats.mean_shifted), _contiguous(grad_logp),
        _contiguous(grad_entropy), chunk.head.softcap, chunk.head.temperature, _unit_stride(stats.logits),
        float32_matmul_precision(),
    )  # fmt: skip
