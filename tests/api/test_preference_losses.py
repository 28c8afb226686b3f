"""The preference loss entries beyond plain DPO, every chunked backend against the float64 reference backend.

``fused_linear_dpo_loss`` with TRL's options (several loss types with weights, f-divergences, LD-DPO, WPO, aot,
discopop, sft), ``fused_linear_cpo_loss`` (CPO, SimPO, AlphaPO), ``fused_linear_orpo_loss`` (with and without
``nll_labels``) and ``fused_linear_kto_loss``: loss, log-probs, rewards and every gradient, on the fused path
(gradients formed in the forward pass) and the recompute path, with a second gradient path into the log-probs.
The reference backend runs the same objectives on per-token log-probs through autograd; the objectives
themselves are checked against TRL's and Liger's code in ``test_objectives_*.py``, and the entries against
Liger's fused losses at the end of this file.
"""

import pytest
import torch
from helpers import BACKENDS, TOLERANCE, Case, cases, device_of, grads, leaves, rel_err
from hypothesis import assume, given
from hypothesis import strategies as st
from liger_kernel.chunked_loss.cpo_loss import LigerFusedLinearCPOFunction
from liger_kernel.chunked_loss.kto_loss import LigerFusedLinearKTOFunction
from liger_kernel.chunked_loss.orpo_loss import LigerFusedLinearORPOFunction
from liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOFunction

import dpo_fast

GRAD_FLOOR = 0.1


def _close(name, actual, expected, tol, floor=1e-2):
    err = rel_err(actual, expected, floor)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"


def _nll_labels(batch: dict, seed: int) -> torch.Tensor:
    """Labels with some of the ignored positions given a target too (ORPO's NLL over the prompt)."""
    gen = torch.Generator().manual_seed(seed)
    labels = batch["labels"]
    extra = torch.randint(0, batch["weight"].shape[0], labels.shape, generator=gen).to(labels.device)
    unmask = (torch.rand(labels.shape, generator=gen) < 0.5).to(labels.device)
    return torch.where((labels == -100) & unmask, extra, labels)


def _every_sequence_has_a_completion(batch: dict, case: Case) -> bool:
    valid = (batch["labels"] != -100).cpu()
    if not case.packed:
        return bool(valid.any(-1).all())
    counts = torch.zeros(2 * case.pairs).index_add_(0, batch["segment_ids"].cpu(), valid.float())
    return bool((counts > 0).all())


def _call(entry: str, inputs: dict, backend: str, options: dict, case: Case):
    """The entry's output on ``inputs``; ``options`` as drawn."""
    chunked = backend != "reference"
    common = {
        "bias": inputs["bias"], "softcap": case.softcap, "segment_ids": inputs.get("segment_ids"), "backend": backend,
        "grads_in_forward": options["grads_in_forward"] if chunked else None,
        "scratch_mib": options["scratch_kib"] / 1024 if chunked else None,
    }  # fmt: skip
    args = (inputs["hidden"], inputs["weight"], inputs["labels"])
    if entry == "kto":
        ref = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).double()
        return dpo_fast.fused_linear_kto_loss(
            *args, desirable=options["desirable"].to(ref.device), ref_logps=None if options["reference_free"] else ref,
            reference_free=options["reference_free"], kl=options["kl"], beta=options["beta"],
            loss_type=options["kto_loss_type"], desirable_weight=1.3, undesirable_weight=0.7, **common,
        )  # fmt: skip
    num_pairs = case.pairs if case.packed else None
    if entry == "cpo":
        return dpo_fast.fused_linear_cpo_loss(
            *args, beta=options["beta"], loss_type=options["cpo_loss_type"], label_smoothing=0.1,
            nll_weight=options["nll_weight"], simpo_gamma=0.3, alpha=options["alpha"], num_pairs=num_pairs, **common,
        )  # fmt: skip
    if entry == "orpo":
        return dpo_fast.fused_linear_orpo_loss(
            *args, beta=options["beta"], nll_labels=options["nll_labels"], num_pairs=num_pairs, **common
        )
    return dpo_fast.fused_linear_dpo_loss(
        *args, ref_chosen_logps=inputs["ref_chosen_logps"], ref_rejected_logps=inputs["ref_rejected_logps"],
        beta=options["beta"], num_pairs=num_pairs, **options["dpo"], **common,
    )  # fmt: skip


DPO_OPTIONS = [
    {"loss_type": ["sigmoid", "sft"], "loss_weights": [0.7, 0.4], "ld_alpha": 0.5},
    {"loss_type": ["ipo", "apo_down", "sft"], "loss_weights": [1.0, 0.5, 0.2]},
    {"loss_type": "sigmoid", "use_weighting": True, "ld_alpha": 0.0},
    {"loss_type": "ipo", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
    {"loss_type": ["robust", "sigmoid_norm"], "f_divergence_type": "js_divergence", "label_smoothing": 0.2},
    {"loss_type": "discopop", "discopop_tau": 0.2, "f_divergence_type": "forward_kl"},
    {"loss_type": "aot", "label_smoothing": 0.1},
    {"loss_type": ["aot_unpaired", "hinge"], "loss_weights": [1.0, 2.0]},
    {"loss_type": "sft"},
]


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    case=cases(dtypes=(torch.float32, torch.bfloat16)),
    entry=st.sampled_from(["dpo", "cpo", "orpo", "kto"]),
    dpo=st.sampled_from(DPO_OPTIONS),
    cpo_loss_type=st.sampled_from(dpo_fast.CPO_LOSS_TYPES),
    kto_loss_type=st.sampled_from(dpo_fast.KTO_LOSS_TYPES),
    nll_weight=st.sampled_from([0.0, 1.0]),
    alpha=st.sampled_from([0.0, 0.4]),
    with_nll_labels=st.booleans(),
    reference_free=st.booleans(),
    kl=st.sampled_from([0.0, 0.7]),
    beta=st.sampled_from([0.1, 1.0]),
    grad_output=st.sampled_from([1.0, -2.0]),
    logps_path=st.booleans(),
    grads_in_forward=st.sampled_from([None, False]),
    scratch_kib=st.sampled_from([1, 64 * 1024]),  # 1 KiB: every unit split across chunks, recomputed
    data=st.data(),
)
def test_entries_match_the_float64_reference(
    backend, case, entry, dpo, cpo_loss_type, kto_loss_type, nll_weight, alpha, with_nll_labels, reference_free, kl,
    beta, grad_output, logps_path, grads_in_forward, scratch_kib, data,
):  # fmt: skip
    sorted_losses = entry == "dpo" and {"aot", "aot_unpaired"} & set(dpo["loss_type"])
    if sorted_losses:
        # sorting is discontinuous: 16-bit log-probs may order near-tied margins otherwise than float64
        assume(case.dtype == torch.float32)
    batch = case.build(device_of(backend))
    if entry == "orpo":  # an empty completion has no odds (a ValueError, tested below)
        assume(_every_sequence_has_a_completion(batch, case))
    desirable = torch.tensor(data.draw(st.lists(st.booleans(), min_size=2 * case.pairs, max_size=2 * case.pairs)))
    options = {
        "dpo": dpo, "cpo_loss_type": cpo_loss_type, "kto_loss_type": kto_loss_type, "nll_weight": nll_weight, "alpha": alpha,
        "nll_labels": _nll_labels(batch, case.seed) if with_nll_labels else None, "reference_free": reference_free, "kl": kl,
        "beta": beta, "grads_in_forward": grads_in_forward, "desirable": desirable, "scratch_kib": scratch_kib,
    }  # fmt: skip

    def run(inputs, name, parts=("loss", "logps")):
        out = _call(entry, inputs, name, options, case)
        logps = out.logps if entry == "kto" else torch.cat([out.chosen_logps, out.rejected_logps])
        objective = out.loss * grad_output if "loss" in parts else 0
        if "logps" in parts and logps_path:  # a second path into the log-probs
            weights = torch.linspace(-0.5, 0.5, logps.shape[0], dtype=logps.dtype, device=logps.device)
            objective = objective + (logps * weights).sum()
        objective.backward()
        return out, logps, grads(inputs)

    expected, expected_logps, expected_grads = run(leaves(batch, torch.float64), "reference")
    actual, actual_logps, actual_grads = run(leaves(batch), backend)
    tol = TOLERANCE[case.dtype]
    assert actual.loss.dtype == torch.float32 and actual_logps.dtype == torch.float32
    _close("loss", actual.loss, expected.loss, tol["values"])
    _close("logps", actual_logps, expected_logps, tol["values"])
    rewards = ("rewards",) if entry == "kto" else ("chosen_rewards", "rejected_rewards")
    for field in rewards:
        _close(field, getattr(actual, field), getattr(expected, field), tol["values"])
    if entry != "kto" and expected.nll_loss is not None:
        _close("nll_loss", actual.nll_loss, expected.nll_loss, tol["values"])
    # the loss's gradients are formed in the forward pass and the log-probs' in backward, each rounded to the
    # compute dtype: the error is relative to the two parts, which may cancel
    scale = {key: value.norm().item() for key, value in expected_grads.items()}
    if logps_path:
        parts = [run(leaves(batch, torch.float64), "reference", parts=(part,))[2] for part in ("loss", "logps")]
        scale = {key: parts[0][key].norm().item() + parts[1][key].norm().item() for key in expected_grads}
    for key, expected_grad in expected_grads.items():
        error = (actual_grads[key].double() - expected_grad).norm().item()
        assert error <= tol["grads"] * max(scale[key], GRAD_FLOOR), f"d/d{key}: error {error:.3e}"


# every completion has 1 to 4 tokens
FIXED_CASE = Case(pairs=3, length=6, hidden_dim=8, vocab=16, dtype=torch.float32, bias=True, softcap=2.0,
                  packed=False, seed=0)  # fmt: skip
FIXED = {
    "aot": ("dpo", {"dpo": {"loss_type": "aot", "label_smoothing": 0.1}}),
    "aot_unpaired+sigmoid": ("dpo", {"dpo": {"loss_type": ["aot_unpaired", "sigmoid"]}}),
    "ld_alpha+sft": ("dpo", {"dpo": {"loss_type": ["sigmoid", "sft"], "ld_alpha": 0.3}}),
    "wpo": ("dpo", {"dpo": {"loss_type": "bco_pair", "use_weighting": True}}),
    "alphapo-simpo": ("cpo", {"cpo_loss_type": "simpo", "alpha": 0.4, "nll_weight": 1.0}),
    "orpo-nll_labels": ("orpo", {"with_nll_labels": True}),
    "kto": ("kto", {"kto_loss_type": "kto", "kl": 0.7}),
    "apo_zero_unpaired": ("kto", {"kto_loss_type": "apo_zero_unpaired", "reference_free": True}),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scratch_kib", [1, 4])
@pytest.mark.parametrize("name", FIXED)
def test_many_groups_and_split_units_match_the_reference(backend, scratch_kib, name):
    """Several pairs, budgets that split every unit across chunks (1 KiB) or group a few (4 KiB): the sorted losses
    (one group of every pair), the unpaired KTO units, the NLL tokens off the completion, LD-DPO and WPO."""
    entry, overrides = FIXED[name]
    batch = FIXED_CASE.build(device_of(backend))
    options = {
        "dpo": {}, "cpo_loss_type": "sigmoid", "kto_loss_type": "kto", "nll_weight": 1.0, "alpha": 0.0,
        "nll_labels": None, "reference_free": False, "kl": 0.0, "beta": 0.5, "grads_in_forward": None,
        "desirable": torch.tensor([True, False, False, True, True, False]), "scratch_kib": scratch_kib,
        **overrides,
    }  # fmt: skip
    if options.pop("with_nll_labels", False):
        options["nll_labels"] = _nll_labels(batch, 3)

    def run(inputs, name):
        out = _call(entry, inputs, name, options, FIXED_CASE)
        out.loss.backward()
        return out, grads(inputs)

    expected, expected_grads = run(leaves(batch, torch.float64), "reference")
    actual, actual_grads = run(leaves(batch), backend)
    _close("loss", actual.loss, expected.loss, 1e-4)
    for key, expected_grad in expected_grads.items():
        _close(f"d/d{key}", actual_grads[key], expected_grad, 1e-4, GRAD_FLOOR)


# ----------------------------------------------------------------------------------------------
# Against Liger-Kernel 0.8.5's fused losses (float32 on CPU, compiled=False), through the public entries

LIGER_TOLERANCE = 2e-5  # both in float32; Liger forms log_softmax of full float32 logits


def _liger_batch(seed: int, rows: int = 6, length: int = 7, hidden: int = 8, vocab: int = 19) -> dict:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (rows, length), generator=gen)
    prompt = torch.randint(1, 3, (rows,), generator=gen)
    end = torch.randint(4, length + 1, (rows,), generator=gen)
    positions = torch.arange(length)
    full = labels.masked_fill(positions >= end[:, None], -100)  # prompt and completion, padding masked
    return {
        "hidden": torch.randn(rows, length, hidden, generator=gen),
        "weight": torch.randn(vocab, hidden, generator=gen) * 0.5,
        "labels": full.masked_fill(positions < prompt[:, None], -100),
        "full_labels": full,
    }


def _liger_run(function, batch: dict, *args):
    hidden = batch["hidden"].clone().requires_grad_(True)
    weight = batch["weight"].clone().requires_grad_(True)
    loss, aux = function.apply(hidden, weight, batch["labels"], *args)
    loss.backward()
    return loss.detach(), aux, hidden.grad, weight.grad


def _ours_run(entry, batch: dict, backend: str, **options):
    """The entry on the backend's device (Liger's reference ran on CPU); tensor options move there too."""
    device = device_of(backend)
    hidden = batch["hidden"].to(device).requires_grad_(True)
    weight = batch["weight"].to(device).requires_grad_(True)
    options = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in options.items()}
    out = entry(hidden, weight, batch["labels"].to(device), backend=backend, **options)
    out.loss.backward()
    return out, hidden.grad, weight.grad


def _check_liger(ours, liger, logps=None):
    out, grad_hidden, grad_weight = ours
    liger_loss, liger_aux, liger_grad_hidden, liger_grad_weight = liger
    _close("loss", out.loss.cpu(), liger_loss, LIGER_TOLERANCE)
    if logps is not None:
        logps = torch.cat([out.chosen_logps, out.rejected_logps]).cpu()
        _close("logps", logps, torch.cat(liger_aux[:2]), LIGER_TOLERANCE)
    _close("d/dhidden", grad_hidden.cpu(), liger_grad_hidden, LIGER_TOLERANCE)
    _close("d/dweight", grad_weight.cpu(), liger_grad_weight, LIGER_TOLERANCE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("average", [False, True])
def test_cpo_equals_liger(backend, average):
    batch = _liger_batch(seed=1)
    liger = _liger_run(LigerFusedLinearCPOFunction, batch, None, -100, 0.4, 0.7, 0.1, True, False, average)
    ours = _ours_run(dpo_fast.fused_linear_cpo_loss, batch, backend, beta=0.4, nll_weight=0.7, label_smoothing=0.1,
                     average_log_prob=average)  # fmt: skip
    _check_liger(ours, liger, logps=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_simpo_equals_liger(backend):
    batch = _liger_batch(seed=2)
    liger = _liger_run(LigerFusedLinearSimPOFunction, batch, None, -100, 2.0, 0.0, 0.05, False, False, 0.8)
    ours = _ours_run(dpo_fast.fused_linear_cpo_loss, batch, backend, loss_type="simpo", beta=2.0, nll_weight=0.0,
                     label_smoothing=0.05, simpo_gamma=0.8)  # fmt: skip
    _check_liger(ours, liger, logps=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nll_from_prompt", [False, True])
def test_orpo_equals_liger(backend, nll_from_prompt):
    """Liger's NLL covers the completion unless given ``nll_target``; with the prompt there it is TRL's."""
    batch = _liger_batch(seed=3)
    nll_labels = batch["full_labels"] if nll_from_prompt else None
    liger = _liger_run(LigerFusedLinearORPOFunction, batch, None, -100, 0.3, True, nll_labels, False)
    ours = _ours_run(dpo_fast.fused_linear_orpo_loss, batch, backend, beta=0.3, nll_labels=nll_labels)
    _check_liger(ours, liger, logps=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", [0.0, 0.4])
def test_kto_equals_liger(backend, kl):
    """Liger takes the reference's hidden states; dpo_fast its log-probs (here from ``sequence_logps``)."""
    batch = _liger_batch(seed=4, rows=5)
    ref_hidden = batch["hidden"] + 0.3 * torch.randn(batch["hidden"].shape, generator=torch.Generator().manual_seed(5))
    desirable = torch.tensor([True, False, True, True, False])
    liger = _liger_run(LigerFusedLinearKTOFunction, batch, desirable, None, ref_hidden, batch["weight"], None,
                       torch.tensor(kl), -100, 0.7, False, True, False)  # fmt: skip
    device = device_of(backend)
    ref_logps = dpo_fast.sequence_logps(ref_hidden.to(device), batch["weight"].to(device), batch["labels"].to(device),
                                        backend="reference")  # fmt: skip
    out, grad_hidden, grad_weight = _ours_run(dpo_fast.fused_linear_kto_loss, batch, backend, desirable=desirable,
                                              ref_logps=ref_logps, kl=kl, beta=0.7)  # fmt: skip
    liger_loss, liger_aux, liger_grad_hidden, liger_grad_weight = liger
    logps = out.logps.cpu()
    _close("loss", out.loss.cpu(), liger_loss, LIGER_TOLERANCE)
    _close("logps of the desirable", logps[desirable].sum(), liger_aux[0], LIGER_TOLERANCE)
    _close("logps of the undesirable", logps[~desirable].sum(), liger_aux[1], LIGER_TOLERANCE)
    _close("d/dhidden", grad_hidden.cpu(), liger_grad_hidden, LIGER_TOLERANCE)
    _close("d/dweight", grad_weight.cpu(), liger_grad_weight, LIGER_TOLERANCE)


def test_dpo_loss_takes_a_prebuilt_objective():
    """``objective=`` runs a ``DPOObjective`` the keywords cannot say: TRL's sigmoid (no label smoothing) beside its
    robust (with it); the same as the two losses apart, weighted. The keywords it replaces are refused beside it."""
    batch = _liger_batch(seed=3)
    hidden, weight, labels = batch["hidden"].requires_grad_(), batch["weight"].requires_grad_(), batch["labels"]
    pairs = hidden.shape[0] // 2
    ref = torch.randn(2 * pairs, generator=torch.Generator().manual_seed(4), dtype=hidden.dtype) - 20
    common = dict(ref_chosen_logps=ref[:pairs], ref_rejected_logps=ref[pairs:], backend="torch")

    def run(**options):
        hidden.grad = weight.grad = None
        out = dpo_fast.fused_linear_dpo_loss(hidden, weight, labels, **common, **options)
        out.loss.backward()
        return out.loss.detach(), hidden.grad.clone(), weight.grad.clone()

    objective = dpo_fast.objectives.trl_dpo_objective(["sigmoid", "robust"], loss_weights=[1.0, 0.5],
                                                      label_smoothing=0.1, beta=0.2)  # fmt: skip
    combined = run(objective=objective)
    sigmoid = run(loss_type="sigmoid", beta=0.2)
    robust = run(loss_type="robust", label_smoothing=0.1, beta=0.2)
    for name, actual, a, b in zip(("loss", "dL/dhidden", "dL/dW"), combined, sigmoid, robust):
        _close(name, actual, a + 0.5 * b, 1e-5)
    with pytest.raises(ValueError, match=r"objective= replaces .*\['beta'\]"):
        dpo_fast.fused_linear_dpo_loss(hidden, weight, labels, **common, objective=objective, beta=0.3)
    with pytest.raises(ValueError, match="objective must be a dpo_fast.objectives.DPOObjective"):
        dpo_fast.fused_linear_dpo_loss(hidden, weight, labels, **common, objective="sigmoid")
