"""The backend contract: what every chunked backend computes for a chunk of tokens, and in what order.

A chunked backend (``torch``, ``triton``, ``cpp``, ``cuda``) is a module with these members:

``NAME``
    its name in the public ``backend=`` argument.
``unavailable_reason(device, dtype) -> str | None``
    why it cannot run here (and how to get it), or None when it can.
``scratch_bytes_per_logit(keep_logits, dtype) -> int``
    the scratch memory one logit costs it, used to size chunks under the memory budget.
``logits_stats(chunk, with_metrics, keep_logits) -> ChunkStats``
    the forward row pass on the tokens of a ``Chunk``.
``logits_grad(chunk, stats, grad_logp, grad_entropy) -> Tensor``
    ``dL/dx`` for those tokens, ``(C, V)`` in the compute dtype, for the pre-head logits ``x = h W^T + b``.

Shapes and dtypes (``Chunk``): ``hidden (N, H)`` and ``weight (V, H)`` of one dtype (float32, bfloat16,
float16; float64 where the backend takes it), any strides; ``bias (V,)`` of that dtype, any stride, or
None; ``rows, targets (C,)`` int64. Statistics are in ``accumulate_dtype(hidden.dtype)``.

Numerics every backend honours (tested in ``tests/kernels/test_contract.py`` against float64):

- ``-inf`` logits (a masked vocabulary entry, e.g. a ``-inf`` bias) take no probability: the exact,
  finite log-probs, entropy and gradients of the other entries, whatever block or split they fall in.
- A token whose logits hold ``+inf`` or NaN, or are all ``-inf``, gets NaN statistics: an error that
  shows, never a plausible number.
- A target outside ``[0, V)`` gets ``target_logit = NaN`` (so ``logp`` is NaN); kernels never read
  outside the weight for it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass(frozen=True)
class HeadSpec:
    """How logits are formed from ``x = h W^T + b``: ``z = softcap*tanh(x/softcap) / temperature``."""

    softcap: float | None = None
    temperature: float = 1.0


@dataclass
class Chunk:
    """C tokens of a pass through the head: the rows ``rows`` of ``hidden`` and their ``targets``.

    Attributes:
        hidden: (N, H) every token of the pass; weight: (V, H); bias: (V,) or None.
        rows: (C,) int64, the chunk's tokens (indices into ``hidden``); targets: (C,) int64, their labels.
        head: the logit transform.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    rows: torch.Tensor
    targets: torch.Tensor
    head: HeadSpec

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]


@dataclass
class ChunkStats:
    """Per-token results of the forward row pass on one chunk of C tokens, in the accumulate dtype.

    The fields are listed in the order in which the kernels return them (the Triton launcher and the
    C++ and CUDA bindings return a tuple in this order; ``from_kernel`` reads it). The three
    ``with_metrics`` fields are None unless asked for; ``logits`` is None unless kept.

    The normalizer is kept in two parts, ``lse = max_logit + log_sum_exp``, as ``log_softmax`` does:
    ``z - max_logit`` is exact for the top logit, so a near-certain token keeps its small
    ``log p`` and ``1 - p`` instead of losing them to the rounding of ``lse``.

    Attributes:
        max_logit: (C,) ``m = max_v z``.
        log_sum_exp: (C,) ``log sum_v exp(z - m)``.
        target_logit: (C,) ``z[target]``; NaN for a target outside ``[0, V)``.
        mean_shifted: (C,) ``E_p[z] - m`` (with_metrics): the entropy is ``log_sum_exp - mean_shifted``.
        mean_logit: (C,) ``mean_v z`` (with_metrics): TRL's ``logits/chosen`` and ``logits/rejected``.
        log_sum_sq_probs: (C,) ``log sum_v p_v^2`` (with_metrics): WPO's per-token weight adjustment.
        logits: (C, V) the post-head logits ``z``, when kept for the gradient pass (which consumes them).
    """

    max_logit: torch.Tensor
    log_sum_exp: torch.Tensor
    target_logit: torch.Tensor | None = None
    mean_shifted: torch.Tensor | None = None
    mean_logit: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    @classmethod
    def from_kernel(cls, values: tuple) -> ChunkStats:
        """From a kernel's tuple in field order (None where a field was not computed)."""
        names = [field.name for field in fields(cls)]
        if len(values) != len(names):
            raise RuntimeError(f"a backend returned {len(values)} chunk statistics; the contract has {names}")
        return cls(*values)

    @property
    def logp(self) -> torch.Tensor:
        """(C,) ``log softmax(z)[target]``."""
        return (self.target_logit - self.max_logit) - self.log_sum_exp

    @property
    def entropy(self) -> torch.Tensor:
        """(C,) ``-sum_v p_v log p_v`` (with_metrics)."""
        return self.log_sum_exp - self.mean_shifted

    @property
    def is_top1(self) -> torch.Tensor:
        """(C,) bool: the target's logit is the largest (TRL's ``argmax == label``, up to exact ties)."""
        return self.target_logit == self.max_logit


STATS_FIELDS = tuple(field.name for field in fields(ChunkStats))
METRIC_FIELDS = ("mean_shifted", "mean_logit", "log_sum_sq_probs")


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 accumulation for every input dtype but float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32
