"""GPU tests at real sizes (marker ``gpu``; skipped without CUDA, and a skip is no pass).

The headline case of the issues: Llama-3's head (H=4096, V=128256), 8 pairs x 1024 tokens with
half of each row masked as prompt, bf16, against a float64 reference. The reference is formed one
pair at a time (each pair's loss term depends on its two rows alone), which keeps its float64
logits to 2 x 1024 x V.
"""

import pytest
import torch
from helpers import BACKENDS, rel_err

import dpo_fast

pytestmark = pytest.mark.gpu

PAIRS, LENGTH, WIDTH, VOCAB = 8, 1024, 4096, 128256


def _headline_batch(dtype=torch.bfloat16):
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2 * PAIRS, LENGTH, WIDTH, device="cuda", generator=gen).to(dtype)
    weight = (torch.randn(VOCAB, WIDTH, device="cuda", generator=gen) * (2.0 / WIDTH**0.5)).to(dtype)
    labels = torch.randint(0, VOCAB, (2 * PAIRS, LENGTH), device="cuda", generator=gen)
    labels[:, : LENGTH // 2] = -100
    ref = torch.randn(2, PAIRS, device="cuda", generator=gen) * 50 - 5000
    return hidden, weight, labels, ref[0], ref[1]


def _reference_by_pair(hidden, weight, labels, ref_chosen, ref_rejected, beta):
    """Float64 loss, log-probs and gradients, one pair at a time."""
    weight64 = weight.double().requires_grad_(True)
    grad_hidden = torch.zeros_like(hidden, dtype=torch.float64)
    loss, chosen, rejected = 0.0, [], []
    for p in range(PAIRS):
        rows = [p, PAIRS + p]
        pair_hidden = hidden[rows].double().requires_grad_(True)
        out = dpo_fast.fused_linear_dpo_loss(
            pair_hidden, weight64, labels[rows], ref_chosen_logps=ref_chosen[p : p + 1].double(),
            ref_rejected_logps=ref_rejected[p : p + 1].double(), beta=beta, backend="reference",
        )  # fmt: skip
        (out.loss / PAIRS).backward()
        grad_hidden[rows] = pair_hidden.grad
        loss += out.loss.item() / PAIRS
        chosen.append(out.chosen_logps.detach())
        rejected.append(out.rejected_logps.detach())
    return torch.tensor(loss), torch.cat(chosen), torch.cat(rejected), grad_hidden, weight64.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_headline_bf16_against_float64_reference(backend):
    hidden, weight, labels, ref_chosen, ref_rejected = _headline_batch()
    # beta small enough that the sigmoid is not saturated: the gradients are not vanishingly small
    beta = 0.01
    expected = _reference_by_pair(hidden, weight, labels, ref_chosen, ref_rejected, beta)
    hidden_leaf = hidden.clone().requires_grad_(True)
    weight_leaf = weight.clone().requires_grad_(True)
    out = dpo_fast.fused_linear_dpo_loss(
        hidden_leaf, weight_leaf, labels, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected, beta=beta,
        backend=backend,
    )  # fmt: skip
    out.loss.backward()
    torch.cuda.synchronize()
    assert rel_err(out.loss, expected[0]) <= 1e-2
    assert rel_err(out.chosen_logps, expected[1]) <= 1e-2
    assert rel_err(out.rejected_logps, expected[2]) <= 1e-2
    assert rel_err(hidden_leaf.grad, expected[3]) <= 2e-2
    assert rel_err(weight_leaf.grad, expected[4]) <= 2e-2
    assert hidden_leaf.grad.dtype == torch.bfloat16 and weight_leaf.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", BACKENDS)
def test_headline_forward_only_and_token_logps(backend):
    hidden, weight, labels, _, _ = _headline_batch()
    with torch.no_grad():
        seq = dpo_fast.sequence_logps(hidden, weight, labels, backend=backend)
        tokens, entropy = dpo_fast.token_logps(hidden[:2], weight, labels[:2], return_entropy=True, backend=backend)
        expected_tokens, expected_entropy = dpo_fast.token_logps(
            hidden[:2].double(), weight.double(), labels[:2], return_entropy=True, backend="reference"
        )
    assert rel_err(tokens, expected_tokens) <= 1e-2
    assert rel_err(entropy, expected_entropy) <= 1e-2
    assert rel_err(seq[:2], expected_tokens.sum(-1)) <= 1e-2


def test_fp32_triton_without_tf32_is_exact_to_float32():
    if "triton" not in BACKENDS:
        pytest.skip("triton not installed")
    gen = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(4, 300, 1000, device="cuda", generator=gen)
    weight = torch.randn(50000, 1000, device="cuda", generator=gen) * 0.06
    labels = torch.randint(0, 50000, (4, 300), device="cuda", generator=gen)
    got = dpo_fast.token_logps(hidden, weight, labels, backend="triton")
    want = dpo_fast.token_logps(hidden.double(), weight.double(), labels, backend="reference")
    assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("entry", ["token_logps", "sequence_logps", "dpo", "kto"])
def test_cuda_autocast_runs_the_head_as_linear_would(backend, entry):
    """CUDA bf16 autocast with float32 inputs: the call on inputs cast to bf16 outside autocast, float32 grads
    (the CPU twin, with every entry, is tests/api/test_user_setups.py)."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    hidden = torch.randn(4, 96, 256, device="cuda", generator=gen)
    weight = torch.randn(5000, 256, device="cuda", generator=gen) * 0.06
    labels = torch.randint(0, 5000, (4, 96), device="cuda", generator=gen)
    labels[:, :40] = -100
    ref = torch.full((2,), -400.0, device="cuda")

    def run(h, w):
        if entry == "token_logps":
            return dpo_fast.token_logps(h, w, labels, backend=backend).sum()
        if entry == "sequence_logps":
            return dpo_fast.sequence_logps(h, w, labels, backend=backend).sum()
        if entry == "dpo":
            return dpo_fast.fused_linear_dpo_loss(h, w, labels, ref_chosen_logps=ref, ref_rejected_logps=ref,
                                                  beta=0.01, backend=backend).loss  # fmt: skip
        desirable = torch.tensor([True, False, True, False], device="cuda")
        return dpo_fast.fused_linear_kto_loss(h, w, labels, desirable=desirable, ref_logps=torch.cat([ref, ref]),
                                              kl=0.0, beta=0.01, backend=backend).loss  # fmt: skip

    def value_and_grads(h, w):
        h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        value = run(h, w)
        value.backward()
        return value.detach(), h.grad, w.grad

    with torch.autocast("cuda", dtype=torch.bfloat16):
        value, grad_hidden, grad_weight = value_and_grads(hidden, weight)
    expected = value_and_grads(hidden.bfloat16(), weight.bfloat16())
    assert value.dtype == torch.float32 and grad_hidden.dtype == torch.float32 and grad_weight.dtype == torch.float32
    assert rel_err(value, expected[0]) <= 1e-6
    assert rel_err(grad_hidden, expected[1]) <= 1e-6 and rel_err(grad_weight, expected[2]) <= 1e-6
