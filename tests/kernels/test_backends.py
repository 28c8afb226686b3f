"""Property tests: every chunked backend against the float64 reference, values and all gradients."""

import pytest
import torch
from helpers import BACKENDS, TOLERANCE, cases, device_of, grads, leaves, rel_err
from hypothesis import assume, given
from hypothesis import strategies as st

import dpo_fast

HEAD_KEYS = ("bias", "softcap")


# Gradients are compared with a floor of 0.1 on the reference's norm: the test problems have
# gradients of order 1, and a product whose terms cancel to far below that (an entropy gradient at
# one token with H = 1, say) is held to an absolute error of tol * 0.1, not to a relative one that
# no float32 dot product could meet.
GRAD_FLOOR = 0.1


def _assert_close(name, actual, expected, tol, floor=1e-2):
    err = rel_err(actual, expected, floor)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"


def _assert_grads_close(actual: dict, expected: dict, tol: float):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key] is not None, f"no gradient for {key}"
        assert actual[key].dtype == expected[key].dtype or expected[key].dtype == torch.float64
        _assert_close(f"d/d{key}", actual[key], expected[key], tol, GRAD_FLOOR)


def _dpo(batch, backend, **options):
    return dpo_fast.fused_linear_dpo_loss(
        batch["hidden"], batch["weight"], batch["labels"], bias=batch["bias"], softcap=batch.get("softcap"),
        ref_chosen_logps=batch["ref_chosen_logps"], ref_rejected_logps=batch["ref_rejected_logps"],
        segment_ids=batch.get("segment_ids"), backend=backend, **options,
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    case=cases(),
    loss_type=st.sampled_from(dpo_fast.LOSS_TYPES),
    label_smoothing=st.sampled_from([0.0, 0.2]),
    reference_free=st.booleans(),
    average_log_prob=st.sampled_from([None, True, False]),
    beta=st.sampled_from([0.1, 0.5, 2.0]),
    grad_output=st.floats(-3, 3).filter(lambda g: abs(g) > 0.1),
    chosen_nll=st.booleans(),
    grads_in_forward=st.sampled_from([None, False]),
)
def test_fused_dpo_loss_matches_float64_reference(
    backend, case, loss_type, label_smoothing, reference_free, average_log_prob, beta, grad_output, chosen_nll,
    grads_in_forward,
):  # fmt: skip
    assume(loss_type != "exo_pair" or label_smoothing > 0)  # EXO's epsilon must be positive
    # aot sorts margins: 16-bit log-probs may order near-tied ones otherwise than float64 (a discontinuity)
    assume(loss_type not in ("aot", "aot_unpaired") or case.dtype == torch.float32)
    batch = case.build(device_of(backend))
    batch["softcap"] = case.softcap
    options = dict(
        loss_type=loss_type, label_smoothing=label_smoothing, reference_free=reference_free,
        average_log_prob=average_log_prob, beta=beta,
    )  # fmt: skip
    if reference_free and case.packed:
        options["num_pairs"] = case.pairs

    def step(inputs, name, parts=("loss", "nll")):
        out = _dpo(inputs, name, **options, grads_in_forward=None if name == "reference" else grads_in_forward)
        objective = out.loss * grad_output if "loss" in parts else 0
        if "nll" in parts and chosen_nll:  # a second path into the log-probs, as RPO's NLL term takes
            objective = objective - 0.3 * out.chosen_logps.sum()
        objective.backward()
        return out, grads(inputs)

    expected, expected_grads = step(leaves(batch, torch.float64), "reference")
    actual, actual_grads = step(leaves(batch), backend)
    tol = TOLERANCE[case.dtype]
    _assert_close("loss", actual.loss, expected.loss, tol["values"])
    for field in ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "reward_margin"):
        _assert_close(field, getattr(actual, field), getattr(expected, field), tol["values"])
    assert actual.loss.dtype == torch.float32 and actual.chosen_logps.dtype == torch.float32
    if not chosen_nll:
        _assert_grads_close(actual_grads, expected_grads, tol["grads"])
        return
    # The loss's gradients are formed in the forward pass and the NLL's in backward, each rounded to
    # the compute dtype before they are added: the error is relative to the two parts, which may cancel.
    _, loss_part = step(leaves(batch, torch.float64), "reference", parts=("loss",))
    _, nll_part = step(leaves(batch, torch.float64), "reference", parts=("nll",))
    for key, expected_grad in expected_grads.items():
        error = (actual_grads[key].double() - expected_grad).norm().item()
        scale = max(loss_part[key].norm().item() + nll_part[key].norm().item(), GRAD_FLOOR)
        assert error <= tol["grads"] * scale, f"d/d{key}: error {error:.3e} > {tol['grads']:.0e} * {scale:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases(), temperature=st.sampled_from([1.0, 0.7]), return_entropy=st.booleans(), data=st.data())
def test_token_logps_and_entropy_match_float64_reference(backend, case, temperature, return_entropy, data):
    batch = case.build(device_of(backend))
    gen = torch.Generator().manual_seed(case.seed + 1)
    upstream = [torch.randn(batch["labels"].shape, generator=gen).to(batch["labels"].device) for _ in range(2)]

    def step(inputs, name):
        out = dpo_fast.token_logps(
            inputs["hidden"], inputs["weight"], inputs["labels"], bias=inputs["bias"], softcap=case.softcap,
            temperature=temperature, return_entropy=return_entropy, backend=name,
        )  # fmt: skip
        logp, entropy = out if return_entropy else (out, None)
        objective = (logp * upstream[0]).sum()
        if return_entropy:
            objective = objective + (entropy * upstream[1]).sum()
        objective.backward()
        return logp, entropy, grads(inputs)

    expected = step(leaves(batch, torch.float64), "reference")
    actual = step(leaves(batch), backend)
    tol = TOLERANCE[case.dtype]
    assert actual[0].shape == batch["labels"].shape and actual[0].dtype == torch.float32
    assert bool((actual[0][batch["labels"] == -100] == 0).all())
    _assert_close("logp", actual[0], expected[0], tol["values"])
    if return_entropy:
        _assert_close("entropy", actual[1], expected[1], tol["values"])
    _assert_grads_close(actual[2], expected[2], tol["grads"])


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases(), average_log_prob=st.booleans(), temperature=st.sampled_from([1.0, 1.3]))
def test_sequence_logps_match_float64_reference(backend, case, average_log_prob, temperature):
    batch = case.build(device_of(backend))

    def step(inputs, name):
        seq = dpo_fast.sequence_logps(
            inputs["hidden"], inputs["weight"], inputs["labels"], bias=inputs["bias"], softcap=case.softcap,
            temperature=temperature, average_log_prob=average_log_prob, segment_ids=inputs.get("segment_ids"),
            num_segments=2 * case.pairs if case.packed else None, backend=name,
        )  # fmt: skip
        (seq * torch.linspace(-1, 2, seq.shape[0], device=seq.device, dtype=seq.dtype)).sum().backward()
        return seq, grads(inputs)

    expected = step(leaves(batch, torch.float64), "reference")
    actual = step(leaves(batch), backend)
    tol = TOLERANCE[case.dtype]
    assert actual[0].shape == (2 * case.pairs,)
    assert torch.isfinite(actual[0]).all()
    _assert_close("seq_logps", actual[0], expected[0], tol["values"])
    _assert_grads_close(actual[1], expected[1], tol["grads"])


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases(dtypes=(torch.float32,)), scratch_kib=st.sampled_from([1, 4, 64]))
def test_small_scratch_budgets_split_work_without_changing_results(backend, case, scratch_kib):
    """Tiny budgets force one token per chunk and pairs split across recompute chunks."""
    batch = case.build(device_of(backend))
    batch["softcap"] = case.softcap

    def step(scratch_mib):
        inputs = leaves(batch)
        out = _dpo(inputs, backend, scratch_mib=scratch_mib)
        out.loss.backward()
        return out, grads(inputs)

    generous, generous_grads = step(64)
    tiny, tiny_grads = step(scratch_kib / 1024)
    _assert_close("loss", tiny.loss, generous.loss, 1e-5)
    _assert_close("chosen_logps", tiny.chosen_logps, generous.chosen_logps, 1e-5)
    _assert_grads_close(tiny_grads, generous_grads, 1e-5)


CUDA = torch.device("cuda")


def _runs_16_and_32_bit(device, dtype):
    return None if dtype in (torch.float32, torch.bfloat16, torch.float16) else f"not {dtype}"


@pytest.mark.parametrize(
    "dtype, precision, triton, cuda_built, expected",
    [
        (torch.bfloat16, "ieee", True, True, "triton"),
        (torch.float16, "ieee", True, False, "triton"),
        (torch.float32, "tf32", True, True, "triton"),
        (torch.float32, "ieee", True, True, "cuda"),
        (torch.float32, "ieee", True, False, "torch"),
        (torch.bfloat16, "ieee", False, True, "cuda"),
        (torch.bfloat16, "ieee", False, False, "torch"),
        (torch.float32, "tf32", False, True, "cuda"),
        (torch.float64, "tf32", True, True, "torch"),
    ],
)  # fmt: skip
def test_auto_on_cuda_picks_by_precision(monkeypatch, dtype, precision, triton, cuda_built, expected):
    """Tensor-core precisions take the fused Triton kernels; exact float32 the cuBLAS products."""
    from dpo_fast import _build, backends

    triton_reason = _runs_16_and_32_bit if triton else (lambda device, dtype: "Triton is not installed")
    monkeypatch.setattr(backends.get("triton"), "unavailable_reason", triton_reason)
    monkeypatch.setattr(backends.get("cuda"), "unavailable_reason", _runs_16_and_32_bit)
    monkeypatch.setattr(_build, "is_built", lambda name: name == "cuda" and cuda_built)
    monkeypatch.setattr(backends, "float32_matmul_precision", lambda: precision)
    assert backends.resolve("auto", CUDA, dtype) == expected


def test_float32_matmul_precision_reads_both_of_torchs_apis():
    from dpo_fast.backends import float32_matmul_precision

    matmul = torch.backends.cuda.matmul
    saved, saved_new = torch.get_float32_matmul_precision(), getattr(matmul, "fp32_precision", None)
    try:
        torch.set_float32_matmul_precision("highest")
        assert float32_matmul_precision() == "ieee"
        torch.set_float32_matmul_precision("high")
        assert float32_matmul_precision() == "tf32"
        matmul.allow_tf32 = False
        assert float32_matmul_precision() == "ieee"
        if hasattr(matmul, "fp32_precision"):  # torch >= 2.9: reading allow_tf32 now raises; the helper does not
            matmul.fp32_precision = "tf32"
            assert float32_matmul_precision() == "tf32"
            matmul.fp32_precision = "ieee"
            assert float32_matmul_precision() == "ieee"
    finally:
        torch.set_float32_matmul_precision(saved)
        if saved_new is not None:
            matmul.fp32_precision = saved_new
