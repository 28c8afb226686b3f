"""One ``(BLOCK_N, BLOCK_V)`` tile of LM-head logits, computed in registers (a device function).

    x[n, v] = sum_k h[row_n, k] * W[v, k]  (+ b[v])
    z[n, v] = softcap * tanh(x / softcap) * inv_temperature      (softcap optional)

``h`` rows are addressed through ``row_offsets`` (element offsets, int64), so the caller picks any
subset of tokens (the valid ones) without gathering them first; ``h`` and ``W`` have unit stride
along H, the bias is contiguous. Accumulation is float32; bf16/fp16 operands go through the tensor
cores, float32 ones in ``INPUT_PRECISION`` ("ieee": exact products on the FMA units; "tf32": the
tensor cores with TF32 operands). ``-inf`` in the bias gives ``z = -inf`` (``-softcap`` with a
softcap); ``+inf``/NaN propagate.
"""

import triton
import triton.language as tl


@triton.jit
def logits_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    row_offsets,
    row_mask,
    offs_v,
    v_mask,
    hidden_dim,
    stride_weight,
    softcap,
    inv_temperature,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    if HAS_BIAS:
        # the bias starts the accumulator: no registers of its own held across the product loop
        bias = tl.load(bias_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32) + bias[None, :]
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    weight_rows = offs_v.to(tl.int64) * stride_weight
    for k_start in range(0, hidden_dim, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_mask = offs_k < hidden_dim
        h = tl.load(
            hidden_ptr + row_offsets[:, None] + offs_k[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            weight_ptr + weight_rows[None, :] + offs_k[:, None],
            mask=v_mask[None, :] & k_mask[:, None],
            other=0.0,
        )
        acc = tl.dot(h, w, acc, input_precision=INPUT_PRECISION)
    if HAS_SOFTCAP:
        # softcap * tanh(x / softcap) with tanh(y) = 1 - 2 / (exp(2y) + 1): -inf/+inf give -softcap/+softcap;
        # scalar factors keep the per-logit work to an exp, a division and two FMAs
        exp_2y = tl.exp(acc * (2.0 / softcap))
        acc = softcap - (2.0 * softcap) / (exp_2y + 1.0)
    return acc * inv_temperature
