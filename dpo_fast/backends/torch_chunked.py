"""The ``torch`` backend: plain PyTorch on one bounded chunk of valid tokens at a time.

It runs anywhere PyTorch does. The logits of a chunk are formed in float32 (float64 for float64
inputs): on CUDA by ``torch.mm(..., out_dtype=torch.float32)`` from bf16/fp16 operands, elsewhere
by upcasting the operands. ``dL/dz`` is returned in the compute dtype for the two products.
"""

from __future__ import annotations

import torch

from . import Chunk, ChunkStats, HeadSpec, accumulate_dtype

NAME = "torch"
# torch.mm(..., out_dtype=torch.float32) from bf16/fp16 operands exists on CUDA since torch 2.8
_MM_HAS_OUT_DTYPE = torch.torch_version.TorchVersion(torch.__version__) >= "2.8"


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def scratch_bytes_per_logit(keep_logits: bool, dtype: torch.dtype) -> int:
    # the logits, the probabilities, one more float temporary and dL/dz in the compute dtype
    accumulate = 8 if dtype == torch.float64 else 4
    return 3 * accumulate + dtype.itemsize


def addmm_wide(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for a float32 ``acc`` and 16-bit ``a``, ``b``: the product is never rounded to 16 bits.

    On CUDA one cuBLAS call with a float32 output; elsewhere the operands are upcast first.
    """
    if acc.is_cuda and _MM_HAS_OUT_DTYPE:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def logits(hidden_rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, head: HeadSpec) -> torch.Tensor:
    """``z = softcap(h W^T + b) / temperature`` for a chunk: (C, H) x (V, H) -> (C, V) float32/float64."""
    acc = accumulate_dtype(hidden_rows.dtype)
    if hidden_rows.dtype == acc:
        z = hidden_rows @ weight.t()
    elif hidden_rows.is_cuda and _MM_HAS_OUT_DTYPE:
        z = torch.mm(hidden_rows, weight.t(), out_dtype=acc)
    else:
        z = hidden_rows.to(acc) @ weight.to(acc).t()
    if bias is not None:
        z += bias.to(acc)
    if head.softcap is not None:
        z.div_(head.softcap).tanh_().mul_(head.softcap)
    if head.temperature != 1.0:
        z.div_(head.temperature)
    return z


def _chunk_logits(chunk: Chunk) -> torch.Tensor:
    return logits(chunk.hidden.index_select(0, chunk.rows), chunk.weight, chunk.bias, chunk.head)


def logits_stats(chunk: Chunk, with_metrics: bool, keep_logits: bool) -> ChunkStats:
    targets = chunk.targets
    z = _chunk_logits(chunk)
    vocab = z.shape[1]
    max_logit = z.max(dim=1).values
    in_range = (targets >= 0) & (targets < vocab)
    target_logit = z.gather(1, targets.clamp(0, vocab - 1)[:, None]).squeeze(1).masked_fill_(~in_range, float("nan"))
    shifted = z - max_logit[:, None]  # -inf at a -inf logit; NaN throughout a row with +inf/NaN or only -inf
    exp_shifted = torch.exp(shifted)
    sum_exp = exp_shifted.sum(1)
    mean_shifted = mean_logit = log_sum_sq_probs = None
    if with_metrics:
        mean_logit = z.mean(1)
        log_sum_sq_probs = 2 * (torch.linalg.vector_norm(exp_shifted, dim=1).log() - sum_exp.log())
        # p * (z - max) is 0 where p is 0 (a -inf logit), not 0 * -inf
        mean_shifted = shifted.masked_fill_(exp_shifted == 0, 0).mul_(exp_shifted).sum(1) / sum_exp
    del shifted, exp_shifted
    return ChunkStats(
        max_logit, torch.log(sum_exp), target_logit, mean_shifted, mean_logit, log_sum_sq_probs,
        z if keep_logits else None,
    )  # fmt: skip


def logits_grad(chunk: Chunk, stats: ChunkStats, grad_logp: torch.Tensor,
                grad_entropy: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """``dL/dx`` for the pre-softcap logits ``x = h W^T + b`` of a chunk, (C, V) in hidden's dtype.

    With ``p = softmax(z) = exp(z - max - log_sum_exp)``, ``a = grad_logp`` and ``e = grad_entropy``:
    ``dL/dz = a*(onehot(y) - p) - e*p*(z - E_p[z])``, then the chain rule through temperature and
    softcap. A ``-inf`` logit has ``p = 0`` and gradient 0; a row whose target is outside ``[0, V)``
    gets NaN. Consumes ``stats.logits`` when they were kept.
    """
    z = stats.logits if stats.logits is not None else _chunk_logits(chunk)
    targets, head = chunk.targets, chunk.head
    vocab = z.shape[1]
    shifted = z - stats.max_logit[:, None]
    grad = torch.exp(shifted - stats.log_sum_exp[:, None])
    if grad_entropy is None:
        grad.mul_(-grad_logp[:, None])
    else:
        weight_per_logit = shifted.sub_(stats.mean_shifted[:, None]).mul_(grad_entropy[:, None])
        weight_per_logit.add_(grad_logp[:, None]).masked_fill_(grad == 0, 0)  # p = 0 at a -inf logit
        grad.mul_(weight_per_logit).neg_()
    del shifted
    in_range = (targets >= 0) & (targets < vocab)
    grad.scatter_add_(1, targets.clamp(0, vocab - 1)[:, None], grad_logp[:, None].to(grad.dtype))
    grad.masked_fill_(~in_range[:, None], float("nan"))
    if head.softcap is not None:
        # d(c*tanh(x/c))/dx = 1 - tanh^2 = 1 - (capped/c)^2, and capped = z * temperature
        grad.mul_(z.mul_(head.temperature / head.softcap).square_().neg_().add_(1))
    if head.temperature != 1.0:
        grad.div_(head.temperature)
    return grad.to(chunk.hidden.dtype)
