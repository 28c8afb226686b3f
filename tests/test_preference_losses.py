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

import dpo_fast

# Backends whose row pass does not return log sum_v p_v^2 yet (WPO): they refuse use_weighting=True
WPO_PENDING = {"triton"}
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
    if entry == "dpo" and dpo.get("use_weighting"):
        assume(backend not in WPO_PENDING)
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
