"""The ``reference`` backend: materialize the logits, ``log_softmax``, gather. The oracle of the tests.

This is the naive step most trainers run: ``N x V`` logits in the input dtype, upcast to float32 for
the log-softmax (float64 inputs stay float64, which is how the tests build their float64 oracle).
Gradients come from PyTorch autograd through these plain operations.
"""

from __future__ import annotations

import torch

from . import HeadSpec, accumulate_dtype


def token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    head: HeadSpec,
    ignore_index: int,
    with_metrics: bool,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]:
    """Per-token log-probs (and token metrics) with the full logits in memory.

    Args:
        hidden: (..., H); weight: (V, H); labels: (...) int64; bias: (V,) or None.
    Returns:
        logp: labels' shape, float32 (float64 for float64 inputs), 0 at ignored tokens;
        metrics: None unless asked for, else (entropy, mean_logit, is_top1) of labels' shape, 0 (False)
        at ignored tokens, with the definitions of ``ChunkStats`` (``is_top1``: the target's logit
        is the largest).
    """
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.to(accumulate_dtype(hidden.dtype))
    if head.softcap is not None:
        logits = head.softcap * torch.tanh(logits / head.softcap)
    logits = logits / head.temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    valid = labels != ignore_index
    targets = torch.where(valid, labels, 0).long()[..., None]
    logp = torch.where(valid, logprobs.gather(-1, targets).squeeze(-1), 0.0)
    if not with_metrics:
        return logp, None
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    with torch.no_grad():
        mean_logit = logits.mean(-1)
        is_top1 = logits.gather(-1, targets).squeeze(-1) == logits.max(-1).values
    return logp, (torch.where(valid, entropy, 0.0), torch.where(valid, mean_logit, 0.0), is_top1 & valid)
