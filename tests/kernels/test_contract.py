"""Every chunked backend against the contract of ``dpo_fast.backends.contract``, checked in float64.

The oracle drops the ``-inf`` columns before its log-softmax (they take no probability), so the
exact answer with masked vocabulary entries is an independent computation, not the kernels' own
``-inf`` handling repeated.
"""

import math

import pytest
import torch
from helpers import BACKENDS, device_of, rel_err

from dpo_fast import backends
from dpo_fast.backends import Chunk, ChunkStats, HeadSpec
from dpo_fast.backends.contract import METRIC_FIELDS, STATS_FIELDS

VOCAB, HIDDEN, TOKENS = 300, 20, 7


def _problem(seed=0, dtype=torch.float32, masked=None, softcap=None, temperature=1.0):
    """hidden (12, H) of which 7 rows are picked, weight (V, H), bias with ``-inf`` on ``masked`` columns."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(12, HIDDEN, generator=gen, dtype=torch.float64)
    weight = torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64) * (2.0 / HIDDEN**0.5)
    bias = torch.randn(VOCAB, generator=gen, dtype=torch.float64)
    if masked is not None:
        bias[masked] = -math.inf
    rows = torch.tensor([0, 2, 3, 5, 8, 9, 11])
    finite = torch.isfinite(bias).nonzero().squeeze(1)
    targets = finite[torch.randint(0, finite.shape[0], (TOKENS,), generator=gen)]
    return {
        "hidden": hidden.to(dtype),
        "weight": weight.to(dtype),
        "bias": bias.to(dtype),
        "rows": rows,
        "targets": targets,
        "head": HeadSpec(softcap, temperature),
    }


def _on(problem, device):
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in problem.items()}


def _oracle(problem):
    """Float64 statistics and the dL/dx function, from the finite columns only."""
    hidden, weight, bias = (problem[k].double().cpu() for k in ("hidden", "weight", "bias"))
    rows, targets, head = problem["rows"].cpu(), problem["targets"].cpu(), problem["head"]
    x = hidden[rows] @ weight.t() + bias
    z = x if head.softcap is None else head.softcap * torch.tanh(x / head.softcap)
    z = z / head.temperature
    finite = torch.isfinite(z[0])
    zf = z[:, finite]
    column = torch.cumsum(finite.long(), 0) - 1  # index among the finite columns
    logprobs = torch.log_softmax(zf, dim=1)
    probs = logprobs.exp()
    max_logit = zf.max(1).values
    return {
        "max_logit": max_logit,
        "log_sum_exp": torch.logsumexp(zf - max_logit[:, None], 1),
        "target_logit": z.gather(1, targets[:, None]).squeeze(1),
        "logp": logprobs.gather(1, column[targets][:, None]).squeeze(1),
        "entropy": -(probs * logprobs).sum(1),
        "mean_shifted": (probs * zf).sum(1) - max_logit,
        "mean_logit": z.mean(1),
        "log_sum_sq_probs": torch.logsumexp(2 * logprobs, 1),
        "x": x,
        "z": z,
        "probs": probs,
        "finite": finite,
        "column": column,
    }


def _oracle_grad(oracle, targets, grad_logp, grad_entropy, head):
    """dL/dx of sum(a * logp + e * entropy), analytically; 0 on the -inf columns."""
    z, probs, finite = oracle["z"], oracle["probs"], oracle["finite"]
    a, e = grad_logp.double()[:, None], grad_entropy.double()[:, None]
    zf = z[:, finite]
    mean = (probs * zf).sum(1, keepdim=True)
    grad_zf = -probs * (a + e * (zf - mean))
    grad_z = torch.zeros_like(z)
    grad_z[:, finite] = grad_zf
    grad_z[torch.arange(z.shape[0]), targets.cpu()] += a.squeeze(1)
    factor = 1.0 / head.temperature
    if head.softcap is not None:
        factor = factor * (1 - torch.tanh(oracle["x"] / head.softcap) ** 2)
    return grad_z * factor


def _stats(name, problem, with_metrics=True, keep_logits=False):
    p = problem
    return backends.get(name).logits_stats(
        Chunk(p["hidden"], p["weight"], p["bias"], p["rows"], p["targets"], p["head"]), with_metrics, keep_logits
    )


def _grad(name, problem, stats, grad_logp, grad_entropy):
    p = problem
    return backends.get(name).logits_grad(
        Chunk(p["hidden"], p["weight"], p["bias"], p["rows"], p["targets"], p["head"]), stats, grad_logp, grad_entropy
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_metrics", [False, True])
@pytest.mark.parametrize("keep_logits", [False, True])
def test_fields_line_up_with_the_contract(backend, with_metrics, keep_logits):
    problem = _on(_problem(), device_of(backend))
    stats = _stats(backend, problem, with_metrics, keep_logits)
    assert isinstance(stats, ChunkStats)
    for field in STATS_FIELDS:
        value = getattr(stats, field)
        if field == "logits":
            assert (value is not None) == keep_logits
            if keep_logits:
                assert value.shape == (TOKENS, VOCAB) and value.dtype == torch.float32
        elif field in METRIC_FIELDS and not with_metrics:
            assert value is None, field
        else:
            assert value.shape == (TOKENS,) and value.dtype == torch.float32, field
            assert value.device.type == problem["hidden"].device.type, field


CASES = {
    "plain": {},
    "softcap_temperature": {"softcap": 2.5, "temperature": 0.7},
    "masked_first_half": {"masked": slice(0, VOCAB // 2)},
    "masked_last_half": {"masked": slice(VOCAB // 2, VOCAB)},
    "masked_scattered": {"masked": slice(1, VOCAB, 3)},
    "masked_softcap": {"masked": slice(0, VOCAB // 2), "softcap": 2.5},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_statistics_and_gradient_against_float64(backend, case):
    device = device_of(backend)
    problem = _problem(seed=1, **CASES[case])
    oracle = _oracle(problem)
    stats = _stats(backend, _on(problem, device), with_metrics=True, keep_logits=False)
    for field in ("max_logit", "log_sum_exp", "target_logit", "mean_shifted", "log_sum_sq_probs"):
        assert rel_err(getattr(stats, field), oracle[field]) < 1e-5, field
    assert rel_err(stats.logp, oracle["logp"]) < 1e-5
    assert rel_err(stats.entropy, oracle["entropy"]) < 1e-5
    if CASES[case].get("masked") is not None and CASES[case].get("softcap") is None:
        assert torch.all(stats.mean_logit.cpu() == -math.inf)  # the true mean of logits with -inf among them
    else:
        assert rel_err(stats.mean_logit, oracle["mean_logit"]) < 1e-5

    gen = torch.Generator().manual_seed(2)
    grad_logp, grad_entropy = torch.randn(TOKENS, generator=gen), torch.randn(TOKENS, generator=gen)
    expected = _oracle_grad(oracle, problem["targets"], grad_logp, grad_entropy, problem["head"])
    for keep_logits in (False, True):
        stats = _stats(backend, _on(problem, device), with_metrics=True, keep_logits=keep_logits)
        grad = _grad(backend, _on(problem, device), stats, grad_logp.to(device), grad_entropy.to(device))
        assert torch.isfinite(grad).all(), keep_logits
        assert rel_err(grad, expected) < 1e-5, keep_logits
        stats = _stats(backend, _on(problem, device), with_metrics=False, keep_logits=keep_logits)
        grad = _grad(backend, _on(problem, device), stats, grad_logp.to(device), None)
        assert rel_err(grad, _oracle_grad(oracle, problem["targets"], grad_logp, 0 * grad_entropy,
                                          problem["head"])) < 1e-5  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("target", [-1, VOCAB, 2**40])
def test_target_outside_the_vocabulary_gives_nan_never_a_number(backend, target):
    device = device_of(backend)
    problem = _problem(seed=3)
    problem["targets"][2] = target
    problem = _on(problem, device)
    stats = _stats(backend, problem, with_metrics=True)
    logp = stats.logp.cpu()
    assert torch.isnan(logp[2]) and torch.isfinite(logp[[0, 1, 3, 4, 5, 6]]).all()
    grad = _grad(backend, problem, stats, torch.ones(TOKENS, device=device), None).cpu()
    assert torch.isnan(grad[2]).all() and torch.isfinite(grad[[0, 1, 3, 4, 5, 6]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", ["+inf bias", "nan bias", "nan hidden", "all -inf"])
def test_non_finite_logits_give_nan(backend, poison):
    problem = _problem(seed=4)
    if poison == "+inf bias":
        problem["bias"][17] = math.inf
    elif poison == "nan bias":
        problem["bias"][17] = math.nan
    elif poison == "nan hidden":
        problem["hidden"][problem["rows"][3], 5] = math.nan
    else:
        problem["bias"][:] = -math.inf
    stats = _stats(backend, _on(problem, device_of(backend)), with_metrics=True)
    poisoned = [3] if poison == "nan hidden" else list(range(TOKENS))
    assert torch.isnan(stats.logp.cpu()[poisoned]).all()
    assert torch.isnan(stats.entropy.cpu()[poisoned]).all()


def _layouts(problem):
    """The same values in adversarial layouts: transposed storage, strided, expanded, sliced."""
    hidden, weight, bias = problem["hidden"], problem["weight"], problem["bias"]
    rows, targets = problem["rows"], problem["targets"]
    padded_bias = torch.zeros(2 * VOCAB, dtype=bias.dtype, device=bias.device)
    padded_bias[::2] = bias
    padded_rows = torch.zeros(2 * TOKENS, dtype=rows.dtype, device=rows.device)
    padded_rows[1::2] = rows
    padded_targets = torch.zeros(3 * TOKENS, dtype=targets.dtype, device=targets.device)
    padded_targets[::3] = targets
    yield "hidden transposed", {**problem, "hidden": hidden.t().contiguous().t()}
    yield "hidden sliced columns", {**problem, "hidden": torch.cat([hidden, hidden], 1)[:, :HIDDEN]}
    yield "weight transposed", {**problem, "weight": weight.t().contiguous().t()}
    yield "weight sliced", {**problem, "weight": torch.cat([weight, weight], 1)[:, HIDDEN:]}
    yield "bias strided", {**problem, "bias": padded_bias[::2]}
    yield "rows and targets strided", {**problem, "rows": padded_rows[1::2], "targets": padded_targets[::3]}


@pytest.mark.parametrize("backend", BACKENDS)
def test_adversarial_layouts_equal_contiguous(backend):
    device = device_of(backend)
    problem = _on(_problem(seed=5, softcap=3.0), device)
    base = _stats(backend, problem, with_metrics=True)
    grad_logp = torch.linspace(-1, 1, TOKENS, device=device)
    base_grad = _grad(backend, problem, _stats(backend, problem, True), grad_logp, grad_logp.flip(0))
    for layout, variant in _layouts(problem):
        stats = _stats(backend, variant, with_metrics=True)
        for field in ("max_logit", "log_sum_exp", "target_logit", "mean_shifted", "mean_logit", "log_sum_sq_probs"):
            assert rel_err(getattr(stats, field), getattr(base, field)) < 1e-6, (layout, field)
        grad = _grad(backend, variant, _stats(backend, variant, True), grad_logp, grad_logp.flip(0))
        assert rel_err(grad, base_grad) < 1e-6, layout


@pytest.mark.parametrize("backend", BACKENDS)
def test_expanded_bias_equals_materialized(backend):
    device = device_of(backend)
    problem = _on(_problem(seed=6), device)
    problem["bias"] = torch.full((VOCAB,), 0.25, dtype=problem["bias"].dtype, device=device)
    base = _stats(backend, problem, with_metrics=True)
    expanded = {**problem, "bias": torch.tensor(0.25, dtype=problem["bias"].dtype, device=device).expand(VOCAB)}
    stats = _stats(backend, expanded, with_metrics=True)
    assert rel_err(stats.log_sum_exp, base.log_sum_exp) < 1e-6 and rel_err(stats.logp, base.logp) < 1e-6
