"""DPOObjective against TRL 1.16's own ``DPOTrainer._compute_loss``, run in float64 on per-token log-probs.

TRL's method is called unchanged, on a stand-in trainer holding the options and a stand-in model whose
fused LM head returns the given per-token log-probs: every option it reads (several loss types with
weights, f-divergences, LD-DPO, WPO, aot, discopop, sft) goes through TRL's code. dpo_fast's side goes
through the whole contract of ``dpo_fast.objectives.interface``: token weights, per-sequence sums,
``evaluate``, per-token gradients. Loss and per-token gradients must agree.
"""

import types
from collections import defaultdict

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from trl import DPOTrainer

from dpo_fast import objectives
from dpo_fast.objectives import BatchConstants, DPOObjective, PairTerm, trl_dpo_objective

TRL_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
F_DIVERGENCE_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, tensor):
        return tensor

    gather = gather_for_metrics


def _trl_trainer(options: dict) -> types.SimpleNamespace:
    """The attributes ``DPOTrainer._compute_loss`` reads, for one process with precomputed reference log-probs."""
    return types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        precompute_ref_logps=True,
        aux_loss_enabled=False,
        beta=options["beta"],
        loss_types=list(options["loss_type"]),
        loss_weights=list(options["loss_weights"]),
        label_smoothing=options["label_smoothing"],
        f_divergence_type=options["f_divergence_type"],
        f_alpha_divergence_coef=options["f_alpha_divergence_coef"],
        ld_alpha=options["ld_alpha"],
        use_weighting=options["use_weighting"],
        args=types.SimpleNamespace(discopop_tau=options["discopop_tau"]),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )


def _batch(seed: int, pairs: int, length: int) -> dict:
    """A padded DPO batch: per-token log-probs (2P, T-1) on the completion tokens (0 elsewhere, as TRL's head)."""
    gen = torch.Generator().manual_seed(seed)
    completion_mask = torch.zeros(2 * pairs, length, dtype=torch.long)
    for row in range(2 * pairs):
        prompt = int(torch.randint(1, 3, (), generator=gen))  # a non-empty prompt: TRL's counts then agree
        # completions of 0 .. T-prompt tokens; the first has one at least: TRL's sft is NaN without a chosen token
        end = int(torch.randint(prompt + (row == 0), length + 1, (), generator=gen))
        completion_mask[row, prompt:end] = 1
    completion = completion_mask[:, 1:].bool()
    token_logps = torch.where(completion, -4 * torch.rand(completion.shape, generator=gen, dtype=torch.float64), 0.0)
    log_sum_sq_probs = torch.where(
        completion, -2 * torch.rand(completion.shape, generator=gen, dtype=torch.float64), 0.0
    )
    return {
        "completion_mask": completion_mask,
        "completion": completion,
        "token_logps": token_logps,
        "log_sum_sq_probs": log_sum_sq_probs,
        "ref_logps": token_logps.sum(1) + 3 * torch.randn(2 * pairs, generator=gen, dtype=torch.float64),
    }


def trl_loss_and_token_grads(
    options: dict, batch: dict, dtype=torch.float64, backward: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    token_logps = batch["token_logps"].detach().to(dtype, copy=True).requires_grad_(backward)
    outputs = types.SimpleNamespace(
        log_probs=token_logps,
        log_sum_sq_probs=batch["log_sum_sq_probs"].to(dtype),
        entropy=torch.zeros_like(token_logps),
        mean_logits=torch.zeros_like(token_logps),
        is_top1=torch.zeros(token_logps.shape, dtype=torch.bool),
        aux_loss=None,
    )
    pairs = token_logps.shape[0] // 2
    ref = batch["ref_logps"].to(dtype)
    inputs = {
        "input_ids": torch.zeros_like(batch["completion_mask"]),
        "attention_mask": torch.ones_like(batch["completion_mask"]),
        "completion_mask": batch["completion_mask"],
        "ref_chosen_logps": ref[:pairs],
        "ref_rejected_logps": ref[pairs:],
    }
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # TRL's exo_pair makes its epsilon with torch.tensor(label_smoothing)
    try:
        loss = DPOTrainer._compute_loss(_trl_trainer(options), lambda **_: outputs, inputs, False)
    finally:
        torch.set_default_dtype(default_dtype)
    if not backward:
        return loss.double(), None
    loss.backward()
    # TRL's LD-DPO masks reach the padding after a completion, where the head's log-prob is a constant 0:
    # only the completion tokens' gradients exist in a real model
    return loss.detach().double(), torch.where(batch["completion"], token_logps.grad.double(), 0.0)


def ours_loss_and_token_grads(objective: DPOObjective, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    completion = batch["completion"]
    rows, length = completion.shape
    segment_ids = torch.arange(rows).repeat_interleave(length)
    weights = objectives.token_weights(objective, completion.reshape(-1), segment_ids, rows)
    seqs = objectives.sequence_inputs(
        batch["token_logps"].reshape(-1),
        segment_ids,
        rows,
        weights,
        ref_logps=batch["ref_logps"],
        log_sum_sq_probs=batch["log_sum_sq_probs"].reshape(-1) if objective.use_weighting else None,
    )
    chosen_tokens = completion[: rows // 2].sum()
    value = objective.evaluate(seqs, BatchConstants(num_units=rows // 2, nll_tokens=chosen_tokens))
    return value.loss, objectives.token_grads(value, segment_ids, weights).view(rows, length)


@st.composite
def trl_options(draw):
    f_divergence_type = draw(
        st.sampled_from(["reverse_kl", "reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"])
    )
    allowed = TRL_LOSS_TYPES if f_divergence_type == "reverse_kl" else F_DIVERGENCE_TYPES
    loss_type = draw(st.lists(st.sampled_from(allowed), min_size=1, max_size=3))
    # WPO: TRL refuses aot, fails on sft, and its backward fails on hinge (test_wpo_hinge_...)
    use_weighting = draw(st.booleans()) and not set(loss_type) & {"aot", "aot_unpaired", "sft", "hinge"}
    return {
        "loss_type": loss_type,
        "loss_weights": draw(st.lists(st.floats(0.1, 2.0), min_size=len(loss_type), max_size=len(loss_type))),
        "beta": draw(st.floats(0.05, 2.0)),
        "label_smoothing": draw(st.sampled_from([0.05, 0.2, 0.4])),
        "f_divergence_type": f_divergence_type,
        "f_alpha_divergence_coef": draw(st.sampled_from([-1.0, 0.3, 0.5, 1.0, 2.5])),
        "discopop_tau": draw(st.floats(0.02, 1.0)),
        "ld_alpha": draw(st.one_of(st.none(), st.floats(0.0, 1.0))),
        "use_weighting": use_weighting,
    }


@given(options=trl_options(), seed=st.integers(0, 2**16), pairs=st.integers(1, 4))
def test_dpo_objective_equals_trl_compute_loss(options, seed, pairs):
    batch = _batch(seed, pairs, length=9)
    # TRL's alpha-divergence clamps by the log-ratios' dtype and knows no float64: it runs in float32
    alpha = options["f_divergence_type"] == "alpha_divergence" and options["f_alpha_divergence_coef"] != 1.0
    trl_loss, trl_grads = trl_loss_and_token_grads(options, batch, torch.float32 if alpha else torch.float64)
    loss, grads = ours_loss_and_token_grads(trl_dpo_objective(**options), batch)
    if "discopop" in options["loss_type"] and trl_loss.isnan():
        # TRL's exp(-x) * sigmoid(x/tau) is inf * 0 past x < -709 (f-divergence scores reach there);
        # dpo_fast takes exp(-x + logsigmoid(x/tau)): finite (test_objectives.py::test_discopop_is_finite...)
        assert loss.isfinite() and grads.isfinite().all()
        return
    tolerance = {"rtol": 2e-5, "atol": 1e-6} if alpha else {"rtol": 1e-9, "atol": 1e-12}
    torch.testing.assert_close(loss, trl_loss, **tolerance)
    torch.testing.assert_close(grads, trl_grads, **tolerance)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_sorted_losses_match_trl_and_are_not_pair_local(loss_type):
    options = {
        "loss_type": [loss_type],
        "loss_weights": [1.0],
        "beta": 0.5,
        "label_smoothing": 0.1,
        "f_divergence_type": "reverse_kl",
        "f_alpha_divergence_coef": 0.5,
        "discopop_tau": 0.05,
        "ld_alpha": None,
        "use_weighting": False,
    }
    batch = _batch(seed=3, pairs=6, length=8)
    objective = trl_dpo_objective(**options)
    loss, grads = ours_loss_and_token_grads(objective, batch)
    torch.testing.assert_close((loss, grads), trl_loss_and_token_grads(options, batch), rtol=1e-9, atol=1e-12)
    assert not objective.local
    assert trl_dpo_objective(**{**options, "loss_type": ["sigmoid", "sft"], "loss_weights": None}).local


def test_ld_alpha_weights_the_tokens_past_the_shared_length():
    objective = DPOObjective(ld_alpha=0.25)
    # pair 0: chosen 3 tokens, rejected 5; pair 1: chosen 2, rejected 0 (packed, interleaved order)
    segment_ids = torch.tensor([2, 0, 2, 0, 2, 2, 0, 1, 2, 1, 0])
    completion = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    weights = objectives.token_weights(objective, completion, segment_ids, num_sequences=4)
    want = torch.tensor([1, 1, 1, 1, 1, 0.25, 1, 0.25, 0.25, 0.25, 0], dtype=torch.float64)
    torch.testing.assert_close(weights.logps, want)
    assert weights.nll is None


def test_sft_without_chosen_tokens_is_zero_where_trl_gives_nan():
    """A batch whose chosen completions are all empty: TRL's mean over no tokens is NaN; dpo_fast's NLL is 0."""
    batch = _batch(seed=1, pairs=2, length=6)
    batch["completion_mask"][:2] = 0
    batch["completion"][:2] = False
    batch["token_logps"][:2] = 0
    options = {
        "loss_type": ["sft"], "loss_weights": [1.0], "beta": 0.1, "label_smoothing": 0.0,
        "f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5, "discopop_tau": 0.05, "ld_alpha": None,
        "use_weighting": False,
    }  # fmt: skip
    assert trl_loss_and_token_grads(options, batch)[0].isnan()
    loss, grads = ours_loss_and_token_grads(trl_dpo_objective("sft"), batch)
    assert loss == 0 and (grads == 0).all()


def test_sft_alone_is_the_mean_nll_of_the_chosen_tokens():
    batch = _batch(seed=1, pairs=3, length=8)
    loss, _ = ours_loss_and_token_grads(trl_dpo_objective("sft"), batch)
    chosen = batch["completion"][:3]
    torch.testing.assert_close(loss, -batch["token_logps"][:3][chosen].mean())
    assert trl_dpo_objective("sft").needs == objectives.Needs(nll=True)


def test_wpo_with_sft_is_refused_as_trl_itself_fails_on_it():
    options = {
        "loss_type": ["sigmoid", "sft"],
        "loss_weights": [1.0, 1.0],
        "beta": 0.1,
        "label_smoothing": 0.0,
        "f_divergence_type": "reverse_kl",
        "f_alpha_divergence_coef": 0.5,
        "discopop_tau": 0.05,
        "ld_alpha": None,
        "use_weighting": True,
    }
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        trl_loss_and_token_grads(options, _batch(seed=0, pairs=2, length=6))
    with pytest.raises(ValueError, match="use_weighting=True"):
        trl_dpo_objective(**options)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: PairTerm("kto"), "loss_type must be one of"),
        (lambda: DPOObjective(terms=()), "terms must hold"),
        (lambda: DPOObjective(terms=("sigmoid",)), "terms must be a sequence of PairTerm"),
        (lambda: DPOObjective(beta=0.0), "beta must be a positive number"),
        (lambda: PairTerm("robust", label_smoothing=0.5), r"\[0, 0.5\) for loss_type='robust'"),
        (lambda: PairTerm("exo_pair"), r"\(0, 1\) for loss_type='exo_pair'"),
        (lambda: DPOObjective(f_divergence_type="kl"), "f_divergence_type must be one of"),
        (lambda: DPOObjective(f_divergence_type="js_divergence", terms=(PairTerm("nca_pair"),)),
         "applies only to the loss types"),
        (lambda: DPOObjective(use_weighting=True, terms=(PairTerm("aot"),)), "use_weighting=True"),
        (lambda: DPOObjective(ld_alpha=1.5), "ld_alpha must lie in"),
        (lambda: DPOObjective(discopop_tau=0.0), "discopop_tau must be a positive number"),
    ],
)  # fmt: skip
def test_invalid_options_are_refused_by_name(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_loss_weights_must_match_loss_types():
    with pytest.raises(ValueError, match="one weight per loss_type"):
        trl_dpo_objective(["sigmoid", "sft"], loss_weights=[1.0])


def test_trl_applies_label_smoothing_where_trl_does():
    objective = trl_dpo_objective(["sigmoid", "robust", "aot"], label_smoothing=0.2)
    assert [term.label_smoothing for term in objective.terms] == [0.0, 0.2, 0.2]


def test_wpo_hinge_matches_trl_forward_and_its_finite_differences():
    """TRL 1.16's backward fails on hinge with WPO (an in-place product on relu's saved output); its forward
    runs, so the gradient is checked against central differences of TRL's own loss."""
    options = {
        "loss_type": ["hinge"],
        "loss_weights": [1.0],
        "beta": 0.3,
        "label_smoothing": 0.0,
        "f_divergence_type": "reverse_kl",
        "f_alpha_divergence_coef": 0.5,
        "discopop_tau": 0.05,
        "ld_alpha": None,
        "use_weighting": True,
    }
    batch = _batch(seed=5, pairs=3, length=7)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        trl_loss_and_token_grads(options, batch)

    def trl_forward(index, step):
        """TRL's loss with one token's log-prob moved by ``step``; WPO's weights, detached in TRL, held fixed
        by moving that token's ``log sum p^2`` alike."""
        moved = {key: batch[key].clone() for key in ("token_logps", "log_sum_sq_probs")}
        for tensor in moved.values():
            tensor[index] += step
        with torch.no_grad():
            return trl_loss_and_token_grads(options, {**batch, **moved}, backward=False)[0]

    loss, grads = ours_loss_and_token_grads(trl_dpo_objective(**options), batch)
    torch.testing.assert_close(loss, trl_forward((0, 0), 0.0), rtol=1e-12, atol=1e-12)
    step = 1e-6
    for index in map(tuple, batch["completion"].nonzero().tolist()):
        difference = (trl_forward(index, step) - trl_forward(index, -step)) / (2 * step)
        torch.testing.assert_close(grads[index], difference, rtol=1e-6, atol=1e-9)
