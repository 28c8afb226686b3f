"""CPO, SimPO, AlphaPO and ORPO against TRL 1.16's own trainers (float64) and Liger-Kernel 0.8.5's fused losses.

TRL: ``CPOTrainer.get_batch_loss_metrics`` and ``ORPOTrainer.get_batch_loss_metrics`` run unchanged on a
stand-in trainer and a stand-in model returning ``hidden @ W^T`` as its logits, so TRL's own log-prob,
averaging, NLL and loss code gives the reference loss and, through autograd, ``dL/dhidden``.
Liger: its fused linear losses run on CPU with ``compiled=False``; they compute in float32.
dpo_fast's side: per-token log-probs (float64 autograd), then ``token_weights``, ``sequence_inputs`` and
``objective_loss`` (whose gradient is ``evaluate``'s closed form).
"""

import functools
import types

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from liger_kernel.chunked_loss.cpo_loss import LigerFusedLinearCPOFunction
from liger_kernel.chunked_loss.orpo_loss import LigerFusedLinearORPOFunction
from liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOFunction
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

from dpo_fast import objectives
from dpo_fast.objectives import BatchConstants, CPOObjective, ORPOObjective

VOCAB, HIDDEN = 11, 6


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, tensor):
        return tensor


def _pair_batch(seed: int, pairs: int, length: int) -> dict:
    """Chosen rows then rejected rows, right-padded; labels unshifted as TRL's collator makes them."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    input_ids = torch.randint(1, VOCAB, (rows, length), generator=gen)
    attention_mask = torch.zeros(rows, length, dtype=torch.long)
    labels = torch.full((rows, length), -100)
    for row in range(rows):
        prompt = int(torch.randint(1, 3, (), generator=gen))
        end = int(torch.randint(prompt + 1, length + 1, (), generator=gen))  # at least one completion token
        attention_mask[row, :end] = 1
        labels[row, prompt:end] = input_ids[row, prompt:end]
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "hidden": torch.randn(rows, length, HIDDEN, generator=gen, dtype=torch.float64),
        "weight": torch.randn(VOCAB, HIDDEN, generator=gen, dtype=torch.float64) * 0.7,
    }


def _trl_batch(batch: dict) -> dict:
    pairs = batch["input_ids"].shape[0] // 2
    out = {}
    for name, rows in (("chosen", slice(None, pairs)), ("rejected", slice(pairs, None))):
        out[f"{name}_input_ids"] = batch["input_ids"][rows]
        out[f"{name}_attention_mask"] = batch["attention_mask"][rows]
        out[f"{name}_labels"] = batch["labels"][rows]
    return out


def trl_loss_and_grad(trainer_class, options: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's loss and dL/dhidden, from its own ``get_batch_loss_metrics``."""
    hidden = batch["hidden"].clone().requires_grad_(True)
    trainer = types.SimpleNamespace(
        accelerator=_Accelerator(),
        is_encoder_decoder=False,
        aux_loss_enabled=False,
        pad_token_id=0,
        padding_value=0,
        concatenated_inputs=trainer_class.concatenated_inputs,
        get_batch_logps=trainer_class.get_batch_logps,
        **options,
    )
    for method in ("concatenated_forward", "cpo_loss", "odds_ratio_loss"):
        if hasattr(trainer_class, method):
            setattr(trainer, method, functools.partial(getattr(trainer_class, method), trainer))

    def model(input_ids, attention_mask=None, use_cache=False):
        assert torch.equal(input_ids, batch["input_ids"])
        return types.SimpleNamespace(logits=hidden @ batch["weight"].T)

    loss, _ = trainer_class.get_batch_loss_metrics(trainer, model, _trl_batch(batch))
    loss.backward()
    return loss.detach(), hidden.grad


def ours_loss_and_grads(objective, batch: dict, nll_from_prompt: bool = False):
    """dpo_fast's loss, chosen/rejected log-probs (as the objective sees them: summed) and dL/dhidden, dL/dweight."""
    hidden = batch["hidden"][:, :-1].clone().requires_grad_(True)
    weight = batch["weight"].clone().requires_grad_(True)
    targets = batch["input_ids"][:, 1:]
    completion = batch["labels"][:, 1:] != -100
    rows, length = completion.shape
    token_logps = torch.log_softmax(hidden @ weight.T, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    segment_ids = torch.arange(rows).repeat_interleave(length)
    chosen_rows = (torch.arange(rows) < rows // 2).unsqueeze(1)
    nll_tokens = (batch["attention_mask"][:, 1:].bool() if nll_from_prompt else completion) & chosen_rows
    weights = objectives.token_weights(objective, completion.reshape(-1), segment_ids, rows, nll_tokens.reshape(-1))
    seqs = objectives.sequence_inputs(token_logps.reshape(-1), segment_ids, rows, weights)
    batch_constants = BatchConstants(num_units=rows // 2, nll_tokens=nll_tokens.sum())
    loss = objectives.objective_loss(objective, seqs, batch_constants)
    loss.backward()
    grad_hidden = torch.cat([hidden.grad, torch.zeros_like(hidden.grad[:, :1])], 1)
    return loss.detach(), seqs, grad_hidden, weight.grad


cpo_options = {
    "loss_type": st.sampled_from(["sigmoid", "hinge", "ipo", "simpo"]),
    "beta": st.floats(0.05, 3.0),
    "label_smoothing": st.sampled_from([0.0, 0.2]),
    "cpo_alpha": st.sampled_from([0.0, 1.0, 0.4]),
    "simpo_gamma": st.floats(0.0, 2.0),
    "alpha": st.sampled_from([0.0, 0.0, 0.5, -0.3]),
}


@given(seed=st.integers(0, 2**16), pairs=st.integers(1, 3), **cpo_options)
def test_cpo_objective_equals_trl_cpo_trainer(
    seed, pairs, loss_type, beta, label_smoothing, cpo_alpha, simpo_gamma, alpha
):
    if loss_type in ("hinge", "ipo"):
        label_smoothing = 0.0  # TRL warns that these ignore it; the objective ignores it too
    batch = _pair_batch(seed, pairs, length=7)
    options = {
        "loss_type": loss_type,
        "beta": beta,
        "label_smoothing": label_smoothing,
        "cpo_alpha": cpo_alpha,
        "simpo_gamma": simpo_gamma,
        "alpha": alpha,
    }
    trl_loss, trl_grad = trl_loss_and_grad(CPOTrainer, options, batch)
    objective = CPOObjective(
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
        nll_weight=cpo_alpha,
        simpo_gamma=simpo_gamma,
        alpha=alpha,
    )
    loss, _, grad_hidden, _ = ours_loss_and_grads(objective, batch)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad_hidden, trl_grad, rtol=1e-9, atol=1e-12)


@given(seed=st.integers(0, 2**16), pairs=st.integers(1, 3), beta=st.floats(0.05, 3.0))
def test_orpo_objective_equals_trl_orpo_trainer(seed, pairs, beta):
    """TRL's ORPO NLL covers the chosen prompt tokens too: passed as the NLL tokens. TRL casts the log-probs
    to float32 for the odds ratio (``odds_ratio_loss``), hence a float32 tolerance."""
    batch = _pair_batch(seed, pairs, length=7)
    trl_loss, trl_grad = trl_loss_and_grad(ORPOTrainer, {"beta": beta}, batch)
    loss, _, grad_hidden, _ = ours_loss_and_grads(ORPOObjective(beta=beta), batch, nll_from_prompt=True)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad_hidden, trl_grad, rtol=1e-6, atol=1e-7)


def _liger(function, batch: dict, *args):
    """Liger's loss, (chosen, rejected) log-probs and dL/dhidden, dL/dweight; ``args`` after ``ignore_index``."""
    hidden = batch["hidden"][:, :-1].clone().requires_grad_(True)
    weight = batch["weight"].clone().requires_grad_(True)
    loss, aux = function.apply(hidden, weight, batch["labels"][:, 1:], None, -100, *args)
    loss.backward()
    grad_hidden = torch.cat([hidden.grad, torch.zeros_like(hidden.grad[:, :1])], 1)
    return loss.detach().double(), aux[0].double(), aux[1].double(), grad_hidden.double(), weight.grad.double()


FLOAT32 = {"rtol": 2e-5, "atol": 2e-6}  # Liger takes log_softmax in float32


def _check_against_liger(ours, liger, average: bool, counts: torch.Tensor):
    loss, seqs, grad_hidden, grad_weight = ours
    liger_loss, liger_chosen, liger_rejected, liger_grad_hidden, liger_grad_weight = liger
    logps = seqs.logps.detach() / (counts if average else 1)
    torch.testing.assert_close(loss, liger_loss, **FLOAT32)
    torch.testing.assert_close(logps, torch.cat([liger_chosen, liger_rejected]), **FLOAT32)
    torch.testing.assert_close(grad_hidden, liger_grad_hidden, **FLOAT32)
    torch.testing.assert_close(grad_weight, liger_grad_weight, **FLOAT32)


@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("nll_weight", [0.0, 0.7])
def test_cpo_equals_liger_fused_cpo(average, nll_weight):
    batch = _pair_batch(seed=7, pairs=3, length=8)
    beta, label_smoothing = 0.4, 0.1
    liger = _liger(
        LigerFusedLinearCPOFunction, batch, beta, nll_weight, label_smoothing, nll_weight != 0, False, average
    )
    objective = CPOObjective(
        beta=beta, label_smoothing=label_smoothing, nll_weight=nll_weight, average_log_prob=average
    )
    ours = ours_loss_and_grads(objective, batch)
    _check_against_liger(ours, liger, average, ours[1].token_counts)


@pytest.mark.parametrize("nll_weight", [0.0, 1.0])
def test_simpo_equals_liger_fused_simpo(nll_weight):
    batch = _pair_batch(seed=8, pairs=3, length=8)
    beta, gamma, label_smoothing = 2.0, 0.8, 0.05
    liger = _liger(
        LigerFusedLinearSimPOFunction, batch, beta, nll_weight, label_smoothing, nll_weight != 0, False, gamma
    )
    objective = CPOObjective(
        beta=beta, loss_type="simpo", label_smoothing=label_smoothing, nll_weight=nll_weight, simpo_gamma=gamma
    )
    ours = ours_loss_and_grads(objective, batch)
    _check_against_liger(ours, liger, True, ours[1].token_counts)


@pytest.mark.parametrize("nll_from_prompt", [False, True])
def test_orpo_equals_liger_fused_orpo(nll_from_prompt):
    """Liger's NLL covers the completion unless given ``nll_target``; with the prompt tokens there it is TRL's."""
    batch = _pair_batch(seed=9, pairs=3, length=8)
    beta = 0.3
    nll_target = None
    if nll_from_prompt:
        nll_target = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    liger = _liger(LigerFusedLinearORPOFunction, batch, beta, True, nll_target, False)
    ours = ours_loss_and_grads(ORPOObjective(beta=beta), batch, nll_from_prompt=nll_from_prompt)
    _check_against_liger(ours, liger, True, ours[1].token_counts)


def test_orpo_gradient_near_certain_completions_is_finite():
    """Averaged log-probs close to 0 (a near-certain completion): log(1 - exp(x)) takes the expm1 branch."""
    seqs = objectives.SequenceInputs(
        logps=torch.tensor([-1e-6, -3.0, -2.0, -1e-9], dtype=torch.float64),
        token_counts=torch.ones(4, dtype=torch.float64),
        nll_logps=torch.zeros(4, dtype=torch.float64),
    )
    value = ORPOObjective(beta=0.5).evaluate(seqs, BatchConstants(num_units=2))
    assert torch.isfinite(value.loss) and torch.isfinite(value.grad_logps).all()
    x = seqs.logps.clone().requires_grad_(True)
    chosen, rejected = x.chunk(2)
    log_odds = (chosen - rejected) - (torch.log(-torch.expm1(chosen)) - torch.log(-torch.expm1(rejected)))
    (-0.5 * F.logsigmoid(log_odds).sum() / 2).backward()
    torch.testing.assert_close(value.grad_logps, x.grad, rtol=1e-9, atol=0)


@pytest.mark.parametrize(
    "objective, match",
    [
        (lambda: CPOObjective(loss_type="kto"), "loss_type must be one of"),
        (lambda: CPOObjective(beta=-1.0), "beta must be a positive number"),
        (lambda: CPOObjective(label_smoothing=1.5), r"label_smoothing must lie in \[0, 1\]"),
        (lambda: CPOObjective(simpo_gamma=float("nan")), "simpo_gamma must be a finite number"),
        (lambda: ORPOObjective(beta=0.0), "beta must be a positive number"),
    ],
)
def test_invalid_options_are_refused_by_name(objective, match):
    with pytest.raises(ValueError, match=match):
        objective()


def test_needs():
    assert CPOObjective().needs.nll and not CPOObjective(nll_weight=0.0).needs.nll
    assert not CPOObjective().needs.reference and ORPOObjective().needs.nll
    assert CPOObjective().local and ORPOObjective().local
