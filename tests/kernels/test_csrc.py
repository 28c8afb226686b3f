"""The C++ and CUDA extensions' own guarantees: inputs checked in the bindings, CUDA kernels that compile for sm_90
without spilling, the CUDA host side on the caller's device and stream.

The binding checks (csrc/common.h, shared by both extensions) run against the extension of this machine's device:
``cpp`` here, ``cuda`` on a GPU machine. The sm_90 compile needs only nvcc (``nvcc -Xptxas -v``), not a GPU.
"""

import re
import shutil
import subprocess

import pytest
import torch
from helpers import device_of

from dpo_fast import _build
from dpo_fast.backends import Chunk, HeadSpec, torch_chunked

EXTENSION = "cuda" if torch.cuda.is_available() else "cpp"
DEVICE = device_of(EXTENSION)
VOCAB, HIDDEN, TOKENS = 50, 8, 4
NVCC = shutil.which("nvcc")


def _chunk():
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "hidden": torch.randn(6, HIDDEN, generator=gen),
        "weight": torch.randn(VOCAB, HIDDEN, generator=gen),
        "bias": torch.randn(VOCAB, generator=gen),
        "rows": torch.tensor([0, 2, 3, 5]),
        "targets": torch.tensor([1, 7, 49, 0]),
    }
    return {key: value.to(DEVICE) for key, value in inputs.items()}


def _stats(module, chunk, keep_logits=False):
    return module.logits_stats(
        chunk["hidden"], chunk["weight"], chunk["bias"], chunk["rows"], chunk["targets"], None, 1.0, True, keep_logits
    )


def _grad_args(module, chunk, keep_logits=False):
    """logits_grad's arguments by name, from a fresh forward."""
    max_logit, log_sum_exp, _, mean_shifted, _, _, logits = _stats(module, chunk, keep_logits)
    return {
        **chunk, "max_logit": max_logit, "log_sum_exp": log_sum_exp, "mean_shifted": mean_shifted,
        "grad_logp": torch.ones(TOKENS, device=DEVICE), "grad_entropy": torch.ones(TOKENS, device=DEVICE),
        "softcap": None, "temperature": 1.0, "logits": logits,
    }  # fmt: skip


BAD_PER_ROW = {
    "too short": lambda value: value[:-1],
    "too long": lambda value: torch.cat([value, value]),
    "2-d": lambda value: value[:, None],
    "integer": lambda value: value.to(torch.int32),
    "on the CPU" if DEVICE.type == "cuda" else "on the meta device": lambda value: value.to(
        "cpu" if DEVICE.type == "cuda" else "meta"
    ),
}


@pytest.mark.parametrize("name", ["max_logit", "log_sum_exp", "mean_shifted", "grad_logp", "grad_entropy"])
@pytest.mark.parametrize("bad", BAD_PER_ROW)
def test_every_per_row_tensor_is_checked_by_name(name, bad):
    module = _build.load(EXTENSION)
    args = _grad_args(module, _chunk())
    args[name] = BAD_PER_ROW[bad](args[name])
    with pytest.raises(RuntimeError, match=name):
        module.logits_grad(**args)


@pytest.mark.parametrize(
    "bad, change",
    [
        ("shape", lambda logits: logits[:, :-1]),
        ("dtype", lambda logits: logits.double()),
        ("layout", lambda logits: logits.t().contiguous().t()),
        ("rows", lambda logits: logits[:-1]),
    ],
)
def test_kept_logits_are_checked(bad, change):
    module = _build.load(EXTENSION)
    args = _grad_args(module, _chunk(), keep_logits=True)
    args["logits"] = change(args["logits"])
    with pytest.raises(RuntimeError, match="logits must be the"):
        module.logits_grad(**args)


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("weight", lambda t: t[:, :-1], "must share H"),
        ("weight", lambda t: t.double(), "weight must have hidden's dtype"),
        ("hidden", lambda t: t.int(), "does not take Int"),
        ("bias", lambda t: t[:-1], r"bias must be a floating tensor of shape \(V,\)"),
        ("bias", lambda t: t.long(), "bias must be a floating tensor"),
        ("rows", lambda t: t.int(), "rows and targets must be int64"),
        ("targets", lambda t: t[:-1], "rows and targets must be int64 tensors of one shape"),
    ],
)
def test_chunk_arguments_are_checked_by_name(name, change, message):
    module = _build.load(EXTENSION)
    chunk = _chunk()
    chunk[name] = change(chunk[name])
    with pytest.raises(RuntimeError, match=message):
        _stats(module, chunk)


@pytest.mark.parametrize("target", [-(2**63), 2**63 - 1])
def test_extreme_targets_give_nan_rows(target):
    module = _build.load(EXTENSION)
    chunk = _chunk()
    chunk["targets"][1] = target
    args = _grad_args(module, chunk, keep_logits=True)
    target_logit = _stats(module, chunk)[2].cpu()
    grad = module.logits_grad(**args).cpu()
    assert torch.isnan(target_logit[1]) and torch.isfinite(target_logit[[0, 2, 3]]).all()
    assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 2, 3]]).all()


# --- the CUDA kernels for the H100/H200 target, compiled here -------------------------------------------------


def _ptxas_report(source, *extra):
    """{kernel: (registers, spill store bytes, spill load bytes)} from ``nvcc -Xptxas -v`` for sm_90."""
    command = [NVCC, "-c", "-arch=sm_90", "-std=c++17", *_build.EXTENSIONS["cuda"].cuda_cflags, "-Xptxas", "-v",
               *extra, str(source), "-o", "/dev/null"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    kernels, current = {}, None
    for line in result.stderr.splitlines():
        if match := re.search(r"Compiling entry function '(\w+)'", line):
            current = match.group(1)
        elif (match := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)) and current:
            kernels[current] = [None, int(match.group(1)), int(match.group(2))]
        elif (match := re.search(r"Used (\d+) registers", line)) and current:
            kernels[current][0] = int(match.group(1))
    return {_demangle(name): tuple(values) for name, values in kernels.items()}


def _demangle(name):
    if shutil.which("c++filt") is None:
        return name
    return subprocess.run(["c++filt", name], capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="no nvcc here")
def test_cuda_kernels_compile_for_sm90_without_spills():
    """Every kernel of every .cu file (csrc/README.md records the registers this prints)."""
    sources = sorted((_build.sources_root() / "cuda").glob("*.cu"))
    assert sources
    report = {name: values for source in sources for name, values in _ptxas_report(source).items()}
    for name, (registers, stores, loads) in sorted(report.items()):
        print(f"{registers:4d} registers, {stores} B spill stores, {loads} B spill loads: {name}")
    assert len(report) == 4  # row_stats, and logits_grad for float32, bfloat16, float16 output
    spilling = {name: values for name, values in report.items() if values[1] or values[2]}
    assert not spilling, spilling


# 32 values live until their sum is known: more than the 24 registers that sm_90 allows at least
SPILLING_KERNEL = """
__global__ void spills(float* out, const float* in) {
  float values[32], sum = 0.0f;
#pragma unroll
  for (int i = 0; i < 32; ++i) sum += values[i] = in[threadIdx.x + 256 * i];
#pragma unroll
  for (int i = 0; i < 32; ++i) out[threadIdx.x + 256 * i] = values[i] / sum;
}
"""


@pytest.mark.slow
@pytest.mark.skipif(NVCC is None, reason="no nvcc here")
def test_the_spill_check_sees_a_spill(tmp_path):
    """A kernel capped at 24 registers (asked for 16: sm_90's least) spills, and the report says so."""
    source = tmp_path / "spills.cu"
    source.write_text(SPILLING_KERNEL)
    ((registers, stores, loads),) = _ptxas_report(source, "-maxrregcount=16").values()
    assert registers <= 24 and stores > 0 and loads > 0


# --- the CUDA host side on a GPU: device and stream taken in the binding ------------------------------------


@pytest.mark.gpu
def test_cuda_binding_runs_on_the_current_stream():
    module = _build.load("cuda")
    chunk = _chunk()
    expected = torch_chunked.logits_stats(Chunk(**chunk, head=HeadSpec()), True, False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        stats = _stats(module, chunk)
        grad = module.logits_grad(**_grad_args(module, chunk))
    side.synchronize()
    torch.testing.assert_close(stats[1], expected.log_sum_exp)
    assert torch.isfinite(grad).all()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_binding_runs_on_the_tensors_device():
    module = _build.load("cuda")
    chunk = {key: value.to("cuda:1") for key, value in _chunk().items()}
    expected = torch_chunked.logits_stats(Chunk(**chunk, head=HeadSpec()), True, False)
    with torch.cuda.device(0):
        stats = _stats(module, chunk)
    assert stats[0].device == torch.device("cuda:1")
    torch.testing.assert_close(stats[1], expected.log_sum_exp)
