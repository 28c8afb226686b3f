"""The Triton kernels with the GPU's launch configuration, and torch's float32 precision settings.

On CPU the kernels run in Triton's interpreter, by default with small tiles. Here the interpreter
runs the tiles, warps and stages an H100 launch picks (``config.INTERPRETER_SM_COUNT``), at shapes
smaller and larger than one tile in every dimension, so the masks at tile edges are exercised as
the GPU will run them; every launch is checked to be a variant the sm_90 compile test compiles.
The oracle is float64 autograd through the plain formulas (no kernel math repeated).
"""

import importlib

import pytest
import torch
from helpers import TOLERANCE, device_of, rel_err

from dpo_fast import backends
from dpo_fast.backends import Chunk, HeadSpec

DEVICE = device_of("triton")  # CUDA on a machine with a GPU, else CPU (the interpreter)
if backends.get("triton").unavailable_reason(DEVICE, torch.float32) is not None:
    pytest.skip("the triton backend cannot run here", allow_module_level=True)
aot = pytest.importorskip("dpo_fast.kernels.aot")
config = pytest.importorskip("dpo_fast.kernels.config")

H100_SMS = 132
# (tokens, hidden, vocab): one partial row block, V and H spanning several tiles with ragged ends;
# a second row block of 2 tokens, V and H under one tile
SHAPES = [(7, 200, 300), (130, 50, 100)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class LaunchRecorder:
    """Stands in for a ``@triton.jit`` kernel and records the constexprs and options of each launch."""

    def __init__(self, kernel, name: str, launches: list):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.name, kwargs))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def gpu_launches(monkeypatch):
    """Run the interpreter with an H100's launch configuration; yield the list of launches made."""
    monkeypatch.setattr(config, "INTERPRETER_SM_COUNT", H100_SMS)
    launches = []
    for name in ("logits_stats", "logits_grad"):
        module = importlib.import_module(f"dpo_fast.kernels.{name}")
        kernel = getattr(module, f"{name}_kernel")
        monkeypatch.setattr(module, f"{name}_kernel", LaunchRecorder(kernel, name, launches))
    yield launches


def _compiled_variants(dtype: torch.dtype) -> list[dict]:
    """The constexprs and options of every variant the sm_90 compile test compiles for ``dtype``."""
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    compiled = []
    for variant in aot.variants():
        if variant.dtype == name:
            launch = variant.launch
            compiled.append((variant.kernel, {**dict(variant.flags), **launch.constexprs(), **launch.options()}))
    return compiled


def _problem(tokens, hidden_dim, vocab, dtype, with_bias, softcap, seed=0):
    """hidden (tokens + 3, H) of which ``tokens`` rows are picked, weight (V, H), bias, targets; on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens + 3, hidden_dim, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_dim, generator=gen) * (2.0 / hidden_dim**0.5)).to(dtype)
    bias = torch.randn(vocab, generator=gen).to(dtype) if with_bias else None
    rows = torch.randperm(tokens + 3, generator=gen)[:tokens]
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    head = HeadSpec(softcap, 0.8 if softcap else 1.0)
    return hidden, weight, bias, rows, targets, head


def _on_device(*tensors):
    return [None if tensor is None else tensor.to(DEVICE) for tensor in tensors]


def _oracle(hidden, weight, bias, rows, targets, head, grad_logp, grad_entropy):
    """Float64 statistics, and dL/dx of sum(a * logp + e * entropy) by autograd (CPU tensors)."""
    x = (hidden[rows].double() @ weight.double().t()).requires_grad_(True)
    pre = x if bias is None else x + bias.double()
    z = pre if head.softcap is None else head.softcap * torch.tanh(pre / head.softcap)
    z = z / head.temperature
    logprobs = torch.log_softmax(z, dim=1)
    logp = logprobs.gather(1, targets[:, None]).squeeze(1)
    entropy = -(logprobs.exp() * logprobs).sum(1)
    loss = (grad_logp.double() * logp).sum() + (grad_entropy.double() * entropy).sum()
    (grad_x,) = torch.autograd.grad(loss, x)
    stats = {
        "logp": logp,
        "entropy": entropy,
        "mean_logit": z.mean(1),
        "log_sum_sq_probs": torch.logsumexp(2 * logprobs, 1),
        "max_logit": z.max(1).values,
    }
    return {key: value.detach() for key, value in stats.items()}, grad_x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "C{}_H{}_V{}".format(*s))
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["no_softcap", "softcap"])
def test_gpu_launch_configuration_against_float64(gpu_launches, dtype, shape, with_bias, softcap):
    _check_against_float64(gpu_launches, dtype, shape, with_bias, softcap, TOLERANCE[dtype])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "C{}_H{}_V{}".format(*s))
def test_gpu_launch_configuration_tf32(gpu_launches, restore_fp32_precision, shape):
    """float32 with TF32 allowed: the tensor-core tiles (128x128x32) instead of the FMA ones (128x64x16)."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    # TF32 operands keep 10 mantissa bits on a GPU (the interpreter multiplies exactly): 16-bit tolerances
    _check_against_float64(gpu_launches, torch.float32, shape, True, 3.0, TOLERANCE[torch.bfloat16])
    assert {launch[1]["INPUT_PRECISION"] for launch in gpu_launches} == {"tf32", "ieee"}  # ieee: kept logits


def _check_against_float64(launches, dtype, shape, with_bias, softcap, tol):
    """Every (with_metrics, keep_logits) pair of one problem against the float64 oracle; launches compiled."""
    hidden, weight, bias, rows, targets, head = _problem(*shape, dtype, with_bias, softcap)
    gen = torch.Generator().manual_seed(1)
    grad_logp, grad_entropy = torch.randn(shape[0], generator=gen), torch.randn(shape[0], generator=gen)
    expected, expected_grad = _oracle(hidden, weight, bias, rows, targets, head, grad_logp, grad_entropy)
    _, expected_grad_logp_only = _oracle(
        hidden, weight, bias, rows, targets, head, grad_logp, torch.zeros_like(grad_entropy)
    )
    inputs = _on_device(hidden, weight, bias, rows, targets)
    backend = backends.get("triton")
    for with_metrics in (False, True):
        for keep_logits in (False, True):
            stats = backend.logits_stats(Chunk(*inputs, head), with_metrics, keep_logits)
            assert rel_err(stats.logp, expected["logp"]) < tol["values"]
            assert rel_err(stats.max_logit, expected["max_logit"]) < tol["values"]
            if with_metrics:
                for field in ("entropy", "mean_logit", "log_sum_sq_probs"):
                    assert rel_err(getattr(stats, field), expected[field]) < tol["values"], field
            if keep_logits:
                assert stats.logits.shape == (shape[0], shape[2])
            grad_logp_on, grad_entropy_on = _on_device(grad_logp, grad_entropy if with_metrics else None)
            grad = backend.logits_grad(Chunk(*inputs, head), stats, grad_logp_on, grad_entropy_on)
            assert grad.dtype == dtype and grad.shape == (shape[0], shape[2])
            want = expected_grad if with_metrics else expected_grad_logp_only
            assert rel_err(grad, want) < tol["grads"], (with_metrics, keep_logits)

    compiled = _compiled_variants(dtype)
    assert len(launches) == 8
    for launch in launches:
        assert launch in compiled, f"a launch the sm_90 compile test does not compile: {launch}"


@pytest.fixture
def restore_fp32_precision():
    """Put torch's float32 matmul precision settings back as they were (torch >= 2.9's API)."""
    if not hasattr(torch.backends, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has only the legacy precision API")
    generic, matmul = torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    legacy = torch.get_float32_matmul_precision()
    yield
    # the legacy setter sets both APIs' state; torch refuses to read allow_tf32 while they disagree
    torch.set_float32_matmul_precision(legacy)
    torch.backends.cuda.matmul.fp32_precision = matmul
    torch.backends.fp32_precision = generic
    assert torch.backends.cuda.matmul.allow_tf32 == (legacy != "highest")


@pytest.mark.parametrize(
    "setting",
    ["matmul_tf32", "generic_tf32", "matmul_ieee", "legacy_allow_tf32", "legacy_matmul_precision_high"],
)
def test_float32_precision_read_through_either_torch_api(restore_fp32_precision, setting):
    expected = "ieee" if setting == "matmul_ieee" else "tf32"
    if setting == "matmul_tf32":
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    elif setting == "generic_tf32":
        torch.backends.fp32_precision = "tf32"
    elif setting == "matmul_ieee":
        torch.backends.cuda.matmul.fp32_precision = "ieee"
    elif setting == "legacy_allow_tf32":
        torch.backends.cuda.matmul.allow_tf32 = True
    else:
        torch.set_float32_matmul_precision("high")
    assert backends.float32_matmul_precision() == expected
    hidden, weight, bias, rows, targets, head = _problem(5, 24, 40, torch.float32, True, None)
    stats = backends.get("triton").logits_stats(
        Chunk(*_on_device(hidden, weight, bias, rows, targets), head), True, False
    )
    expected_stats, _ = _oracle(hidden, weight, bias, rows, targets, head, torch.zeros(5), torch.zeros(5))
    tol = TOLERANCE[torch.float32 if expected == "ieee" else torch.bfloat16]["values"]
    assert rel_err(stats.logp, expected_stats["logp"]) < tol
