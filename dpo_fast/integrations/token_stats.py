"""The per-token statistics TRL's DPOTrainer logs: entropy, mean logit, whether the label is the top-1.

They are diagnostics, not part of the loss, so they are computed forward-only under ``no_grad`` on
bounded chunks of the valid tokens (``2*N_valid*H*V`` FLOPs, a few ``C x V`` float32 buffers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import chunking

# float32 logits, probabilities and their product, plus the product in the compute dtype
_BYTES_PER_LOGIT = 16


@dataclass
class TokenStats:
    """Float32 tensors with the labels' shape, 0 (False) at ignored positions.

    Attributes:
        entropy: entropy of ``softmax(z)``.
        mean_logit: mean of ``z`` over the vocabulary.
        is_top1: the label is the first argmax of ``z`` (bool).
    """

    entropy: torch.Tensor
    mean_logit: torch.Tensor
    is_top1: torch.Tensor


@torch.no_grad()
def token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    ignore_index: int = -100,
    scratch_mib: float | None = None,
) -> TokenStats:
    """Entropy, mean logit and top-1 hit of every valid token, ``z = softcap*tanh((h W^T + b)/softcap)``.

    Args:
        hidden: (..., H) in the compute dtype (the logits are formed in it, then read as float32).
        weight: (V, H); bias: (V,) or None; cast to hidden's dtype.
        labels: hidden's leading shape, int64; ``ignore_index`` where there is no target.
        scratch_mib: memory budget of one chunk (default by device, as ``dpo_fast.token_logps``).
    Returns:
        ``TokenStats``.
    """
    flat_hidden, flat_labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    weight = weight.to(hidden.dtype)
    bias = None if bias is None else bias.to(hidden.dtype)
    rows = (flat_labels != ignore_index).nonzero().squeeze(1)
    entropy = torch.zeros(flat_labels.shape, dtype=torch.float32, device=hidden.device)
    mean_logit = torch.zeros_like(entropy)
    is_top1 = torch.zeros(flat_labels.shape, dtype=torch.bool, device=hidden.device)
    step = max(1, chunking.scratch_bytes(hidden.device, scratch_mib) // (weight.shape[0] * _BYTES_PER_LOGIT))
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step]
        logits = flat_hidden.index_select(0, chunk) @ weight.t()
        if bias is not None:
            logits += bias
        logits = logits.float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        log_norm = torch.logsumexp(logits, dim=-1)
        entropy[chunk] = log_norm - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        mean_logit[chunk] = logits.mean(-1)
        is_top1[chunk] = logits.argmax(-1) == flat_labels.index_select(0, chunk)
    return TokenStats(entropy.view(labels.shape), mean_logit.view(labels.shape), is_top1.view(labels.shape))
