"""KTOObjective against TRL 1.16's own ``KTOTrainer._compute_loss`` (float64) and Liger-Kernel 0.8.5's fused KTO loss.

TRL's method runs unchanged on a stand-in trainer and a stand-in model whose fused LM head returns the
given per-token log-probs (the mismatched KL completions' under ``no_grad``, as TRL computes them), with
precomputed reference log-probs. dpo_fast's side: ``token_weights``, ``sequence_inputs``,
``kto_kl_estimate``, ``evaluate``, ``token_grads``.
"""

import functools
import types
from collections import defaultdict

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from liger_kernel.chunked_loss.kto_loss import LigerFusedLinearKTOFunction
from trl import KTOTrainer

from dpo_fast import objectives
from dpo_fast.objectives import BatchConstants, KTOObjective, kto_kl_estimate


class _Accelerator:
    device = torch.device("cpu")

    def gather_for_metrics(self, tensor):
        return tensor


def _kto_batch(seed: int, size: int, length: int, desirable: list[bool]) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def completion_mask():
        mask = torch.zeros(size, length, dtype=torch.long)
        for row in range(size):
            prompt = int(torch.randint(1, 3, (), generator=gen))
            mask[row, prompt : int(torch.randint(prompt, length + 1, (), generator=gen))] = 1
        return mask

    def token_logps(mask):
        return torch.where(
            mask[:, 1:].bool(), -4 * torch.rand(size, length - 1, generator=gen, dtype=torch.float64), 0.0
        )

    mask, kl_mask = completion_mask(), completion_mask()
    logps, kl_logps = token_logps(mask), token_logps(kl_mask)
    return {
        "input_ids": torch.zeros(size, length, dtype=torch.long),
        "attention_mask": torch.ones(size, length, dtype=torch.long),
        "completion_mask": mask,
        "KL_input_ids": torch.zeros(size, length, dtype=torch.long),
        "KL_attention_mask": torch.ones(size, length, dtype=torch.long),
        "KL_completion_mask": kl_mask,
        "label": torch.tensor(desirable),
        "ref_logps": logps.sum(1) + 2 * torch.randn(size, generator=gen, dtype=torch.float64),
        "ref_KL_logps": kl_logps.sum(1) - 2 * torch.rand(size, generator=gen, dtype=torch.float64),
        "token_logps": logps,
        "kl_token_logps": kl_logps,
    }


def trl_loss_and_token_grads(options: dict, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    token_logps = batch["token_logps"].clone().requires_grad_(True)
    trl_batch = {key: value for key, value in batch.items() if key not in ("token_logps", "kl_token_logps")}

    def model(input_ids, labels, fused_lm_head, **_):
        log_probs = batch["kl_token_logps"] if input_ids is trl_batch["KL_input_ids"] else token_logps
        return types.SimpleNamespace(
            log_probs=log_probs, entropy=torch.zeros_like(log_probs), mean_logits=torch.zeros_like(log_probs)
        )

    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        calculate_KL=options["loss_type"] == "kto",
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        **options,
    )
    trainer._compute_kl_logps = functools.partial(KTOTrainer._compute_kl_logps, trainer)
    loss = KTOTrainer._compute_loss(trainer, model, trl_batch, False)
    loss.backward()
    # TRL sums every position's log-prob; the head's is a constant 0 off the completion, where no gradient exists
    return loss.detach(), torch.where(batch["completion_mask"][:, 1:].bool(), token_logps.grad, 0.0)


def ours_loss_and_token_grads(objective: KTOObjective, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    completion = batch["completion_mask"][:, 1:].bool()
    size, length = completion.shape
    segment_ids = torch.arange(size).repeat_interleave(length)
    weights = objectives.token_weights(objective, completion.reshape(-1), segment_ids, size)
    seqs = objectives.sequence_inputs(
        batch["token_logps"].reshape(-1),
        segment_ids,
        size,
        weights,
        ref_logps=batch["ref_logps"],
        desirable=batch["label"],
    )
    kl = kto_kl_estimate(batch["kl_token_logps"].sum(1), batch["ref_KL_logps"])
    value = objective.evaluate(seqs, BatchConstants(num_units=size, kl=kl))
    return value.loss, objectives.token_grads(value, segment_ids, weights).view(size, length)


@given(
    seed=st.integers(0, 2**16),
    desirable=st.lists(st.booleans(), min_size=2, max_size=6),
    loss_type=st.sampled_from(["kto", "apo_zero_unpaired"]),
    beta=st.floats(0.05, 3.0),
    desirable_weight=st.sampled_from([1.0, 1.33]),
    undesirable_weight=st.sampled_from([1.0, 0.6]),
)
def test_kto_objective_equals_trl_compute_loss(seed, desirable, loss_type, beta, desirable_weight, undesirable_weight):
    batch = _kto_batch(seed, len(desirable), length=8, desirable=desirable)
    options = {
        "loss_type": loss_type,
        "beta": beta,
        "desirable_weight": desirable_weight,
        "undesirable_weight": undesirable_weight,
    }
    trl_loss, trl_grads = trl_loss_and_token_grads(options, batch)
    loss, grads = ours_loss_and_token_grads(KTOObjective(**options), batch)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads, trl_grads, rtol=1e-9, atol=1e-12)


def test_kl_estimate_is_clamped_at_zero_and_detached():
    policy = torch.tensor([-3.0, -5.0], requires_grad=True)
    assert kto_kl_estimate(policy, torch.tensor([-1.0, -2.0])).item() == 0.0
    estimate = kto_kl_estimate(policy, torch.tensor([-4.0, -7.0]))
    assert estimate.item() == pytest.approx(1.5) and not estimate.requires_grad


@pytest.mark.parametrize("kl", [0.0, 0.4])
def test_kto_equals_liger_fused_kto(kl):
    """Liger computes the reference log-probs from the reference's hidden states, in float32."""
    gen = torch.Generator().manual_seed(11)
    size, length, hidden_size, vocab = 5, 7, 6, 13
    hidden = torch.randn(size, length, hidden_size, generator=gen, dtype=torch.float64)
    ref_hidden = hidden + 0.3 * torch.randn(hidden.shape, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64)
    target = torch.randint(0, vocab, (size, length), generator=gen)
    target[:, :2] = -100
    target[1, 5:] = -100
    desirable = torch.tensor([True, False, True, True, False])
    beta = 0.7

    liger_hidden, liger_weight = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    liger_loss, _ = LigerFusedLinearKTOFunction.apply(
        liger_hidden,
        liger_weight,
        target,
        desirable,
        None,
        ref_hidden,
        weight,
        None,
        torch.tensor(kl),
        -100,
        beta,
        False,
        True,
        False,
    )
    liger_loss.backward()

    our_hidden, our_weight = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    completion = (target != -100).reshape(-1)
    segment_ids = torch.arange(size).repeat_interleave(length)

    def token_logps(states, head):
        logps = torch.log_softmax(states @ head.T, -1).gather(-1, target.clamp(min=0).unsqueeze(-1))
        return logps.reshape(-1)

    objective = KTOObjective(beta=beta)
    weights = objectives.token_weights(objective, completion, segment_ids, size)
    with torch.no_grad():
        ref_logps = objectives.sequence_inputs(token_logps(ref_hidden, weight), segment_ids, size, weights).logps
    seqs = objectives.sequence_inputs(
        token_logps(our_hidden, our_weight), segment_ids, size, weights, ref_logps=ref_logps, desirable=desirable
    )
    loss = objectives.objective_loss(objective, seqs, BatchConstants(num_units=size, kl=kl))
    loss.backward()
    float32 = {"rtol": 2e-5, "atol": 2e-6}
    torch.testing.assert_close(loss, liger_loss.double(), **float32)
    torch.testing.assert_close(our_hidden.grad, liger_hidden.grad.double(), **float32)
    torch.testing.assert_close(our_weight.grad, liger_weight.grad.double(), **float32)


def test_kto_refuses_bad_options_and_missing_labels():
    with pytest.raises(ValueError, match="loss_type must be one of"):
        KTOObjective(loss_type="sigmoid")
    with pytest.raises(ValueError, match="undesirable_weight must be a non-negative number"):
        KTOObjective(undesirable_weight=-1.0)
    seqs = objectives.SequenceInputs(logps=torch.zeros(2), token_counts=torch.ones(2))
    with pytest.raises(ValueError, match="desirable"):
        KTOObjective().evaluate(seqs, BatchConstants(num_units=2))
    assert not KTOObjective().paired and KTOObjective().local
    assert KTOObjective().needs.kl and not KTOObjective(loss_type="apo_zero_unpaired").needs.kl
