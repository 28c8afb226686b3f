"""Backward: ``dL/dx`` for a chunk of tokens, formed tile by tile in registers.

For token n (target y, normalizer ``max`` and ``log_sum_exp``, ``mean_shifted = E_p[z] - max``)
and upstream gradients ``a = dL/dlogp_n`` and ``e = dL/dentropy_n`` (``WITH_METRICS``), with
``p = exp((z - max) - log_sum_exp)``:

    dL/dz[n, v] = a * (onehot(y)[v] - p[v]) - e * p[v] * ((z[v] - max) - mean_shifted)
    dL/dx[n, v] = dL/dz * inv_temperature * (1 - (z * temperature / softcap)^2)   (softcap term optional)

where ``x = h W^T + b`` and ``z = softcap(x) / temperature``. A ``-inf`` logit has ``p = 0`` and
gradient 0 (its ``p * (z - max)`` counts as 0, not ``0 * -inf``); a token whose target is outside
``[0, V)`` gets a NaN row, and its target is never used as an address; NaN statistics (a token
with ``+inf``/NaN logits) give NaN gradients.

The logits tile is recomputed from ``h`` and ``W`` (``logits_tile``), or read from the float32
logits kept by the forward pass (``LOAD_LOGITS``; the product, bias and precision then play no
part). Each program writes its ``(BLOCK_N, BLOCK_V)`` tile of ``dL/dx`` once, in the compute
dtype; the two products ``dL/dx @ W`` and ``dL/dx^T @ h`` run as matmuls on that bounded chunk.
"""

import torch

import triton
import triton.language as tl

from .config import launch_config
from .logits_tile import logits_tile


@triton.jit
def logits_grad_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows_ptr,
    targets_ptr,
    max_ptr,
    log_sum_exp_ptr,
    mean_ptr,
    grad_logp_ptr,
    grad_entropy_ptr,
    logits_ptr,
    grad_ptr,
    num_rows,
    vocab,
    hidden_dim,
    stride_hidden,
    stride_weight,
    stride_logits,
    stride_grad,
    softcap,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WITH_METRICS: tl.constexpr,
    LOAD_LOGITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = offs_n < num_rows
    v_mask = offs_v < vocab
    tile_mask = row_mask[:, None] & v_mask[None, :]
    local_rows = offs_n.to(tl.int64)[:, None]

    if LOAD_LOGITS:
        z = tl.load(logits_ptr + local_rows * stride_logits + offs_v[None, :], mask=tile_mask, other=0.0)
    else:
        rows = tl.load(rows_ptr + offs_n, mask=row_mask, other=0)
        z = logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows.to(tl.int64) * stride_hidden, row_mask, offs_v, v_mask,
            hidden_dim, stride_weight, softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V,
            BLOCK_K, INPUT_PRECISION,
        )  # fmt: skip

    max_logit = tl.load(max_ptr + offs_n, mask=row_mask, other=0.0)
    log_sum_exp = tl.load(log_sum_exp_ptr + offs_n, mask=row_mask, other=0.0)
    grad_logp = tl.load(grad_logp_ptr + offs_n, mask=row_mask, other=0.0)
    targets = tl.load(targets_ptr + offs_n, mask=row_mask, other=-1)
    shifted = z - max_logit[:, None]
    p = tl.exp(shifted - log_sum_exp[:, None])
    if WITH_METRICS:
        mean_shifted = tl.load(mean_ptr + offs_n, mask=row_mask, other=0.0)
        grad_entropy = tl.load(grad_entropy_ptr + offs_n, mask=row_mask, other=0.0)
        # p = 0 at a -inf logit: its (z - max) = -inf term counts as 0
        deviation = tl.where(p > 0, shifted, 0.0) - mean_shifted[:, None]
        grad = -p * (grad_logp[:, None] + grad_entropy[:, None] * deviation)
    else:
        grad = -p * grad_logp[:, None]
    in_vocab = (targets >= 0) & (targets < vocab)
    # compared with the tile's columns as int32 (an int64 comparison costs two registers a logit)
    target_column = tl.where(in_vocab, targets, -1).to(tl.int32)
    grad += tl.where(offs_v[None, :] == target_column[:, None], grad_logp[:, None], 0.0)
    grad = tl.where(in_vocab[:, None], grad, float("nan"))
    if HAS_SOFTCAP:
        capped_fraction = z * (1.0 / (inv_temperature * softcap))
        grad *= 1.0 - capped_fraction * capped_fraction
    grad *= inv_temperature
    tl.store(
        grad_ptr + local_rows * stride_grad + offs_v[None, :],
        grad.to(grad_ptr.dtype.element_ty),
        mask=tile_mask,
    )


def flags(has_bias: bool, has_softcap: bool, with_metrics: bool, load_logits: bool) -> dict:
    """The kernel's flag constexprs for a launch; kept logits already hold the bias (HAS_BIAS off)."""
    return {
        "HAS_BIAS": has_bias and not load_logits,
        "HAS_SOFTCAP": has_softcap,
        "WITH_METRICS": with_metrics,
        "LOAD_LOGITS": load_logits,
    }


def logits_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    targets: torch.Tensor,
    max_logit: torch.Tensor,
    log_sum_exp: torch.Tensor,
    mean_shifted: torch.Tensor | None,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    softcap: float | None,
    temperature: float,
    logits: torch.Tensor | None,
    float32_precision: str,
) -> torch.Tensor:
    """Launch ``logits_grad_kernel``: ``dL/dx`` for the tokens ``rows``.

    Args:
        hidden: (N, H), weight: (V, H), bias: (V,) or None, as for ``logits_stats``;
        rows, targets: (C,) int64, contiguous; max_logit, log_sum_exp, grad_logp: (C,) float32, contiguous;
        mean_shifted, grad_entropy: (C,) float32 contiguous, both given or both None;
        logits: (C, V) float32 kept by ``logits_stats(store_logits=True)``, or None to recompute.
        float32_precision: ``"ieee"`` or ``"tf32"``, how float32 operands are multiplied (16-bit: unused).
    Returns:
        (C, V) in hidden's dtype.
    """
    num_rows, (vocab, hidden_dim) = rows.shape[0], weight.shape
    kernel_flags = flags(bias is not None, softcap is not None, grad_entropy is not None, logits is not None)
    cfg = launch_config("logits_grad", hidden, kernel_flags, float32_precision)
    grad = torch.empty((num_rows, vocab), dtype=hidden.dtype, device=hidden.device)
    grid = (triton.cdiv(num_rows, cfg.block_n), triton.cdiv(vocab, cfg.block_v))
    with_metrics = kernel_flags["WITH_METRICS"]
    logits_grad_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, rows, targets, max_logit, log_sum_exp,
        mean_shifted if with_metrics else max_logit, grad_logp, grad_entropy if with_metrics else grad_logp,
        logits if logits is not None else max_logit, grad,
        num_rows, vocab, hidden_dim, hidden.stride(0), weight.stride(0),
        logits.stride(0) if logits is not None else 0, grad.stride(0),
        float(softcap or 1.0), 1.0 / temperature,
        **kernel_flags, **cfg.constexprs(), **cfg.options(),
    )  # fmt: skip
    return grad
