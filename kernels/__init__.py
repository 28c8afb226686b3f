"""Triton kernels of dpo_fast (installed as ``dpo_fast.kernels``).

- ``forward.lse_forward``: fused ``h W^T`` tiles, online logsumexp, target gather, entropy statistics.
- ``backward.logits_grad``: ``dL/dx`` tiles from recomputed (or kept) logits, formed in registers.

They take tensors and numbers only and know nothing of the package around them.
"""

from .backward import logits_grad
from .forward import lse_forward

__all__ = ["lse_forward", "logits_grad"]
