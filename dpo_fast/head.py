"""The language-model head, and the one rule for the dtype its product runs in.

``z = softcap * tanh(logit_scale * (h W^T + b) / softcap) / temperature`` (softcap optional): ``logit_scale`` is
the multiplier some models apply before any soft-capping (Cohere, Granite, ...), folded into ``h`` and ``b``;
``softcap`` and ``temperature`` are applied by the kernels (``backends.HeadSpec``).

**Precision.** The product runs in the hidden states' dtype (the weight and bias are cast to it); every
statistic, sum and loss accumulates in float32 (float64 for float64 inputs). Under ``torch.autocast`` the head
runs as ``F.linear`` would: the hidden states, weight and bias are cast to the autocast dtype (float64 ones are
left alone, as autocast leaves them), then the kernels run with autocast off, so every backend sees the same
operands; gradients flow back through the casts to each input's own dtype.

**Vocabulary-parallel heads.** ``weight`` (and ``bias``) may be a ``DTensor`` placed ``Shard(0)`` on a 1-D
tensor-parallel mesh (``dpo_fast.vocab_parallel``): ``shard`` reads this rank's rows from it, ``operands`` hands
the kernels the local rows, and their gradients come back as the DTensor's shards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from . import validate, vocab_parallel
from .backends import HeadSpec
from .vocab_parallel import VocabShard


@dataclass
class LMHead:
    """The head as dpo_fast runs it.

    Attributes:
        weight: (V, H) ``lm_head.weight`` (the input embedding when tied); a ``DTensor`` ``Shard(0)`` on a 1-D mesh
            for a head sharded over the vocabulary.
        bias: (V,) or None; sharded as ``weight`` when it is.
        softcap: the final logit soft-capping (Gemma 2), or None.
        temperature: the logits are divided by it after soft-capping.
        logit_scale: the logits are multiplied by it before soft-capping.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None
    temperature: float = 1.0
    logit_scale: float = 1.0

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    @property
    def shard(self) -> VocabShard | None:
        """This rank's rows of a vocabulary-parallel head (``vocab_parallel.shard_of``), or None for a whole one."""
        return vocab_parallel.shard_of(self.weight, self.bias)

    @property
    def spec(self) -> HeadSpec:
        """What the kernels apply to ``x = h W^T + b``."""
        return HeadSpec(None if self.softcap is None else float(self.softcap), float(self.temperature))

    def check(self, hidden: torch.Tensor) -> None:
        """A ``ValueError`` naming what does not fit ``hidden`` (..., H)."""
        validate.check_head(hidden, self.weight, self.bias, self.softcap, self.temperature, self.logit_scale)

    def operands(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(hidden, weight, bias) in the product's dtype (the module's precision rule), ``logit_scale`` folded in; of a
        vocabulary-parallel head, this rank's rows (and a replicated DTensor ``hidden``'s local copy).

        Differentiable: the gradients reach each input in its own dtype through the casts (a DTensor's as its
        shards).
        """
        hidden = vocab_parallel.local_hidden(hidden)
        weight, bias = vocab_parallel.local_operands(self.weight, self.bias)
        dtype = compute_dtype(hidden)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        if self.logit_scale != 1.0:
            hidden = hidden * self.logit_scale
            bias = None if bias is None else bias * self.logit_scale
        return hidden, weight, bias


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the head's product runs in: autocast's for ``hidden``'s device when it is on (float64 excepted),
    else ``hidden``'s."""
    device = hidden.device.type
    if hidden.dtype != torch.float64 and device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def autocast_off(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off for ``tensor``'s device: the kernels and their products run in the dtypes ``LMHead.operands``
    chose, also when autograd runs a backward inside a user's autocast region."""
    device = tensor.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()
