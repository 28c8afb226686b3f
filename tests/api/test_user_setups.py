"""What users actually run, on every backend and public entry: autocast, dynamic shapes, torch.func, second-order
gradients, and the edges where the fused pass and the recompute path could disagree.

The contract (docs/api.md): under ``torch.autocast`` the head runs as ``F.linear`` would, its product in the
autocast dtype (hidden states, weight and bias cast to it, float64 left alone) and every statistic in float32;
``torch.compile(dynamic=True)`` traces every entry; the losses are first-order only on every backend (a double
backward raises); under ``torch.func`` transforms the chunked backends raise one clear error.
"""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import BACKENDS, device_of, rel_err

import dpo_fast
from dpo_fast.integrations import prefix_sharing

ALL = ["reference", *BACKENDS]
ROOT = Path(__file__).resolve().parents[2]


def _inputs(device, dtype=torch.float32, seed=0):
    """h (4, 5, 8), w (13, 8), y (4, 5): 2 pairs (rows 0-1 chosen, 2-3 rejected), as the issue's repros."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 5, 8, generator=gen, dtype=dtype).to(device)
    weight = (torch.randn(13, 8, generator=gen, dtype=dtype) * 0.5).to(device)
    bias = torch.randn(13, generator=gen, dtype=dtype).to(device)
    labels = torch.randint(0, 13, (4, 5), generator=gen).to(device)
    labels[:, 0] = -100
    return hidden, weight, bias, labels


def _pair_ref(device, dtype):
    return {"ref_chosen_logps": torch.full((2,), -11.0, dtype=dtype, device=device),
            "ref_rejected_logps": torch.full((2,), -12.0, dtype=dtype, device=device)}  # fmt: skip


# each public entry as f(hidden, weight, bias, labels, backend) -> a scalar to differentiate
ENTRIES = {
    "token_logps": lambda h, w, b, y, be: dpo_fast.token_logps(h, w, y, bias=b, backend=be).sum(),
    "token_logps_entropy": lambda h, w, b, y, be: sum(
        t.sum() for t in dpo_fast.token_logps(h, w, y, bias=b, return_entropy=True, backend=be)
    ),
    "sequence_logps": lambda h, w, b, y, be: dpo_fast.sequence_logps(h, w, y, bias=b, backend=be).sum(),
    "dpo": lambda h, w, b, y, be: (
        dpo_fast.fused_linear_dpo_loss(h, w, y, bias=b, backend=be, **_pair_ref(h.device, torch.float32)).loss
    ),
    "dpo_recompute": lambda h, w, b, y, be: (
        dpo_fast.fused_linear_dpo_loss(
            h, w, y, bias=b, backend=be, grads_in_forward=False, **_pair_ref(h.device, torch.float32)
        ).loss
    ),
    "cpo": lambda h, w, b, y, be: dpo_fast.fused_linear_cpo_loss(h, w, y, bias=b, backend=be).loss,
    "orpo": lambda h, w, b, y, be: dpo_fast.fused_linear_orpo_loss(h, w, y, bias=b, backend=be).loss,
    "kto": lambda h, w, b, y, be: (
        dpo_fast.fused_linear_kto_loss(
            h,
            w,
            y,
            bias=b,
            desirable=torch.tensor([True, False, True, True], device=h.device),
            ref_logps=torch.full((4,), -11.0, device=h.device),
            kl=0.1,
            backend=be,
        ).loss
    ),
}


def _value_and_grads(entry, backend, hidden, weight, bias, labels):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    value = ENTRIES[entry](*leaves, labels, backend)
    value.backward()
    return value.detach(), [leaf.grad for leaf in leaves]


# ---------------------------------------------------------------------------------------------------------------
# 1. autocast


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_cpu_autocast_runs_the_head_as_linear_would(backend, entry):
    """Under CPU bf16 autocast with float32 inputs every entry runs (it crashed on every fast backend), equals the
    same call on inputs cast to bfloat16 outside autocast (the documented rule), and gives float32 gradients."""
    if device_of(backend).type != "cpu":
        pytest.skip(
            "CPU autocast; CUDA autocast is tests/kernels/test_gpu.py::test_cuda_autocast_runs_the_head_as_linear_would"
        )
    hidden, weight, bias, labels = _inputs("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, grads = _value_and_grads(entry, backend, hidden, weight, bias, labels)
    cast = [t.to(torch.bfloat16) for t in (hidden, weight, bias)]
    expected, expected_grads = _value_and_grads(entry, backend, *cast, labels)
    assert value.dtype == torch.float32
    assert rel_err(value, expected) < 1e-6
    for grad, expected_grad in zip(grads, expected_grads):
        assert grad.dtype == torch.float32
        assert rel_err(grad, expected_grad) < 1e-6


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_cpu_autocast_agrees_with_the_reference_backend(entry):
    hidden, weight, bias, labels = _inputs("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads = _value_and_grads(entry, "reference", hidden, weight, bias, labels)
        for backend in BACKENDS:
            value, grads = _value_and_grads(entry, backend, hidden, weight, bias, labels)
            assert rel_err(value, expected) < 2e-2, backend
            assert all(rel_err(g, e) < 5e-2 for g, e in zip(grads, expected_grads)), backend


def test_float64_inputs_are_left_alone_by_autocast():
    hidden, weight, bias, labels = _inputs("cpu", torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = dpo_fast.token_logps(hidden, weight, labels, bias=bias, backend="torch")
    assert logp.dtype == torch.float64
    assert rel_err(logp, dpo_fast.token_logps(hidden, weight, labels, bias=bias, backend="reference")) < 1e-12


# ---------------------------------------------------------------------------------------------------------------
# 2, 3. torch.compile with dynamic shapes; packed input without num_segments


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_dynamic_shapes_compile_every_entry(entry):
    hidden, weight, bias, labels = _inputs("cpu")
    torch._dynamo.reset()
    compiled = torch.compile(lambda h, w, b, y: ENTRIES[entry](h, w, b, y, "torch"), fullgraph=True, dynamic=True)
    assert rel_err(compiled(hidden, weight, bias, labels), ENTRIES[entry](hidden, weight, bias, labels, "torch")) < 1e-5


def test_packed_sequence_logps_compiles_without_num_segments():
    hidden, weight, bias, labels = _inputs("cpu")
    flat_hidden, flat_labels = hidden.reshape(20, 8), labels.reshape(20)
    segments = torch.arange(4).repeat_interleave(5)
    eager = dpo_fast.sequence_logps(flat_hidden, weight, flat_labels, bias=bias, segment_ids=segments, backend="torch")
    torch._dynamo.reset()
    compiled = torch.compile(lambda h, y, s: dpo_fast.sequence_logps(h, weight, y, bias=bias, segment_ids=s,
                                                                     backend="torch"), fullgraph=True)  # fmt: skip
    assert rel_err(compiled(flat_hidden, flat_labels, segments), eager) < 1e-6


# ---------------------------------------------------------------------------------------------------------------
# 4. second-order gradients


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("entry", ["dpo", "dpo_recompute", "cpo", "orpo", "kto"])
def test_a_double_backward_through_a_loss_raises_on_every_backend(backend, entry):
    """The reference backend returned a second-order gradient without the loss's own curvature (61% off finite
    differences); every backend now refuses, as the chunked ones did."""
    hidden, weight, bias, labels = (t.to(device_of(backend)) for t in _inputs("cpu", torch.float64 if backend in (
        "reference", "torch", "cpp") else torch.float32))  # fmt: skip
    weight.requires_grad_()
    hidden.requires_grad_()
    loss = ENTRIES[entry](hidden, weight, bias, labels, backend)
    with pytest.raises(RuntimeError, match="create_graph"):
        (grad_hidden,) = torch.autograd.grad(loss, hidden, create_graph=True)
        torch.autograd.grad(grad_hidden.pow(2).sum(), weight)


def test_reference_token_logps_keep_their_exact_second_order_gradients():
    """Per-token log-probs on the reference backend are plain autograd: the second order is exact there."""
    hidden, weight, bias, labels = _inputs("cpu", torch.float64)
    weight.requires_grad_()

    def grad_norm(w):
        h = hidden.detach().requires_grad_()
        (grad,) = torch.autograd.grad(dpo_fast.token_logps(h, w, labels, backend="reference").sum(), h,
                                      create_graph=True)  # fmt: skip
        return grad.pow(2).sum()

    (second,) = torch.autograd.grad(grad_norm(weight), weight)
    step = torch.zeros_like(weight)
    step[3, 2] = 1e-6
    finite = (grad_norm(weight.detach() + step) - grad_norm(weight.detach() - step)) / 2e-6
    assert abs(second[3, 2].item() - finite.item()) < 1e-6 * max(1.0, abs(finite.item()))


# ---------------------------------------------------------------------------------------------------------------
# 5, 6. the same answer from every path at the edges


def _paths(backend):
    """(name, backend, grads_in_forward, grad enabled): the fused pass, the recompute path, no_grad."""
    paths = [("recompute", backend, False, True), ("no_grad", backend, None, False)]
    if backend != "reference":
        paths.insert(0, ("fused", backend, None, True))
    return paths


@pytest.mark.parametrize("backend", ALL)
def test_kto_with_minus_inf_target_logits_is_finite_and_exact_on_every_path(backend):
    """Every completion token's target is a masked (-inf bias) entry: each completion's log-prob is -inf, the
    sigmoid saturates, and the loss is the mean of ``desirable`` (kl = 0): 2/3 for [True, False, True]."""
    device = device_of(backend)
    labels = torch.full((3, 5), 7, device=device)
    labels[:, :2] = -100
    bias = torch.zeros(13, device=device)
    bias[7] = -math.inf
    weight = torch.randn(13, 8, generator=torch.Generator().manual_seed(1)).to(device)
    for name, be, grads_in_forward, grad in _paths(backend):
        hidden = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(2)).to(device).requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = dpo_fast.fused_linear_kto_loss(
                hidden, weight, labels, bias=bias, desirable=torch.tensor([True, False, True], device=device),
                ref_logps=torch.zeros(3, device=device), kl=0.0, backend=be, grads_in_forward=grads_in_forward,
            )  # fmt: skip
        assert out.loss.item() == pytest.approx(2 / 3, abs=1e-6), name
        if grad:
            out.loss.backward()
            assert torch.isfinite(hidden.grad).all(), name


@pytest.mark.parametrize("backend", ALL)
def test_orpo_with_an_empty_completion_is_nan_on_every_compiled_path(backend):
    """Eager raises; compiled (no check can raise) every path gives NaN, as documented."""
    device = device_of(backend)
    hidden, weight, bias, labels = (t.to(device) for t in _inputs("cpu"))
    labels[1] = -100  # pair 1's chosen completion is empty
    with pytest.raises(ValueError, match="no completion token"):
        dpo_fast.fused_linear_orpo_loss(hidden, weight, labels, backend=backend)
    for name, be, grads_in_forward, grad in _paths(backend):
        torch._dynamo.reset()
        loss_fn = torch.compile(lambda h, w, y: dpo_fast.fused_linear_orpo_loss(
            h, w, y, backend=be, grads_in_forward=grads_in_forward).loss)  # fmt: skip
        with torch.set_grad_enabled(grad):
            loss = loss_fn(hidden.detach().clone().requires_grad_(grad), weight, labels)
        assert torch.isnan(loss), (name, loss)


# ---------------------------------------------------------------------------------------------------------------
# 7, 8. outputs


def test_rewards_are_detached_even_when_the_reference_requires_grad():
    hidden, weight, bias, labels = _inputs("cpu")
    ref = torch.zeros(2, requires_grad=True)
    out = dpo_fast.fused_linear_dpo_loss(hidden, weight, labels, ref_chosen_logps=ref * 1, ref_rejected_logps=ref * 2)
    assert not any(t.requires_grad for t in (out.chosen_rewards, out.rejected_rewards, out.reward_margin,
                                             out.reward_accuracy))  # fmt: skip
    kto = dpo_fast.fused_linear_kto_loss(hidden, weight, labels, desirable=torch.tensor([True, False, True, False]),
                                         ref_logps=torch.zeros(4, requires_grad=True) * 1, kl=0.0)  # fmt: skip
    assert not kto.rewards.requires_grad


@pytest.mark.parametrize("entry", ["dpo", "cpo", "orpo"])
def test_every_pair_output_follows_the_inputs_dtype(entry):
    hidden, weight, bias, labels = _inputs("cpu", torch.float64)
    call = {"dpo": lambda: dpo_fast.fused_linear_dpo_loss(hidden, weight, labels, **_pair_ref("cpu", torch.float64)),
            "cpo": lambda: dpo_fast.fused_linear_cpo_loss(hidden, weight, labels),
            "orpo": lambda: dpo_fast.fused_linear_orpo_loss(hidden, weight, labels)}[entry]  # fmt: skip
    out = call()
    for name in ("loss", "chosen_logps", "chosen_rewards", "reward_accuracy", "reward_margin"):
        assert getattr(out, name).dtype == torch.float64, name


# ---------------------------------------------------------------------------------------------------------------
# 9. Triton's interpreter and bfloat16, without the tests' own patches


@pytest.mark.skipif("triton" not in BACKENDS or torch.cuda.is_available(), reason="Triton's CPU interpreter")
def test_the_triton_backend_is_right_in_bfloat16_under_the_interpreter():
    """A user running the Triton backend on CPU (TRITON_INTERPRET=1) got log-probs near -7e9 in bfloat16 from the
    interpreter's integer dot; this runs in a fresh process, where no test patch applies."""
    script = (
        "import torch, dpo_fast\n"
        "g = torch.Generator().manual_seed(0)\n"
        "h = torch.randn(6, 16, generator=g); w = torch.randn(40, 16, generator=g) * 0.3\n"
        "y = torch.randint(0, 40, (6,), generator=g)\n"
        "got = dpo_fast.token_logps(h.bfloat16(), w.bfloat16(), y, backend='triton')\n"
        "ref = dpo_fast.token_logps(h.bfloat16().double(), w.bfloat16().double(), y, backend='reference')\n"
        "print(float((got.double() - ref).abs().max()))\n"
    )
    env = {"TRITON_INTERPRET": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT / "tests",
                          env={**env, "HOME": str(Path.home())}, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) < 0.05, done.stdout


# ---------------------------------------------------------------------------------------------------------------
# 10-13. clear errors


def test_kto_with_no_completion_raises_as_the_pairwise_losses_do():
    weight = torch.randn(13, 8)
    for call in (
        lambda: dpo_fast.fused_linear_kto_loss(torch.randn(0, 5, 8), weight, torch.zeros(0, 5, dtype=torch.long),
                                               desirable=torch.zeros(0, dtype=torch.bool), ref_logps=torch.zeros(0),
                                               kl=0.0),  # fmt: skip
        lambda: dpo_fast.fused_linear_dpo_loss(torch.randn(0, 5, 8), weight, torch.zeros(0, 5, dtype=torch.long),
                                               ref_chosen_logps=torch.zeros(0), ref_rejected_logps=torch.zeros(0)),
    ):  # fmt: skip
        with pytest.raises(ValueError, match="hidden"):
            call()


def test_the_loss_module_takes_a_prebuilt_objective():
    objective = dpo_fast.objectives.trl_dpo_objective("ipo", beta=0.2)
    module = dpo_fast.FusedLinearDPOLoss(objective=objective, backend="torch")
    hidden, weight, bias, labels = _inputs("cpu")
    expected = dpo_fast.fused_linear_dpo_loss(hidden, weight, labels, objective=objective, backend="torch",
                                              **_pair_ref("cpu", torch.float32))  # fmt: skip
    assert module(hidden, weight, labels, **_pair_ref("cpu", torch.float32)).loss == expected.loss
    with pytest.raises(ValueError, match="objective"):
        dpo_fast.FusedLinearDPOLoss(objective=objective, beta=0.3)


@pytest.mark.parametrize(
    "prompt, chosen, pad_id, message",
    [([1, 2], [3, -100], 0, "non-negative"), ([1.5, 2], [3], 0, "non-negative ints"), ([1, 2], [3], True, "pad_id"),
     ([1, 2], [3], -1, "pad_id")],
)  # fmt: skip
def test_collate_shared_refuses_what_is_not_a_token_id(prompt, chosen, pad_id, message):
    rows = {"prompt_ids": [prompt], "chosen_ids": [chosen], "rejected_ids": [[4]]}
    with pytest.raises(ValueError, match=message):
        prefix_sharing.collate_shared(rows, pad_id=pad_id)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_torch_func_transforms_raise_one_clear_error_on_the_chunked_backends(backend, transform):
    hidden, weight, bias, labels = (t.to(device_of(backend)) for t in _inputs("cpu"))

    def logps(h):
        return dpo_fast.token_logps(h, weight, labels[0] if transform == "vmap" else labels, backend=backend).sum()

    with pytest.raises(RuntimeError, match="torch.func"):
        getattr(torch.func, transform)(logps)(hidden)


def test_torch_func_runs_on_the_reference_backend_for_log_probs():
    hidden, weight, bias, labels = _inputs("cpu")
    grad = torch.func.grad(lambda h: dpo_fast.token_logps(h, weight, labels, backend="reference").sum())(hidden)
    leaf = hidden.clone().requires_grad_()
    dpo_fast.token_logps(leaf, weight, labels, backend="reference").sum().backward()
    assert rel_err(grad, leaf.grad) < 1e-6
