"""The cpp backend beyond the shared property suite: vocabulary blocks, float16, gradcheck, opcheck, memory.

The property suite (test_backends.py and the others, through ``helpers.BACKENDS``) and the contract tests
(test_contract.py) already run ``cpp`` against the float64 reference; their heads and chunks are too small for the
kernel to split the vocabulary into blocks, so the online logsumexp across blocks (a block of -inf logits among
them) is tested here.
"""

import pytest
import torch
from helpers import Case, leaves, rel_err

import dpo_fast
from dpo_fast.backends import Chunk, HeadSpec, cpp, torch_chunked

# A 16-bit head of H = 2048 is processed in vocabulary blocks of 2048 columns: V = 5000 makes three
WIDE_H, WIDE_V = 2048, 5000
SMALL = Case(pairs=2, length=4, hidden_dim=5, vocab=7, dtype=torch.float64, bias=True, softcap=None, packed=False,
             seed=3)  # fmt: skip


def _wide_head(dtype):
    """hidden, weight, bias rounded to ``dtype`` and held in float64; rows and targets."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, WIDE_H, generator=gen, dtype=torch.float64)
    weight = torch.randn(WIDE_V, WIDE_H, generator=gen, dtype=torch.float64) * 0.05
    # a bias rising along the vocabulary moves most rows' max into a later block: the running sums are rescaled
    bias = torch.linspace(0, 4, WIDE_V, dtype=torch.float64) + torch.randn(WIDE_V, generator=gen, dtype=torch.float64)
    rows = torch.tensor([0, 3, 5, 11, 7, 2])
    targets = torch.tensor([0, 2047, 2048, 4095, 4096, 4999])  # on both sides of each block border
    return *(tensor.to(dtype).double() for tensor in (hidden, weight, bias)), rows, targets


@pytest.mark.parametrize(
    "dtype, tol, grad_tol", [(torch.float64, 1e-12, 1e-12), (torch.float32, 1e-5, 1e-5), (torch.bfloat16, 1e-5, 4e-3)]
)
@pytest.mark.parametrize("head", [HeadSpec(), HeadSpec(softcap=3.0, temperature=0.8)])
@pytest.mark.parametrize("keep_logits", [False, True])
def test_kernel_matches_float64_torch_forms(dtype, tol, grad_tol, head, keep_logits):
    """Every statistic and dL/dx against the torch backend's whole-row forms in float64 (bf16: across blocks)."""
    hidden, weight, bias, rows, targets = _wide_head(dtype)
    expected = torch_chunked.logits_stats(Chunk(hidden, weight, bias, rows, targets, head), True, False)
    stats = cpp.logits_stats(
        Chunk(hidden.to(dtype), weight.to(dtype), bias.to(dtype), rows, targets, head), True, keep_logits
    )
    for name in ("max_logit", "log_sum_exp", "target_logit", "mean_shifted", "logp", "entropy"):
        assert rel_err(getattr(stats, name), getattr(expected, name)) <= tol, name
    assert (stats.logits is not None) == keep_logits

    gen = torch.Generator().manual_seed(1)
    grad_logp, grad_entropy = torch.randn(2, rows.shape[0], generator=gen, dtype=torch.float64)
    expected_grad = torch_chunked.logits_grad(
        Chunk(hidden, weight, bias, rows, targets, head), expected, grad_logp, grad_entropy
    )
    acc = stats.max_logit.dtype
    grad = cpp.logits_grad(
        Chunk(hidden.to(dtype), weight.to(dtype), bias.to(dtype), rows, targets, head),
        stats,
        grad_logp.to(acc),
        grad_entropy.to(acc),
    )
    assert grad.dtype == dtype and grad.shape == (rows.shape[0], WIDE_V)
    assert rel_err(grad, expected_grad) <= grad_tol


def test_forward_blocks_of_a_tall_float32_chunk():
    """Without kept logits the forward's scratch holds 2^21 logits: 600 tokens split V = 5000 in two blocks."""
    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(600, 16, generator=gen), torch.randn(WIDE_V, 16, generator=gen)
    rows, targets = torch.arange(600), torch.randint(0, WIDE_V, (600,), generator=gen)
    expected = torch_chunked.logits_stats(
        Chunk(hidden.double(), weight.double(), None, rows, targets, HeadSpec()), True, False
    )
    stats = cpp.logits_stats(Chunk(hidden, weight, None, rows, targets, HeadSpec()), True, False)
    for name in ("max_logit", "log_sum_exp", "target_logit", "mean_shifted"):
        assert rel_err(getattr(stats, name), getattr(expected, name)) <= 1e-5, name


@pytest.mark.parametrize("keep_logits", [False, True])
def test_a_first_vocabulary_block_of_minus_inf_logits_takes_no_probability(keep_logits):
    """bf16 head in blocks of 2048 columns: a -inf bias on the whole first block (and on one column of each other)."""
    hidden, weight, bias, rows, _ = _wide_head(torch.bfloat16)
    bias[:2048] = -torch.inf
    bias[3000::1000] = -torch.inf
    targets = torch.tensor([2048, 2049, 2999, 4095, 4096, 4998])
    head = HeadSpec(temperature=0.8)
    expected = torch_chunked.logits_stats(Chunk(hidden, weight, bias, rows, targets, head), True, False)
    stats = cpp.logits_stats(
        Chunk(hidden.bfloat16(), weight.bfloat16(), bias.bfloat16(), rows, targets, head), True, keep_logits
    )
    for name in ("max_logit", "log_sum_exp", "target_logit", "mean_shifted", "log_sum_sq_probs", "logp", "entropy"):
        assert torch.isfinite(getattr(stats, name)).all(), name
        assert rel_err(getattr(stats, name), getattr(expected, name)) <= 1e-5, name
    assert torch.all(stats.mean_logit == -torch.inf)

    grad_logp, grad_entropy = torch.linspace(-1, 1, rows.shape[0]), torch.linspace(1, -0.5, rows.shape[0])
    expected_grad = torch_chunked.logits_grad(
        Chunk(hidden, weight, bias, rows, targets, head), expected, grad_logp.double(), grad_entropy.double()
    )
    grad = cpp.logits_grad(
        Chunk(hidden.bfloat16(), weight.bfloat16(), bias.bfloat16(), rows, targets, head),
        stats,
        grad_logp,
        grad_entropy,
    )
    assert torch.isfinite(grad).all() and torch.all(grad[:, :2048] == 0)
    assert rel_err(grad, expected_grad) <= 4e-3


def test_a_first_scratch_block_of_minus_inf_logits_takes_no_probability():
    """float32 without kept logits: 600 tokens split V = 5000 in scratch blocks of 3495 columns; the first is -inf."""
    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(600, 16, generator=gen), torch.randn(WIDE_V, 16, generator=gen)
    bias = torch.zeros(WIDE_V)
    bias[:3500] = -torch.inf
    rows, targets = torch.arange(600), torch.randint(3500, WIDE_V, (600,), generator=gen)
    expected = torch_chunked.logits_stats(
        Chunk(hidden.double(), weight.double(), bias.double(), rows, targets, HeadSpec()), True, False
    )
    stats = cpp.logits_stats(Chunk(hidden, weight, bias, rows, targets, HeadSpec()), True, False)
    for name in ("max_logit", "log_sum_exp", "target_logit", "mean_shifted", "log_sum_sq_probs", "logp", "entropy"):
        assert torch.isfinite(getattr(stats, name)).all(), name
        assert rel_err(getattr(stats, name), getattr(expected, name)) <= 1e-5, name


def test_float32_gradient_is_written_over_the_kept_logits():
    hidden, weight, bias, rows, targets = _wide_head(torch.float32)
    hidden, weight, bias = hidden.float(), weight.float(), bias.float()
    stats = cpp.logits_stats(Chunk(hidden, weight, bias, rows, targets, HeadSpec()), False, True)
    kept = stats.logits.data_ptr()
    grad = cpp.logits_grad(
        Chunk(hidden, weight, bias, rows, targets, HeadSpec()), stats, torch.ones(rows.shape[0]), None
    )
    assert grad.data_ptr() == kept


@pytest.mark.parametrize("seed", range(4))
def test_float16_matches_float64_reference(seed):
    case = Case(pairs=2, length=9, hidden_dim=40, vocab=80, dtype=torch.float16, bias=True, softcap=2.5,
                packed=bool(seed % 2), seed=seed)  # fmt: skip
    batch = case.build("cpu")

    def step(inputs, backend):
        out = dpo_fast.fused_linear_dpo_loss(
            inputs["hidden"], inputs["weight"], inputs["labels"], bias=inputs["bias"], softcap=case.softcap,
            ref_chosen_logps=batch["ref_chosen_logps"], ref_rejected_logps=batch["ref_rejected_logps"],
            segment_ids=batch.get("segment_ids"), backend=backend,
        )  # fmt: skip
        out.loss.backward()
        return out, inputs

    expected, expected_inputs = step(leaves(batch, torch.float64), "reference")
    actual, actual_inputs = step(leaves(batch), "cpp")
    assert rel_err(actual.loss, expected.loss) <= 1e-2
    assert rel_err(actual.chosen_logps, expected.chosen_logps) <= 1e-2
    for key in ("hidden", "weight", "bias"):
        assert actual_inputs[key].grad.dtype == torch.float16
        assert rel_err(actual_inputs[key].grad, expected_inputs[key].grad, 0.1) <= 2e-2, key


@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck_fused_dpo_loss(packed):
    batch = Case(**{**SMALL.__dict__, "packed": packed}).build("cpu")
    inputs = leaves(batch)

    def loss_and_logps(hidden, weight, bias):
        out = dpo_fast.fused_linear_dpo_loss(
            hidden, weight, batch["labels"], bias=bias, ref_chosen_logps=batch["ref_chosen_logps"].double(),
            ref_rejected_logps=batch["ref_rejected_logps"].double(), segment_ids=batch.get("segment_ids"),
            label_smoothing=0.1, softcap=2.0, backend="cpp",
        )  # fmt: skip
        return out.loss, out.chosen_logps, out.rejected_logps

    assert torch.autograd.gradcheck(loss_and_logps, (inputs["hidden"], inputs["weight"], inputs["bias"]))


@pytest.mark.parametrize("return_entropy", [False, True])
def test_gradcheck_token_logps(return_entropy):
    inputs = leaves(SMALL.build("cpu"))

    def fn(hidden, weight, bias):
        return dpo_fast.token_logps(
            hidden, weight, inputs["labels"], bias=bias, softcap=1.5, temperature=0.8, return_entropy=return_entropy,
            backend="cpp",
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, (inputs["hidden"], inputs["weight"], inputs["bias"]))
