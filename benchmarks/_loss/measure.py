"""Measuring one implementation on one case and mode: time, peak memory, error against the reference.

Time: ``warmup`` steps (compilation, autotuning and allocator growth stay out; in a fresh CPU
process the memory step below is the first of them), then the median of ``repeats`` steps; forward and forward+backward come from the same steps (device events on CUDA,
``time.perf_counter`` on CPU, where every op is synchronous). Gradients are cleared before each
step (set to None), so no step pays for accumulating into the previous one's.

Memory (``_stack.memory.MemoryProbe``): on CUDA, the peak allocated over one step above what was
allocated before it (the inputs): the step's buffers and the gradients it returns. On CPU (Linux),
in a fresh process, the peak resident set over the first full-size step above the resident set
just before it, after a tiny warm-up step has taken the one-time costs (imports, library buffers,
compilation).

Errors: ``||out - ref|| / ||ref||`` against ``cases.reference`` for each output the mode has.
Out-of-memory is recorded (``oom``), never raised; so is any other failure of a peer (``error``).
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
from dataclasses import dataclass

import torch
from _stack.memory import MemoryProbe

from _loss.cases import Batch, Case, make_batch
from _loss.implementations import Implementation, StepOutputs

MIB = 2**20


@dataclass(frozen=True)
class Settings:
    warmup: int
    repeats: int


def record_for(case: Case, impl: str, mode: str) -> dict:
    """An empty result row (the JSON schema of ``benchmarks/README.md``)."""
    return {
        "case": case.name, "pairs": case.pairs, "T": case.length, "H": case.hidden, "V": case.vocab,
        "tokens": case.tokens, "valid_tokens": case.valid_tokens, "dtype": case.dtype, "implementation": impl,
        "mode": mode, "fwd_ms": None, "fwd_bwd_ms": None, "tflops": None, "gemm_ratio": None, "peak_mem_mb": None,
        "memory_kind": None, "max_rel_err": None, "errors": None, "oom": False, "error": None, "rounds": None,
        "median_round": None,
    }  # fmt: skip


def rel_err(actual: torch.Tensor, expected: torch.Tensor, slice_elements: int = 1 << 25) -> float:
    """``||actual - expected|| / ||expected||`` in float64, a slice at a time: ``expected`` lives on the
    CPU, and a whole (V, H) gradient in float64 beside the step's own tensors could run out of memory."""
    actual, expected = actual.detach().reshape(-1), expected.detach().reshape(-1)
    diff_sq = ref_sq = 0.0
    for start in range(0, expected.numel(), slice_elements):
        ref = expected[start : start + slice_elements].to(actual.device, torch.float64)
        diff_sq += (actual[start : start + slice_elements].double() - ref).square().sum().item()
        ref_sq += ref.square().sum().item()
    return math.sqrt(diff_sq) / max(math.sqrt(ref_sq), 1e-30)


def compare(outputs: StepOutputs, batch: Batch, expected: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative error of each output the reference has; an output the implementation did not give is inf."""
    got = {
        "loss": outputs.loss, "seq_logps": outputs.seq_logps, "token_logps": outputs.token_logps,
        "grad_hidden": batch.hidden.grad, "grad_weight": batch.weight.grad,
    }  # fmt: skip
    return {key: float("inf") if got[key] is None else rel_err(got[key], ref) for key, ref in expected.items()}


class _Clock:
    """Marks on the device's timeline: CUDA events, or host time on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


def _step(run, batch: Batch, mode: str, clock: _Clock):
    """One step: (outputs, marks before forward, after forward, after backward)."""
    batch.clear_grads()
    with torch.set_grad_enabled(mode != "forward"):
        start = clock.mark()
        outputs = run()
        mid = clock.mark()
        if mode != "forward":
            outputs.backward()
        end = clock.mark()
    return outputs, (start, mid, end)


def time_steps(run, batch: Batch, mode: str, settings: Settings) -> tuple[float, float | None, StepOutputs]:
    """Median forward ms and forward+backward ms (None in the forward mode), and the last step's outputs."""
    clock = _Clock(batch.hidden.device)
    for _ in range(settings.warmup):
        _step(run, batch, mode, clock)
    marks = []
    for _ in range(settings.repeats):
        outputs, step_marks = _step(run, batch, mode, clock)
        marks.append(step_marks)
    if clock.cuda:
        torch.cuda.synchronize()
    fwd = statistics.median(clock.ms(start, mid) for start, mid, _ in marks)
    fwd_bwd = statistics.median(clock.ms(start, end) for start, _, end in marks)
    return fwd, (None if mode == "forward" else fwd_bwd), outputs


def step_memory_mib(run, batch: Batch, mode: str) -> tuple[float, str]:
    """Peak memory of one step above the memory in use before it, MiB, and its kind (``MemoryProbe.kind``): the
    allocator's on CUDA, the resident set on CPU (Linux)."""
    gc.collect()
    probe = MemoryProbe(batch.hidden.device.type)
    probe.start()
    outputs, _ = _step(run, batch, mode, _Clock(batch.hidden.device))
    del outputs
    return probe.growth() / MIB, probe.kind


def warm_up_on_a_tiny_batch(impl: Implementation, case: Case, device: torch.device, mode: str) -> None:
    """One step of ``impl`` on 1 pair of 8 tokens: its one-time costs kept out of a step's memory that follows."""
    tiny = make_batch(dataclasses.replace(case, pairs=1, length=8), device, mode)
    _step(impl.make_step(tiny, mode), tiny, mode, _Clock(device))


def measure(impl: Implementation, case: Case, mode: str, device: torch.device, settings: Settings,
            expected: dict[str, torch.Tensor] | None, fresh_process: bool) -> dict:  # fmt: skip
    """One result row. ``expected``: the reference outputs (None: no error check, as for the GEMM line).

    In a fresh process on CPU the memory is the RSS growth of the first full step, which counts as
    the first warm-up step (a full step on the same inputs); on CUDA it is the allocator's peak;
    otherwise it is not measured, nor for the GEMM line (its outputs are preallocated by definition).
    """
    record = record_for(case, impl.name, mode)
    batch = run = outputs = None
    try:
        batch = make_batch(case, device, mode)
        run = impl.make_step(batch, mode)
        if fresh_process and device.type == "cpu" and impl.name != "gemm":
            warm_up_on_a_tiny_batch(impl, case, device, mode)
            record["peak_mem_mb"], record["memory_kind"] = step_memory_mib(run, batch, mode)
            settings = dataclasses.replace(settings, warmup=max(0, settings.warmup - 1))
        record["fwd_ms"], record["fwd_bwd_ms"], outputs = time_steps(run, batch, mode, settings)
        if expected is not None:
            record["errors"] = compare(outputs, batch, expected)
            record["max_rel_err"] = max(record["errors"].values())
        outputs = None
        if device.type == "cuda" and impl.name != "gemm":
            batch.clear_grads()
            record["peak_mem_mb"], record["memory_kind"] = step_memory_mib(run, batch, mode)
    except torch.OutOfMemoryError:
        record["oom"] = True
    except Exception as error:  # noqa: BLE001 (a failing peer is reported, and the run goes on)
        record["error"] = f"{type(error).__name__}: {error}"[:500]
    finally:
        del batch, run, outputs
        release(device)
    return record


def release(device: torch.device) -> None:
    """Free what a finished (or failed) measurement left: Python garbage, then the CUDA cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
