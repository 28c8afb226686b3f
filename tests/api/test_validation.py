"""Bad input gets a ValueError naming the argument; empty sequences give 0, never NaN."""

import math

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


PACKED = dict(hidden=BATCH["hidden"].reshape(-1, 6), labels=BATCH["labels"].reshape(-1),
              segment_ids=torch.arange(4).repeat_interleave(5))  # fmt: skip


# Each: a ValueError that names the argument, shows the value and says what is expected.
@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(beta=None), r"beta must be a positive number, got None"),
        (dict(beta="0.1"), r"beta must be a positive number, got '0.1'"),
        (dict(beta=torch.tensor(0.1)), r"beta must be a positive number, got tensor"),
        (dict(softcap="30"), r"softcap must be a positive number or None, got '30'"),
        (dict(softcap=math.inf), r"softcap must be a positive number or None, got inf"),
        (dict(ignore_index=2**70), r"ignore_index must be an int in the int64 range .*got 1180591620717411303424"),
        (dict(ignore_index=-100.0), r"ignore_index must be an int .*got -100.0"),
        (dict(ignore_index=True), r"ignore_index must be an int .*got True"),
        (dict(scratch_mib=math.inf), r"scratch_mib must be a positive number of MiB up to 2\*\*40 or None, got inf"),
        (dict(scratch_mib=1e13), r"scratch_mib must be a positive number of MiB up to 2\*\*40 or None, got 10000000000000.0"),
        (dict(scratch_mib="64"), r"scratch_mib must be a positive number of MiB up to 2\*\*40 or None, got '64'"),
        (dict(scratch_mib=-1), r"scratch_mib must be .* got -1"),
        (dict(bias=[0.0] * 11), r"bias must be a \(11,\) floating-point tensor or None, got list \[0.0"),
        (dict(PACKED, segment_ids=list(range(20))), r"segment_ids must be an int64 \(or int32\) tensor, got list"),
        (dict(average_log_prob="yes"), r"average_log_prob must be True or False or None, got 'yes'"),
        (dict(reference_free=1), r"reference_free must be True or False, got 1"),
        (dict(grads_in_forward="no"), r"grads_in_forward must be True or False or None, got 'no'"),
        (dict(return_token_metrics=None), r"return_token_metrics must be True or False, got None"),
        (dict(num_pairs=2), r"num_pairs is for packed input .* P = hidden.shape\[0\] // 2 = 2 pairs, got num_pairs=2"),
        (dict(label_smoothing=0.6), r"label_smoothing must lie in \[0, 0.5\] for loss_type='sigmoid'.*got 0.6"),
        (dict(label_smoothing="0.1"), r"label_smoothing must be a number in \[0, 1\], got '0.1'"),
        (dict(loss_type=None), r"loss_type must be one of .* got None"),
        (dict(backend=None), r"backend must be one of .* got None"),
    ],
)  # fmt: skip
def test_unhelpful_inputs_get_a_value_error_naming_argument_value_and_expectation(overrides, match):
    with pytest.raises(ValueError, match=match):
        _call(**overrides)


@pytest.mark.cpu_only(reason="the argument is refused before any backend runs")
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_scratch_mib_is_checked_on_every_backend(backend):
    for bad in (0, math.inf, "64"):
        with pytest.raises(ValueError, match="scratch_mib must be"):
            _call(backend=backend, scratch_mib=bad)


@pytest.mark.parametrize(
    "entry, overrides, match",
    [
        ("token", dict(temperature=None), r"temperature must be a positive number, got None"),
        ("token", dict(temperature="1"), r"temperature must be a positive number, got '1'"),
        ("token", dict(return_entropy="yes"), r"return_entropy must be True or False, got 'yes'"),
        ("token", dict(ignore_index=-100.0), r"ignore_index must be an int"),
        ("sequence", dict(average_log_prob="yes"), r"average_log_prob must be True or False, got 'yes'"),
        ("sequence", dict(segment_ids=torch.arange(4).repeat_interleave(5), num_segments=-1),
         r"num_segments must be a positive int .* got -1"),
        ("sequence", dict(segment_ids=torch.arange(4).repeat_interleave(5), num_segments=2.0),
         r"num_segments must be a positive int .* got 2.0"),
        ("sequence", dict(segment_ids=[0] * 20), r"segment_ids must be an int64 \(or int32\) tensor, got list"),
        ("sequence", dict(temperature=0), r"temperature must be a positive number, got 0"),
    ],
)  # fmt: skip
def test_token_and_sequence_entry_points_name_the_argument(entry, overrides, match):
    packed = "segment_ids" in overrides
    hidden = BATCH["hidden"].reshape(-1, 6) if packed else BATCH["hidden"]
    labels = BATCH["labels"].reshape(-1) if packed else BATCH["labels"]
    fn = dpo_fast.token_logps if entry == "token" else dpo_fast.sequence_logps
    with pytest.raises(ValueError, match=match):
        fn(hidden, BATCH["weight"], labels, backend="torch", **overrides)


def test_numpy_and_integer_numbers_are_accepted():
    np = pytest.importorskip("numpy")
    out = _call(beta=np.float32(0.5), softcap=np.float64(30.0), ignore_index=np.int64(-100), scratch_mib=1,
                label_smoothing=np.float32(0.1))  # fmt: skip
    assert torch.isfinite(out.loss)


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


# ----------------------------------------------------------------------------------------------
# The other entries: CPO, ORPO, KTO, and the DPO entry's TRL options

DESIRABLE = torch.tensor([True, False, True, False])
REF = torch.randn(4)
NLL_LABELS = BATCH["labels"].masked_fill(BATCH["labels"] == -100, 3)


def _entry(name, **overrides):
    hidden, weight, labels = (overrides.pop(k, BATCH[k]) for k in ("hidden", "weight", "labels"))
    if name == "cpo":
        return dpo_fast.fused_linear_cpo_loss(hidden, weight, labels, backend="torch", **overrides)
    if name == "orpo":
        return dpo_fast.fused_linear_orpo_loss(hidden, weight, labels, backend="torch", **overrides)
    if name == "kto":
        options = {"desirable": DESIRABLE, "ref_logps": REF, "kl": 0.1, **overrides}
        return dpo_fast.fused_linear_kto_loss(hidden, weight, labels, backend="torch", **options)
    return _call(hidden=hidden, weight=weight, labels=labels, **overrides)


@pytest.mark.parametrize(
    "entry, overrides, match",
    [
        ("cpo", {"loss_type": "kto"}, r"loss_type must be one of \('sigmoid', 'hinge', 'ipo', 'simpo'\), got 'kto'"),
        ("cpo", {"nll_weight": float("nan")}, "nll_weight must be a finite number, got nan"),
        ("cpo", {"beta": -1}, "beta must be a positive number, got -1"),
        ("cpo", {"average_log_prob": 1}, "average_log_prob must be True or False or None, got 1"),
        ("cpo", {**PACKED}, r"pass num_pairs \(P, with segment ids in \[0, 2P\)\)"),
        ("orpo", {"nll_labels": NLL_LABELS[:, :3]}, "nll_labels must have labels' shape"),
        ("orpo", {"nll_labels": NLL_LABELS.float()}, r"nll_labels must be an int64 \(or int32\) tensor"),
        ("orpo", {"nll_labels": NLL_LABELS.masked_fill(NLL_LABELS == 3, 11)}, r"nll_labels must lie in \[0, 11\)"),
        ("orpo", {"nll_labels": (BATCH["labels"] + 1) % 11}, "nll_labels must equal labels wherever both"),
        ("orpo", {"labels": NLL_LABELS.masked_fill(torch.arange(4)[:, None] == 2, -100)},
         "labels: sequence 2 has no completion token"),
        ("kto", {"desirable": DESIRABLE.long()}, r"desirable must be a \(4,\) bool tensor"),
        ("kto", {"desirable": DESIRABLE[:3]}, r"desirable must be a \(4,\) bool tensor"),
        ("kto", {"desirable": None}, r"desirable must be a \(4,\) bool tensor"),
        ("kto", {"kl": None}, "kl is required for loss_type='kto'"),
        ("kto", {"kl": "0.1"}, "kl must be a finite number or a .* got '0.1'"),
        ("kto", {"kl": torch.zeros(2)}, r"kl must be a number or a \(\) floating-point tensor"),
        ("kto", {"ref_logps": None}, "ref_logps is required"),
        ("kto", {"ref_logps": REF[:2]}, r"ref_logps must be a \(4,\) floating-point tensor"),
        ("kto", {"loss_type": "sigmoid"}, r"loss_type must be one of \('kto', 'apo_zero_unpaired'\)"),
        ("kto", {"undesirable_weight": -1.0}, "undesirable_weight must be a non-negative number, got -1.0"),
        ("kto", {"hidden": BATCH["hidden"].reshape(-1, 6), "labels": BATCH["labels"].reshape(-1),
                 "segment_ids": torch.arange(4).repeat_interleave(5), "desirable": None},
         r"desirable must be a \(B,\) bool tensor"),
        ("dpo", {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "one weight per loss_type: 1 weights"),
        ("dpo", {"loss_type": "nca_pair", "f_divergence_type": "forward_kl"}, "applies only to the loss types"),
        ("dpo", {"f_divergence_type": "kl"}, "f_divergence_type must be one of"),
        ("dpo", {"loss_type": ["sigmoid", "sft"], "use_weighting": True}, r"use_weighting=True \(WPO\) cannot weight"),
        ("dpo", {"ld_alpha": 2.0}, r"ld_alpha must lie in \[0, 1\]"),
        ("dpo", {"discopop_tau": 0}, "discopop_tau must be a positive number"),
    ],
)  # fmt: skip
def test_other_entries_name_the_argument(entry, overrides, match):
    with pytest.raises(ValueError, match=match):
        _entry(entry, **overrides)


def test_sft_alone_needs_no_reference_and_apo_zero_unpaired_no_kl():
    out = _call(loss_type="sft", ref_chosen_logps=None, ref_rejected_logps=None)
    assert torch.isfinite(out.loss) and torch.equal(out.loss, out.nll_loss)
    kto = _entry("kto", loss_type="apo_zero_unpaired", kl=None)
    assert torch.isfinite(kto.loss) and kto.kl == 0
