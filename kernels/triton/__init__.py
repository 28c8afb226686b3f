"""Triton kernels of dpo_fast (installed as ``dpo_fast.kernels``), one kernel per module.

- ``logits_stats``: the forward row pass: fused ``h W^T`` tiles, online logsumexp, target gather and
  the token metrics, returning the fields of ``dpo_fast.backends.contract.ChunkStats`` in order.
- ``logits_grad``: ``dL/dx`` tiles from recomputed (or kept) logits, formed in registers.
- ``logits_tile`` (device function): one tile of logits, shared by the two.
- ``config``: launch parameters (tiles, warps, stages, precision), computable without a device.
- ``aot``: ahead-of-time compile of every variant for a GPU target, with registers, spills and shared memory.

They take tensors and numbers only and know nothing of the package around them.

setup.py installs this folder, ``kernels/triton/``, as ``dpo_fast.kernels``. Its parent ``kernels/`` has no
``__init__.py``: from the repository root (first on ``sys.path`` under ``python -m pytest``, ``python -c``, a
notebook) ``import kernels`` then finds the installed ``kernels`` package that transformers imports, never
this folder, and these sources refuse to load under any other name.
"""

if __name__ != "dpo_fast.kernels":
    raise ImportError(f"{__file__} is the package dpo_fast.kernels; import it under that name, not as {__name__!r}")

from .logits_grad import logits_grad
from .logits_stats import logits_stats

__all__ = ["logits_grad", "logits_stats"]
