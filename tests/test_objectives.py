"""The DPO objectives: TRL's formulas, and closed-form gradients equal to autograd's."""

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import dpo_fast
from dpo_fast import objectives


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return math.exp(_logsigmoid(x))


def _trl_formula(c: float, r: float, beta: float, loss_type: str, ls: float) -> float:
    """One pair's loss, written out in scalars from TRL 1.16's ``DPOTrainer._compute_loss``."""
    u = c - r
    if loss_type == "sigmoid":
        return -(1 - ls) * _logsigmoid(beta * u) - ls * _logsigmoid(-beta * u)
    if loss_type == "robust":
        return (-(1 - ls) * _logsigmoid(beta * u) + ls * _logsigmoid(-beta * u)) / (1 - 2 * ls)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * u)
    if loss_type == "ipo":
        return (u - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        qw, ql = _sigmoid(beta * u), _sigmoid(-beta * u)
        return qw * (_logsigmoid(beta * u) - math.log1p(-ls)) + ql * (_logsigmoid(-beta * u) - math.log(ls))
    if loss_type == "nca_pair":
        return -_logsigmoid(beta * c) - 0.5 * _logsigmoid(-beta * c) - 0.5 * _logsigmoid(-beta * r)
    if loss_type == "bco_pair":
        return -_logsigmoid(beta * c) - _logsigmoid(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - _sigmoid(beta * c) + _sigmoid(beta * r)
    if loss_type == "apo_down":
        return _sigmoid(beta * c) + 1 - _sigmoid(beta * u)
    raise AssertionError(loss_type)


logratios = st.lists(st.floats(-30, 30), min_size=1, max_size=8)
objective_options = dict(
    chosen=logratios,
    shift=st.floats(-10, 10),
    beta=st.floats(0.01, 5),
    loss_type=st.sampled_from(objectives.LOSS_TYPES),
    label_smoothing=st.sampled_from([0.0, 0.1, 0.3]),
)


@given(**objective_options)
def test_pair_losses_follow_the_formulas(chosen, shift, beta, loss_type, label_smoothing):
    assume(loss_type != "exo_pair" or label_smoothing > 0)
    chosen_t = torch.tensor(chosen, dtype=torch.float64)
    rejected_t = chosen_t * 0.5 + shift
    got = objectives.pair_losses(chosen_t, rejected_t, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    want = [
        _trl_formula(c, r, beta, loss_type, label_smoothing) for c, r in zip(chosen_t.tolist(), rejected_t.tolist())
    ]
    assert got.tolist() == pytest.approx(want, rel=1e-9, abs=1e-12)


@given(**objective_options)
def test_closed_form_grads_equal_autograd(chosen, shift, beta, loss_type, label_smoothing):
    assume(loss_type != "exo_pair" or label_smoothing > 0)
    chosen_t = torch.tensor(chosen, dtype=torch.float64, requires_grad=True)
    rejected_t = (chosen_t.detach() * 0.5 + shift).requires_grad_(True)
    options = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
    objectives.pair_losses(chosen_t, rejected_t, **options).sum().backward()
    grad_chosen, grad_rejected = objectives.pair_loss_grads(chosen_t.detach(), rejected_t.detach(), **options)
    torch.testing.assert_close(grad_chosen, chosen_t.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_rejected, rejected_t.grad, rtol=1e-9, atol=1e-12)


def test_ipo_averages_by_default_and_others_sum():
    assert objectives.default_average_log_prob("ipo")
    assert not any(objectives.default_average_log_prob(t) for t in objectives.LOSS_TYPES if t != "ipo")


def test_unknown_loss_type_is_refused():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="loss_type"):
        objectives.pair_losses(x, x, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="loss_type"):
        objectives.pair_loss_grads(x, x, beta=0.1, loss_type="kto")


@pytest.mark.parametrize("label_smoothing", [0.0, 1.0])
def test_exo_pair_needs_a_positive_epsilon(label_smoothing):
    hidden, weight, labels = torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \(0, 1\) for loss_type='exo_pair'"):
        dpo_fast.fused_linear_dpo_loss(
            hidden, weight, labels, loss_type="exo_pair", label_smoothing=label_smoothing, reference_free=True
        )
