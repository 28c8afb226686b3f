"""Forward row pass: fused ``h W^T`` tiles, online logsumexp, target gather and the token metrics.

For C tokens (rows of ``hidden`` picked by ``rows``) and vocabulary V, each program owns
``BLOCK_N`` tokens and one contiguous vocabulary split; it walks its split ``BLOCK_V`` columns at a
time, computing each logits tile ``z`` in registers (``logits_tile``) and folding it into running
statistics per token, relative to the running max ``m``:

    s = sum_v exp(z - m)                      target = z[y]   (in the one split whose columns hold y)
    t = sum_v exp(z - m) (z - m)              (WITH_METRICS)
    q = sum_v exp(2 (z - m))                  (WITH_METRICS)
    u = sum_v z                               (WITH_METRICS)

When the running max moves from m to m', ``s <- s e^(m-m')``, ``t <- (t + (m-m') s) e^(m-m')`` and
``q <- q e^(2(m-m'))``. A token whose logits so far are all ``-inf`` is shifted by 0 instead of by
its max (``-inf - -inf`` would be NaN), and ``exp(-inf) (-inf)`` counts as 0 in ``t``: masked
vocabulary entries take no probability, in any tile or split. ``+inf`` or NaN logits, or a token
whose logits are all ``-inf``, give NaN; a target outside ``[0, V)`` gives ``target = NaN``.

The splits are combined on the host side (a few ``(C, splits)`` tensors) into the statistics of
``dpo_fast.backends.contract.ChunkStats``, shifted by ``M = max_j m_j`` so that near-certain
tokens keep their precision, with ``w_j = e^(m_j - M)`` and ``S = sum_j s_j w_j``:

    max_logit = M                 log_sum_exp = log S                       (lse = M + log_sum_exp)
    mean_shifted = sum_j (t_j + (m_j - M) s_j) w_j / S = E_p[z] - M         (entropy = log_sum_exp - mean_shifted)
    mean_logit = sum_j u_j / V    log_sum_sq_probs = log(sum_j q_j w_j^2) - 2 log S = log sum_v p_v^2

With ``STORE_LOGITS`` the tiles are also written (float32) for a later gradient pass; no (C, V)
buffer exists otherwise.
"""

import torch

import triton
import triton.language as tl

from .config import launch_config, target_programs
from .logits_tile import logits_tile

# planes of the per-split partial statistics, (PLANES, C, splits) float32
_MAX, _SUM_EXP, _TARGET, _SUM_EXP_SHIFTED, _SUM_SQ_EXP, _SUM_LOGIT = range(6)
PLANES = 6


@triton.jit
def logits_stats_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows_ptr,
    targets_ptr,
    partial_ptr,
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
    WITH_METRICS: tl.constexpr,
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
    # the first split carries the NaN of a target outside the vocabulary
    in_vocab = (targets >= 0) & (targets < vocab)
    target_logit = tl.where(in_vocab | (split > 0), 0.0, float("nan"))
    # compared with the tile's columns as int32 (an int64 comparison costs two registers a logit)
    target_column = tl.where(in_vocab, targets, -1).to(tl.int32)

    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_exp_shifted = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_sq_exp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = split * vocab_per_split
    v_end = tl.minimum(v_begin + vocab_per_split, vocab)
    for v_start in range(v_begin, v_end, BLOCK_V):
        offs_v = v_start + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_end
        z = logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, row_offsets, row_mask, offs_v, v_mask, hidden_dim, stride_weight,
            softcap, inv_temperature, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_K, INPUT_PRECISION,
        )  # fmt: skip
        # the tile's own columns, compared with per-token scalars (no per-logit column registers)
        columns = tl.arange(0, BLOCK_V)[None, :]
        in_tile = columns < v_end - v_start
        if STORE_LOGITS:
            row_starts = offs_n.to(tl.int64) * stride_logits + v_start
            tl.store(logits_ptr + row_starts[:, None] + columns, z, mask=row_mask[:, None] & in_tile)
        target_logit += tl.sum(tl.where(columns == (target_column - v_start)[:, None], z, 0.0), axis=1)
        if WITH_METRICS:
            sum_logit += tl.sum(tl.where(in_tile, z, 0.0), axis=1)
        z = tl.where(in_tile, z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        # shift a token whose logits so far are all -inf by 0: exp(-inf - 0) = 0, where -inf - -inf is NaN
        base = tl.where(new_max == float("-inf"), 0.0, new_max)
        moved = running_max - base  # -inf until the first finite logit, when sum_exp is still 0
        rescale = tl.exp(moved)
        shifted = z - base[:, None]
        p = tl.exp(shifted)
        if WITH_METRICS:
            moved_mass = tl.where(sum_exp > 0, moved, 0.0) * sum_exp
            # p * shifted is 0 at a -inf logit (p = 0), not 0 * -inf
            tile_shifted = tl.sum(p * tl.where(p > 0, shifted, 0.0), axis=1)
            sum_exp_shifted = (sum_exp_shifted + moved_mass) * rescale + tile_shifted
            sum_sq_exp = sum_sq_exp * (rescale * rescale) + tl.sum(p * p, axis=1)
        sum_exp = sum_exp * rescale + tl.sum(p, axis=1)
        running_max = new_max

    plane = num_rows * num_splits
    out = partial_ptr + offs_n * num_splits + split
    tl.store(out + 0 * plane, running_max, mask=row_mask)
    tl.store(out + 1 * plane, sum_exp, mask=row_mask)
    tl.store(out + 2 * plane, target_logit, mask=row_mask)
    if WITH_METRICS:
        tl.store(out + 3 * plane, sum_exp_shifted, mask=row_mask)
        tl.store(out + 4 * plane, sum_sq_exp, mask=row_mask)
        tl.store(out + 5 * plane, sum_logit, mask=row_mask)


def flags(has_bias: bool, has_softcap: bool, with_metrics: bool, store_logits: bool) -> dict:
    """The kernel's flag constexprs for a launch."""
    return {
        "HAS_BIAS": has_bias,
        "HAS_SOFTCAP": has_softcap,
        "WITH_METRICS": with_metrics,
        "STORE_LOGITS": store_logits,
    }


def logits_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None,
    temperature: float,
    with_metrics: bool,
    store_logits: bool,
    float32_precision: str,
) -> tuple:
    """Launch ``logits_stats_kernel`` on the tokens ``rows`` and combine the vocabulary splits.

    Args:
        hidden: (N, H) fp32/bf16/fp16, unit stride along H; weight: (V, H) same dtype, unit stride along H;
        bias: (V,) same dtype, contiguous, or None; rows: (C,) int64 contiguous token indices into hidden;
        targets: (C,) int64 contiguous (outside [0, V): NaN target_logit).
        float32_precision: ``"ieee"`` or ``"tf32"``, how float32 operands are multiplied (16-bit: unused).
    Returns:
        The 7 fields of ``ChunkStats`` in order: max_logit, log_sum_exp, target_logit (C,); mean_shifted,
        mean_logit, log_sum_sq_probs (C,) or None without ``with_metrics``; logits (C, V) or None without
        ``store_logits``. All float32.
    """
    num_rows, (vocab, hidden_dim) = rows.shape[0], weight.shape
    kernel_flags = flags(bias is not None, softcap is not None, with_metrics, store_logits)
    cfg = launch_config("logits_stats", hidden, kernel_flags, float32_precision)
    row_blocks = triton.cdiv(num_rows, cfg.block_n)
    vocab_blocks = triton.cdiv(vocab, cfg.block_v)
    wanted_splits = max(1, target_programs(hidden.device) // max(row_blocks, 1))
    vocab_per_split = triton.cdiv(vocab_blocks, min(vocab_blocks, wanted_splits)) * cfg.block_v
    num_splits = triton.cdiv(vocab, vocab_per_split)

    planes = PLANES if with_metrics else _SUM_EXP_SHIFTED
    partial = torch.empty((planes, num_rows, num_splits), dtype=torch.float32, device=hidden.device)
    logits = torch.empty((num_rows, vocab), dtype=torch.float32, device=hidden.device) if store_logits else None
    logits_stats_kernel[(row_blocks, num_splits)](
        hidden, weight, bias if bias is not None else hidden, rows, targets, partial,
        logits if logits is not None else partial,
        num_rows, vocab, hidden_dim, hidden.stride(0), weight.stride(0), vocab if store_logits else 0,
        vocab_per_split, num_splits, float(softcap or 1.0), 1.0 / temperature,
        **kernel_flags, **cfg.constexprs(), **cfg.options(),
    )  # fmt: skip

    split_max = partial[_MAX]
    max_logit = split_max.max(dim=1).values
    offsets = split_max - max_logit[:, None]  # -inf for a split of -inf logits only; NaN for a row of them
    weights = torch.exp(offsets)
    sum_exp = (partial[_SUM_EXP] * weights).sum(1)
    target_logit = partial[_TARGET].sum(1)
    mean_shifted = mean_logit = log_sum_sq_probs = None
    if with_metrics:
        # a split of -inf logits has weight 0 and sum 0: its (-inf) * 0 offset term counts as 0
        moved = torch.where(weights > 0, (partial[_SUM_EXP_SHIFTED] + offsets * partial[_SUM_EXP]) * weights, 0.0)
        mean_shifted = moved.sum(1) / sum_exp
        mean_logit = partial[_SUM_LOGIT].sum(1) / vocab
        log_sum_sq_probs = torch.log((partial[_SUM_SQ_EXP] * weights.square()).sum(1)) - 2 * torch.log(sum_exp)
    return max_logit, torch.log(sum_exp), target_logit, mean_shifted, mean_logit, log_sum_sq_probs, logits
