"""The objectives' pieces and contract: formulas, slopes against float64 autograd, pair-locality, compile.

TRL parity of each objective lives in ``test_objectives_dpo.py``, ``test_objectives_reference_free.py`` and
``test_objectives_kto.py``; here the building blocks and the interface the fused pass relies on.
"""

import decimal
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

import dpo_fast
from dpo_fast import objectives
from dpo_fast.objectives import (
    BatchConstants,
    CPOObjective,
    DPOObjective,
    KTOObjective,
    ORPOObjective,
    PairTerm,
    elementwise,
)

_SINGLE_PAIR_TYPES = (
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
)  # fmt: skip


def _trl_formula(c: torch.Tensor, r: torch.Tensor, beta: float, loss_type: str, ls: float) -> torch.Tensor:
    """One pair's loss, written out from TRL 1.16's ``DPOTrainer._compute_loss`` (cDPO for ``sigmoid``)."""
    u = c - r
    if loss_type == "sigmoid":
        return -(1 - ls) * F.logsigmoid(beta * u) - ls * F.logsigmoid(-beta * u)
    if loss_type == "robust":
        return (-(1 - ls) * F.logsigmoid(beta * u) + ls * F.logsigmoid(-beta * u)) / (1 - 2 * ls)
    if loss_type == "hinge":
        return torch.relu(1 - beta * u)
    if loss_type == "ipo":
        return (u - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        qw, ql = torch.sigmoid(beta * u), torch.sigmoid(-beta * u)
        return qw * (F.logsigmoid(beta * u) - math.log1p(-ls)) + ql * (F.logsigmoid(-beta * u) - math.log(ls))
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * u)
    raise AssertionError(loss_type)


logratios = st.lists(st.floats(-30, 30), min_size=1, max_size=8)
objective_options = {
    "chosen": logratios,
    "shift": st.floats(-10, 10),
    "beta": st.floats(0.01, 5),
    "loss_type": st.sampled_from(_SINGLE_PAIR_TYPES),
    "label_smoothing": st.sampled_from([0.0, 0.1, 0.3]),
}


@given(**objective_options)
def test_single_loss_types_follow_the_formulas(chosen, shift, beta, loss_type, label_smoothing):
    """``dpo_objective`` of one loss type (``fused_linear_dpo_loss``'s semantics: cDPO for sigmoid) on summed
    log-ratios: the mean of TRL's per-pair formula, and its gradient."""
    assume(loss_type != "exo_pair" or label_smoothing > 0)
    chosen_t = torch.tensor(chosen, dtype=torch.float64, requires_grad=True)
    rejected_t = (chosen_t.detach() * 0.5 + shift).requires_grad_(True)
    if loss_type == "hinge":  # away from the kink, where the subgradient is a convention
        assume(bool((1 - beta * (chosen_t - rejected_t)).abs().min() > 1e-6))
    want = _trl_formula(chosen_t, rejected_t, beta, loss_type, label_smoothing).mean()
    want.backward()
    objective = objectives.dpo_objective(loss_type, beta=beta, label_smoothing=label_smoothing, average_log_prob=False)
    logps = torch.cat([chosen_t, rejected_t]).detach()
    value = objective.evaluate(
        objectives.SequenceInputs(logps=logps, token_counts=torch.ones_like(logps)),
        BatchConstants(num_units=len(chosen)),
    )
    torch.testing.assert_close(value.loss, want.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(value.grad_logps, torch.cat([chosen_t.grad, rejected_t.grad]), rtol=1e-9, atol=1e-12)


def _slope_by_autograd(function, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    function(x)[0].sum().backward()
    return x.grad


values = st.lists(st.floats(-60, 60), min_size=1, max_size=6)


@given(
    margins=values,
    kind=st.sampled_from(elementwise.MARGIN_LOSSES),
    beta=st.floats(0.05, 3),
    ls=st.sampled_from([0.05, 0.2, 0.4]),
    tau=st.floats(0.02, 1.0),
)
def test_margin_loss_slopes_equal_autograd(margins, kind, beta, ls, tau):
    m = torch.tensor(margins, dtype=torch.float64)
    if kind == "hinge":
        assume(bool((1 - beta * m).abs().min() > 1e-6))
    _, slope = elementwise.margin_loss(kind, m, beta, ls, tau)
    want = _slope_by_autograd(lambda x: elementwise.margin_loss(kind, x, beta, ls, tau), m)
    torch.testing.assert_close(slope, want, rtol=1e-9, atol=1e-12)


@given(
    logratios=values,
    kind=st.sampled_from(elementwise.F_DIVERGENCES),
    alpha=st.sampled_from([-1.0, 0.3, 0.5, 1.0, 2.5]),
)
def test_f_divergence_slopes_equal_autograd(logratios, kind, alpha):
    x = torch.tensor(logratios, dtype=torch.float64)
    if kind == "alpha_divergence" and alpha != 1.0:  # away from TRL's clamp, where the slope jumps to 0
        assume(bool(((alpha - 1) * x - elementwise.ALPHA_DIVERGENCE_CLAMP).abs().min() > 1e-6))
    _, slope = elementwise.f_divergence_score(kind, x, alpha)
    want = _slope_by_autograd(lambda t: elementwise.f_divergence_score(kind, t, alpha), x)
    torch.testing.assert_close(slope, want, rtol=1e-9, atol=1e-12)


def test_alpha_divergence_past_the_clamp_is_flat_as_in_trl():
    logratio = torch.tensor([-50.0, -39.0, 10.0], dtype=torch.float64)  # alpha = -1: exponents 100, 78, -20
    score, slope = elementwise.f_divergence_score("alpha_divergence", logratio, alpha=-1.0)
    trl = (torch.exp(torch.clamp(-2.0 * logratio.float(), max=80.0)) - 1.0).double() * -0.5
    torch.testing.assert_close(score, trl, rtol=1e-6, atol=0)
    assert slope[0] == 0 and slope[1] > 0


def test_discopop_is_finite_where_trl_overflows():
    value, slope = elementwise.margin_loss("discopop", torch.tensor([-800.0, 800.0], dtype=torch.float64), 1.0)
    assert torch.isfinite(value).all() and torch.isfinite(slope).all()
    torch.testing.assert_close(value, torch.tensor([800.0, 0.0], dtype=torch.float64))  # -logsigmoid(-800), 0


@given(x=st.lists(st.floats(-40, -1e-9), min_size=1, max_size=6))
def test_log1mexp_value_and_slope(x):
    """Against 40-digit decimal arithmetic: ``log(1 - e^x)`` and its slope ``-e^x / (1 - e^x)``."""
    with decimal.localcontext() as context:
        context.prec = 40
        exps = [decimal.Decimal(v).exp() for v in x]
        want_value = [float((1 - e).ln()) for e in exps]
        want_slope = [float(-e / (1 - e)) for e in exps]
    value, slope = elementwise.log1mexp(torch.tensor(x, dtype=torch.float64))
    torch.testing.assert_close(value, torch.tensor(want_value, dtype=torch.float64), rtol=1e-14, atol=0)
    torch.testing.assert_close(slope, torch.tensor(want_slope, dtype=torch.float64), rtol=1e-14, atol=0)


def test_default_average_log_prob():
    averaged = [t for t in objectives.DPO_LOSS_TYPES if objectives.default_average_log_prob(t)]
    assert averaged == ["ipo", "sigmoid_norm"]


def test_reported_units_are_averaged_when_every_pairwise_term_is():
    assert objectives.dpo_objective("ipo").averaged and objectives.dpo_objective(["ipo", "sft"]).averaged
    assert not objectives.dpo_objective(["ipo", "sigmoid"]).averaged and not objectives.dpo_objective("sft").averaged
    assert objectives.dpo_objective("sigmoid", average_log_prob=True).averaged
    assert not objectives.dpo_objective("ipo", average_log_prob=False).averaged
    assert CPOObjective(loss_type="simpo").averaged and ORPOObjective().averaged and not KTOObjective().averaged


@pytest.mark.parametrize(
    "options, match",
    [
        ({"loss_type": "kto"}, r"loss_type must be one of .*got 'kto'"),
        ({"loss_type": None}, r"loss_type must be one of .*got None"),
        ({"loss_type": []}, r"loss_type must be one of .*non-empty list of them, got \[\]"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "one weight per loss_type"),
        ({"loss_type": "sigmoid", "loss_weights": 1.0}, "loss_weights must be a list"),
        ({"loss_type": "sigmoid", "label_smoothing": 0.6}, r"\[0, 0.5\] for loss_type='sigmoid'"),
        ({"loss_type": "sigmoid_norm", "label_smoothing": 0.6}, r"\[0, 0.5\] for loss_type='sigmoid_norm'"),
        (
            {"loss_type": "sigmoid", "label_smoothing": "0.1"},
            r"label_smoothing must be a number in \[0, 1\], got '0.1'",
        ),
        ({"loss_type": "sigmoid", "beta": torch.tensor(0.1)}, r"beta must be a positive number, got tensor"),
        (
            {"loss_type": "sigmoid", "loss_weights": [float("nan")]},
            "the weight of loss_type='sigmoid' must be a finite",
        ),
        ({"loss_type": "sigmoid", "use_weighting": 1}, "use_weighting must be True or False, got 1"),
        ({"loss_type": "sigmoid", "average_log_prob": "yes"}, "average_log_prob must be True or False or None"),
        ({"loss_type": "sigmoid", "ld_alpha": "0.5"}, r"ld_alpha must be a number in \[0, 1\]"),
    ],
)
def test_dpo_objective_refuses_bad_options_by_name(options, match):
    with pytest.raises(ValueError, match=match):
        objectives.dpo_objective(**options)


def test_options_are_stored_as_python_floats():
    """Whatever number type they came as: the objective stays hashable and crosses a custom op as JSON."""
    numpy = pytest.importorskip("numpy")
    objective = objectives.dpo_objective("ipo", beta=numpy.float32(0.25), loss_weights=[numpy.int64(2)], ld_alpha=1)
    assert type(objective.beta) is float and type(objective.terms[0].weight) is float
    assert type(objective.ld_alpha) is float and objective.beta == 0.25
    assert objectives.decode_objective(objectives.encode_objective(objective)) == objective
    kto = KTOObjective(beta=numpy.float64(0.5), desirable_weight=2)
    assert type(kto.desirable_weight) is float and hash(kto) == hash(KTOObjective(beta=0.5, desirable_weight=2.0))


@pytest.mark.parametrize("label_smoothing", [0.0, 1.0])
def test_exo_pair_needs_a_positive_epsilon(label_smoothing):
    hidden, weight, labels = torch.randn(2, 3, 4), torch.randn(5, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \(0, 1\) for loss_type='exo_pair'"):
        dpo_fast.fused_linear_dpo_loss(
            hidden, weight, labels, loss_type="exo_pair", label_smoothing=label_smoothing, reference_free=True
        )


# ----------------------------------------------------------------------------------------------
# The interface: per-sequence sums, per-token gradients, pair-locality


def test_completion_positions_follow_token_order_within_each_sequence():
    segment_ids = torch.tensor([1, 0, 1, 1, 0, 2, 0])
    completion = torch.tensor([1, 0, 1, 1, 1, 1, 1], dtype=torch.bool)
    positions = objectives.interface.completion_positions(completion, segment_ids, 3)
    assert positions[completion].tolist() == [1, 2, 3, 1, 1, 2]


def _random_units(objective, units: int, seed: int) -> objectives.SequenceInputs:
    gen = torch.Generator().manual_seed(seed)
    sequences = 2 * units if objective.paired else units
    counts = torch.randint(1, 9, (sequences,), generator=gen).double()
    logps = -counts * (0.2 + torch.rand(sequences, generator=gen, dtype=torch.float64))
    return objectives.SequenceInputs(
        logps=logps,
        token_counts=counts,
        ref_logps=logps + torch.randn(sequences, generator=gen, dtype=torch.float64),
        nll_logps=logps - counts * torch.rand(sequences, generator=gen, dtype=torch.float64),
        wpo_logps=logps + counts * torch.rand(sequences, generator=gen, dtype=torch.float64),
        desirable=torch.rand(sequences, generator=gen) < 0.5,
    )


def _select_units(seqs: objectives.SequenceInputs, units: torch.Tensor, paired: bool, total: int):
    index = torch.cat([units, units + total]) if paired else units
    return objectives.SequenceInputs(
        **{name: None if value is None else value[index] for name, value in vars(seqs).items()}
    ), index


LOCAL_OBJECTIVES = [
    DPOObjective(beta=0.3, terms=(PairTerm("sigmoid", 0.7), PairTerm("ipo", 0.2), PairTerm("sft", 0.5))),
    DPOObjective(beta=0.3, terms=(PairTerm("discopop"), PairTerm("bco_pair", 2.0)), use_weighting=True, ld_alpha=0.5),
    DPOObjective(beta=1.0, terms=(PairTerm("robust", label_smoothing=0.2),), f_divergence_type="js_divergence"),
    CPOObjective(beta=2.0, loss_type="simpo", simpo_gamma=0.6, alpha=0.3),
    ORPOObjective(beta=0.2),
    KTOObjective(beta=0.4, desirable_weight=1.3),
]


@pytest.mark.parametrize("objective", LOCAL_OBJECTIVES, ids=lambda o: type(o).__name__)
def test_local_objectives_evaluate_group_by_group(objective):
    """A pair-local objective evaluated on groups of whole units: the group losses add up to the batch
    loss and each group's gradients are the batch gradients of its sequences (what the fused pass needs)."""
    units = 7
    seqs = _random_units(objective, units, seed=2)
    batch = BatchConstants(num_units=units, nll_tokens=41.0, kl=0.3)
    whole = objective.evaluate(seqs, batch)
    total = torch.zeros((), dtype=torch.float64)
    for group in (torch.tensor([4, 0]), torch.tensor([1, 2, 3]), torch.tensor([6, 5])):
        group_seqs, index = _select_units(seqs, group, objective.paired, units)
        value = objective.evaluate(group_seqs, batch)
        total += value.loss
        torch.testing.assert_close(value.grad_logps, whole.grad_logps[index], rtol=1e-12, atol=0)
        if whole.grad_nll_logps is not None:
            torch.testing.assert_close(value.grad_nll_logps, whole.grad_nll_logps[index], rtol=1e-12, atol=0)
    torch.testing.assert_close(total, whole.loss, rtol=1e-12, atol=1e-15)
    assert objective.local


def test_aot_is_not_pair_local():
    objective = DPOObjective(terms=(PairTerm("aot"),))
    seqs = _random_units(objective, 6, seed=3)
    batch = BatchConstants(num_units=6)
    whole = objective.evaluate(seqs, batch)
    group_seqs, index = _select_units(seqs, torch.tensor([0, 1, 2]), True, 6)
    assert not torch.allclose(objective.evaluate(group_seqs, batch).grad_logps, whole.grad_logps[index])
    assert not objective.local


@pytest.mark.parametrize(
    "objective", LOCAL_OBJECTIVES + [DPOObjective(terms=(PairTerm("aot_unpaired"),))], ids=lambda o: type(o).__name__
)
def test_objective_loss_gradient_is_evaluate_and_matches_finite_differences(objective):
    seqs = _random_units(objective, 4, seed=5)
    batch = BatchConstants(num_units=4, nll_tokens=17.0, kl=0.2)
    value = objective.evaluate(seqs, batch)
    logps = seqs.logps.clone().requires_grad_(True)
    nll_logps = seqs.nll_logps.clone().requires_grad_(True)
    loss = objectives.objective_loss(
        objective, objectives.SequenceInputs(**{**vars(seqs), "logps": logps, "nll_logps": nll_logps}), batch
    )
    loss.backward()
    torch.testing.assert_close(loss.detach(), value.loss)
    torch.testing.assert_close(logps.grad, value.grad_logps)
    step = 1e-6
    for name in ("logps", "nll_logps"):
        grad = getattr(value, "grad_" + name)
        for i in range(seqs.logps.shape[0]):
            moved = []
            for sign in (1, -1):
                tensor = getattr(seqs, name).clone()
                tensor[i] += sign * step
                moved.append(objective.evaluate(objectives.SequenceInputs(**{**vars(seqs), name: tensor}), batch).loss)
            difference = (moved[0] - moved[1]) / (2 * step)
            torch.testing.assert_close(0.0 if grad is None else grad[i].item(), difference.item(), rtol=1e-6, atol=1e-9)


def test_sums_and_token_grads_are_the_contract():
    """sequence_inputs sums exactly what the docstring says; token_grads is the chain rule back to tokens."""
    objective = DPOObjective(terms=(PairTerm("sigmoid"), PairTerm("sft")), ld_alpha=0.5)
    segment_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    completion = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1, 0, 1], dtype=torch.bool)
    token_logps = -torch.rand(10, dtype=torch.float64)
    log_sum_sq_probs = -torch.rand(10, dtype=torch.float64)
    weights = objectives.token_weights(objective, completion, segment_ids, 4)
    # pair 0: chosen 2 tokens, rejected 3 -> rejected's 3rd weighs 0.5; pair 1: chosen 2, rejected 1 -> chosen's 2nd
    torch.testing.assert_close(weights.logps, torch.tensor([0, 1, 1, 1, 0.5, 1, 1, 0.5, 0, 1], dtype=torch.float64))
    torch.testing.assert_close(weights.nll, torch.tensor([0, 1, 1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.float64))
    token_logps.requires_grad_(True)
    seqs = objectives.sequence_inputs(
        token_logps, segment_ids, 4, weights, ref_logps=torch.zeros(4), log_sum_sq_probs=log_sum_sq_probs
    )
    torch.testing.assert_close(seqs.token_counts, torch.tensor([2.0, 2.0, 3.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(seqs.wpo_logps[2], (token_logps - log_sum_sq_probs)[5:8].sum().detach())
    batch = BatchConstants(num_units=2, nll_tokens=4)
    objectives.objective_loss(objective, seqs, batch).backward()
    grads = objectives.token_grads(objective.evaluate(seqs, batch), segment_ids, weights)
    torch.testing.assert_close(grads, token_logps.grad)
    assert (grads[~completion] == 0).all()


@pytest.mark.parametrize(
    "objective",
    [LOCAL_OBJECTIVES[1], DPOObjective(terms=(PairTerm("aot"),)), LOCAL_OBJECTIVES[5]],
    ids=["dpo", "aot", "kto"],
)
def test_evaluate_compiles_without_graph_breaks(objective):
    seqs = _random_units(objective, 3, seed=7)
    batch = BatchConstants(num_units=3, nll_tokens=torch.tensor(9.0), kl=torch.tensor(0.1))

    def run(logps, ref_logps, token_counts, wpo_logps, nll_logps, desirable):
        inputs = objectives.SequenceInputs(logps, token_counts, ref_logps, nll_logps, wpo_logps, desirable)
        value = objective.evaluate(inputs, batch)
        return value.loss, value.grad_logps

    args = (seqs.logps, seqs.ref_logps, seqs.token_counts, seqs.wpo_logps, seqs.nll_logps, seqs.desirable)
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), run(*args))


_IN_OP_OBJECTIVE = DPOObjective(beta=0.4, terms=(PairTerm("sigmoid"), PairTerm("apo_down", 0.5)), use_weighting=True)


@torch.library.custom_op("dpo_fast_test::objective_in_op", mutates_args=())
def _objective_in_op(
    logps: torch.Tensor, ref_logps: torch.Tensor, token_counts: torch.Tensor, wpo_logps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = objectives.SequenceInputs(logps, token_counts, ref_logps, wpo_logps=wpo_logps)
    value = _IN_OP_OBJECTIVE.evaluate(seqs, BatchConstants(num_units=logps.shape[0] // 2))
    return value.loss, value.grad_logps


@_objective_in_op.register_fake
def _(logps, ref_logps, token_counts, wpo_logps):
    return logps.new_empty((), dtype=torch.float64), torch.empty_like(logps, dtype=torch.float64)


def test_evaluate_runs_inside_a_custom_op_called_from_a_compiled_graph():
    """Where the fused pass calls it: below the autograd key, from a compiled graph (torch.func fails there)."""
    seqs = _random_units(_IN_OP_OBJECTIVE, 4, seed=9)
    args = (seqs.logps, seqs.ref_logps, seqs.token_counts, seqs.wpo_logps)
    compiled = torch.compile(lambda *a: _objective_in_op(*a), fullgraph=True, backend="aot_eager")
    want = _IN_OP_OBJECTIVE.evaluate(seqs, BatchConstants(num_units=4))
    torch.testing.assert_close(compiled(*args), (want.loss, want.grad_logps))


@pytest.mark.parametrize(
    "objective", LOCAL_OBJECTIVES + [DPOObjective(terms=(PairTerm("aot", 1.0, 0.1),), average_log_prob=True)]
)
def test_objectives_cross_a_custom_op_as_strings(objective):
    spec = objectives.encode_objective(objective)
    assert isinstance(spec, str) and objectives.decode_objective(spec) == objective
    assert objectives.encode_objective(objectives.decode_objective(spec)) == spec
