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

from .. import _build
from .contract import Chunk, ChunkStats, HeadSpec, accumulate_dtype

__all__ = [
    "CHUNKED_BACKENDS", "NAMES", "Chunk", "ChunkStats", "HeadSpec", "accumulate_dtype", "float32_matmul_precision", "get",
    "resolve",
]  # fmt: skip

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


def float32_matmul_precision() -> str:
    """``"tf32"`` when torch allows TF32 for float32 CUDA matmuls, else ``"ieee"``.

    Reads torch's precision API of torch >= 2.9 (``torch.backends.cuda.matmul.fp32_precision``, which
    ``allow_tf32`` and ``torch.set_float32_matmul_precision`` also set; ``"none"`` inherits the global
    ``torch.backends.fp32_precision``) where it exists, and ``allow_tf32`` on older torch: newer torch
    raises on reading ``allow_tf32`` once the new API has been used.
    """
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision
    except AttributeError:
        return "tf32" if matmul.allow_tf32 else "ieee"
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    return "tf32" if precision == "tf32" else "ieee"


def _usable(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    return get(name).unavailable_reason(device, dtype) is None


# Run, not traced, under torch.compile: the answer depends only on the installation, the precision
# settings and the arguments.
@torch.compiler.assume_constant_result
def resolve(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turn ``auto`` into a concrete backend and check that the backend can run on ``device``.

    ``auto`` picks by device and by the precision of the logits product:

    - CUDA tensors in bfloat16 or float16, or float32 with TF32 allowed for matmuls
      (``float32_matmul_precision() == "tf32"``): ``triton``, whose fused kernels run those products
      on tensor cores, when Triton is installed.
    - CUDA tensors in exact float32 (torch's default: TF32 not allowed), float64, or without Triton:
      the products through cuBLAS, whose IEEE float32 GEMM is faster than Triton's float32 tiles
      without tensor cores (plain FMA): ``cuda`` when its extension is built and takes the dtype,
      else ``torch``.
    - CPU tensors: ``cpp`` when its extension is built, being faster than ``torch`` there
      (measured, csrc/README.md); ``torch`` otherwise.

    ``auto`` never starts a build of an extension. The GPU choices follow the kernels' design and
    are not yet measured on a GPU.
    """
    if name == "auto":
        if device.type == "cuda":
            tensor_cores = dtype in (torch.bfloat16, torch.float16) or (
                dtype == torch.float32 and float32_matmul_precision() == "tf32"
            )
            if tensor_cores and _usable("triton", device, dtype):
                return "triton"
            if _build.is_built("cuda") and _usable("cuda", device, dtype):
                return "cuda"
            return "torch"
        if device.type == "cpu" and get("cpp").is_built() and _usable("cpp", device, dtype):
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
