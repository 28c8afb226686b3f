"""The ``reference`` backend: materialize the logits, ``log_softmax``, gather. The oracle of the tests.

This is the naive step most trainers run: ``N x V`` logits in the input dtype (float16 heads form
them in float32: float16 overflows above 65504), upcast to float32 for the log-softmax (float64
inputs stay float64, which is how the tests build their float64 oracle). Gradients come from
PyTorch autograd through these plain operations, so it also gives higher-order gradients.

Its numerics follow the backend contract (``dpo_fast.backends.contract``): ``-inf`` logits take no
probability and leave log-probs, entropy and gradients finite; ``+inf``/NaN logits give NaN; a
target outside ``[0, V)`` gives a NaN log-prob. Ignored tokens take no part at all: a NaN hidden
state there reaches no gradient.
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
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Per-token log-probs (and token metrics) with the full logits in memory.

    Args:
        hidden: (..., H); weight: (V, H); labels: (...) int64; bias: (V,) or None.
    Returns:
        logp: labels' shape, float32 (float64 for float64 inputs), 0 at ignored tokens;
        metrics: None unless asked for, else (entropy, mean_logit, is_top1, log_sum_sq_probs) of labels'
        shape, 0 (False) at ignored tokens, with the definitions of ``ChunkStats`` (``is_top1``: the
        target's logit is the largest); all but the entropy detached.
    """
    vocab = weight.shape[0]
    valid = labels != ignore_index
    # ignored rows take no part: a NaN there would reach every weight gradient as 0 * NaN
    hidden = torch.where(valid[..., None], hidden, 0)
    if hidden.dtype == torch.float16:
        logits = hidden.float() @ weight.float().t()
    else:
        logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.to(accumulate_dtype(hidden.dtype))
    if head.softcap is not None:
        logits = head.softcap * torch.tanh(logits / head.softcap)
    logits = logits / head.temperature
    logprobs = torch.log_softmax(logits, dim=-1)
    in_range = (labels >= 0) & (labels < vocab)
    targets = torch.where(valid & in_range, labels, 0).long()[..., None]
    # a target outside [0, V) (possible only under torch.compile, which skips the value checks): NaN, in the
    # log-prob and, through the product, in its gradient, as the chunked backends give
    target_logp = logprobs.gather(-1, targets).squeeze(-1) * torch.where(valid & ~in_range, float("nan"), 1.0)
    logp = torch.where(valid, target_logp, 0.0)
    if not with_metrics:
        return logp, None
    probs = logprobs.exp()
    # p log p is 0 where p is 0 (a -inf logit), not 0 * -inf; masked out of place, so its gradient is 0 too
    entropy = -(probs * logprobs.masked_fill(probs == 0, 0)).sum(-1)
    with torch.no_grad():
        mean_logit = logits.mean(-1)
        is_top1 = logits.gather(-1, targets).squeeze(-1) == logits.max(-1).values
        log_sum_sq_probs = torch.logsumexp(2 * logprobs, dim=-1)
    return logp, (
        torch.where(valid, entropy, 0.0), torch.where(valid, mean_logit, 0.0), is_top1 & valid & in_range,
        torch.where(valid, log_sum_sq_probs, 0.0),
    )  # fmt: skip
