"""Forward: fused ``h W^T`` tiles, online logsumexp, target-logit gather (and entropy statistics).

For C tokens (rows of ``hidden`` picked by ``rows``) and vocabulary V, each program owns
``BLOCK_N`` tokens and one contiguous vocabulary split; it walks its split ``BLOCK_V`` columns at a
time, computing each logits tile in registers (``logits_tile``) and folding it into running
statistics per token:

    m  = max_v z            s = sum_v exp(z - m)           t = sum_v exp(z - m) * (z - m)
    target = z[y]           (found by the one split whose columns hold y)

When the running max moves from m to m', ``s <- s e^(m-m')`` and ``t <- (t + (m-m') s) e^(m-m')``.
Splits are combined on the host side (a few (C, splits) tensors) into the normalizer the rest of
dpo_fast keeps, shifted by the max so that near-certain tokens keep their precision:
``max_logit = M = max_j m_j``, ``log_sum_exp = log sum_j s_j e^(m_j-M)`` (so ``lse = M + log_sum_exp``)
and ``mean_shifted = E_p[z] - M = sum_j (t_j + (m_j-M) s_j) e^(m_j-M) / sum_j s_j e^(m_j-M)``;
the entropy is ``log_sum_exp - mean_shifted``.
With ``STORE_LOGITS`` the tiles are also written (float32) for a later gradient pass.
No (C, V) buffer exists otherwise.
"""

import torch
import triton
import triton.language as tl

from .config import launch_config
from .logits_tile import logits_tile


@triton.jit
def lse_forward_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows_ptr,
    targets_ptr,
    max_ptr,
    sum_exp_ptr,
    sum_exp_logit_ptr,
    target_ptr,
    logits_ptr,
    num_rows,
    vocab,
    hidden_dim,
    stride_hidden,
    stride_weight,
    stride_logits,
    vocab_per_split,
    num_splits,
    softcap,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    STORE_LOGITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    # programs with neighbouring ids share a vocabulary split, so they read the same W tiles from L2
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < num_rows
    rows = tl.load(rows_ptr + offs_n, mask=row_mask, other=0)
    row_offsets = rows.to(tl.int64) * stride_hidden
    targets = tl.load(targets_ptr + offs_n, mask=row_mask, other=-1)

    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_exp_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = split * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, vocab)
    for v_start in range(v_begin, v_end, BLOCK_V):
        offs_v = v_start + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_end
        z = logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, row_offsets, row_mask, offs_v, v_mask, hidden_dim, stride_weight,
            softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, INPUT_PRECISION,
        )  # fmt: skip
        if STORE_LOGITS:
            tl.store(
                logits_ptr + offs_n.to(tl.int64)[:, None] * stride_logits + offs_v[None, :],
                z,
                mask=row_mask[:, None] & v_mask[None, :],
            )
        target_logit += tl.sum(tl.where(offs_v[None, :] == targets[:, None], z, 0.0), axis=1)
        z = tl.where(v_mask[None, :], z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        rescale = tl.exp(running_max - new_max)
        shifted = z - new_max[:, None]
        p = tl.exp(shifted)
        if WITH_ENTROPY:
            # sum_exp is 0 until the first tile, where running_max - new_max is -inf
            moved = tl.where(sum_exp > 0, running_max - new_max, 0.0) * sum_exp
            sum_exp_logit = (sum_exp_logit + moved) * rescale + tl.sum(tl.where(v_mask[None, :], p * shifted, 0.0), 1)
        sum_exp = sum_exp * rescale + tl.sum(p, axis=1)
        running_max = new_max

    out = offs_n * num_splits + split
    tl.store(max_ptr + out, running_max, mask=row_mask)
    tl.store(sum_exp_ptr + out, sum_exp, mask=row_mask)
    tl.store(target_ptr + out, target_logit, mask=row_mask)
    if WITH_ENTROPY:
        tl.store(sum_exp_logit_ptr + out, sum_exp_logit, mask=row_mask)


def lse_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None,
    temperature: float,
    with_entropy: bool,
    store_logits: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch ``lse_forward_kernel`` on the tokens ``rows`` and combine the vocabulary splits.

    Args:
        hidden: (N, H) fp32/bf16/fp16, unit stride along H; weight: (V, H) same dtype, unit stride;
        bias: (V,) or None; rows: (C,) int64 token indices into hidden; targets: (C,) int64 in [0, V).
    Returns:
        max_logit (C,), log_sum_exp (C,), target_logit (C,), mean_shifted (C,) or None, logits (C, V)
        or None; all float32.
    """
    num_rows, (vocab, hidden_dim) = rows.shape[0], weight.shape
    cfg = launch_config(hidden, vocab)
    row_blocks = triton.cdiv(num_rows, cfg.block_n)
    vocab_blocks = triton.cdiv(vocab, cfg.block_v)
    wanted_splits = max(1, cfg.target_programs // max(row_blocks, 1))
    vocab_per_split = triton.cdiv(vocab_blocks, min(vocab_blocks, wanted_splits)) * cfg.block_v
    num_splits = triton.cdiv(vocab, vocab_per_split)

    partial = torch.empty((4, num_rows, num_splits), dtype=torch.float32, device=hidden.device)
    logits = torch.empty((num_rows, vocab), dtype=torch.float32, device=hidden.device) if store_logits else None
    lse_forward_kernel[(row_blocks, num_splits)](
        hidden, weight, bias if bias is not None else hidden, rows, targets,
        partial[0], partial[1], partial[2], partial[3], logits if logits is not None else partial,
        num_rows, vocab, hidden_dim, hidden.stride(0), weight.stride(0), vocab if store_logits else 0,
        vocab_per_split, num_splits, float(softcap or 1.0), 1.0 / temperature,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, WITH_ENTROPY=with_entropy,
        STORE_LOGITS=store_logits, BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_K=cfg.block_k,
        INPUT_PRECISION=cfg.input_precision, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    split_max, split_sum_exp, split_sum_exp_logit, split_target = partial
    max_logit = split_max.max(dim=1).values
    offsets = split_max - max_logit[:, None]
    weights = torch.exp(offsets)
    sum_exp = (split_sum_exp * weights).sum(1)
    mean_shifted = None
    if with_entropy:
        mean_shifted = ((split_sum_exp_logit + offsets * split_sum_exp) * weights).sum(1) / sum_exp
    return max_logit, torch.log(sum_exp), split_target.sum(1), mean_shifted, logits
