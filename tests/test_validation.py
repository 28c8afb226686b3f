"""Bad input gets a ValueError naming the argument; empty sequences give 0, never NaN."""

import pytest
import torch
from helpers import BACKENDS, Case, device_of

import dpo_fast

CASE = Case(pairs=2, length=5, hidden_dim=6, vocab=11, dtype=torch.float32, bias=False, softcap=None, packed=False,
            seed=0)  # fmt: skip
BATCH = CASE.build("cpu")  # the validation tests run on CPU tensors on every machine


def _call(**overrides):
    args = dict(
        hidden=BATCH["hidden"], weight=BATCH["weight"], labels=BATCH["labels"],
        ref_chosen_logps=BATCH["ref_chosen_logps"], ref_rejected_logps=BATCH["ref_rejected_logps"], backend="torch",
    )  # fmt: skip
    args.update(overrides)
    hidden, weight, labels = args.pop("hidden"), args.pop("weight"), args.pop("labels")
    return dpo_fast.fused_linear_dpo_loss(hidden, weight, labels, **args)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(hidden=BATCH["hidden"][:3], labels=BATCH["labels"][:3]), "2P"),
        (dict(hidden=BATCH["hidden"][:, :, :4]), "last dimension"),
        (dict(weight=BATCH["weight"][0]), "weight"),
        (dict(labels=BATCH["labels"][:, :4]), "labels must have"),
        (dict(labels=BATCH["labels"].float()), "labels must be an int64"),
        (dict(labels=torch.full_like(BATCH["labels"], 11)), r"labels must lie in \[0, 11\)"),
        (dict(labels=torch.full_like(BATCH["labels"], -5)), "labels must lie"),
        (dict(bias=torch.zeros(10)), "bias"),
        (dict(ref_chosen_logps=None), "ref_chosen_logps and ref_rejected_logps"),
        (dict(ref_chosen_logps=torch.zeros(3)), "ref_chosen_logps must be a"),
        (dict(ref_rejected_logps=torch.zeros(2, 1)), "ref_rejected_logps must be a"),
        (dict(loss_type="kto"), "loss_type"),
        (dict(beta=0.0), "beta"),
        (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
        (dict(backend="tpu"), "backend must be one of"),
        (dict(softcap=-1.0), "softcap"),
        (dict(scratch_mib=0), "scratch_mib"),
        (dict(segment_ids=torch.zeros(10, dtype=torch.long)), "packed as"),
        (dict(hidden=BATCH["hidden"].reshape(-1, 6), labels=BATCH["labels"].reshape(-1),
              segment_ids=torch.zeros(20, dtype=torch.long), reference_free=True, ref_chosen_logps=None), "num_pairs"),
        (dict(hidden=BATCH["hidden"].reshape(-1, 6), labels=BATCH["labels"].reshape(-1),
              segment_ids=torch.full((20,), 4)), r"segment_ids must lie in \[0, 4\)"),
        (dict(hidden=BATCH["hidden"].reshape(-1, 6), labels=BATCH["labels"].reshape(-1),
              segment_ids=torch.zeros(19, dtype=torch.long)), r"segment_ids must have shape \(20,\)"),
        (dict(hidden=BATCH["hidden"].long()), "hidden must be a floating-point"),
    ],
)  # fmt: skip
def test_bad_input_names_the_argument(overrides, match):
    with pytest.raises(ValueError, match=match):
        _call(**overrides)


def test_unbuilt_or_unavailable_backends_say_why():
    with pytest.raises(ValueError, match="backend='cuda' cannot run here: it runs on CUDA tensors"):
        _call(backend="cuda")
    if "triton" not in BACKENDS:
        with pytest.raises(ValueError, match="TRITON_INTERPRET|Triton"):
            _call(backend="triton")


def test_triton_refuses_float64_with_a_reason():
    if "triton" not in BACKENDS:
        pytest.skip("triton is not runnable here")
    with pytest.raises(ValueError, match="float64"):
        _call(hidden=BATCH["hidden"].double(), weight=BATCH["weight"].double(), backend="triton")


def test_token_and_sequence_entry_points_validate_too():
    with pytest.raises(ValueError, match="temperature"):
        dpo_fast.token_logps(BATCH["hidden"], BATCH["weight"], BATCH["labels"], temperature=0.0)
    with pytest.raises(ValueError, match="labels must lie"):
        dpo_fast.sequence_logps(BATCH["hidden"], BATCH["weight"], BATCH["labels"] + 200)
    with pytest.raises(ValueError, match="padded input"):
        dpo_fast.sequence_logps(BATCH["hidden"].reshape(-1, 6), BATCH["weight"], BATCH["labels"].reshape(-1))


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("average_log_prob", [False, True])
def test_sequences_without_targets_have_logp_zero_and_no_nan(backend, average_log_prob):
    batch = CASE.build(device_of(backend))
    labels = batch["labels"].clone()
    labels[0] = -100  # chosen of pair 0: no completion token
    labels[3] = -100  # rejected of pair 1
    hidden = batch["hidden"].clone().requires_grad_(True)
    weight = batch["weight"].clone().requires_grad_(True)
    out = dpo_fast.fused_linear_dpo_loss(
        hidden, weight, labels, ref_chosen_logps=batch["ref_chosen_logps"],
        ref_rejected_logps=batch["ref_rejected_logps"], average_log_prob=average_log_prob, backend=backend,
    )  # fmt: skip
    out.loss.backward()
    assert out.chosen_logps[0].item() == 0 and out.rejected_logps[1].item() == 0
    for tensor in (out.loss, out.chosen_logps, out.rejected_logps, hidden.grad, weight.grad):
        assert torch.isfinite(tensor).all()
    assert (hidden.grad[0] == 0).all() and (hidden.grad[3] == 0).all()


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_all_tokens_ignored(backend):
    batch = CASE.build(device_of(backend))
    labels = torch.full_like(batch["labels"], -100)
    hidden = batch["hidden"].clone().requires_grad_(True)
    out = dpo_fast.fused_linear_dpo_loss(hidden, batch["weight"], labels, reference_free=True, backend=backend)
    out.loss.backward()
    assert torch.isfinite(out.loss) and (out.chosen_logps == 0).all() and (hidden.grad == 0).all()
