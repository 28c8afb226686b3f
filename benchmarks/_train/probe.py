"""The worker of ``bench_train.py`` and ``bench_memory.py``: one training run of one arm, each step measured.

``measure(spec, save)`` is ``_stack.worker``'s target. The spec (JSON):

- ``arm``: a name of ``arms.ARMS``; ``model``: LlamaConfig keywords; ``device``: ``cpu`` or ``cuda``;
  ``gradient_checkpointing``: bool;
- ``shapes``: one ``models.Shape`` (as a dict) per optimizer step;
- ``measured``: the indices of the steps reported (the run ends when the last of them closes);
- ``budget_bytes``: None, or a step's memory limit: a measured step over it ends the run with
  status ``over_budget`` (on CPU the moment its growth passes the limit, by ``memory.Watchdog``).

The result: ``status`` (``ok``, ``over_budget``, ``out_of_memory``, ``error``, ``skipped``), ``reason`` or
``error`` where there is one, ``memory_kind`` (``rss`` or ``cuda_allocated``), ``steps`` (each
measured step's ``StepWindows`` record with its ``shape`` and ``expected_tokens``), ``attention``
(``StepWindows.attention``), and for a run stopped over its budget ``stopped_at_bytes``, the growth
when it was stopped (a lower bound of that step's peak).
"""

from __future__ import annotations

from dataclasses import asdict

import torch
from _stack import worker
from _stack.memory import MemoryProbe, Watchdog

from _train import arms
from _train.models import Shape
from _train.steps import StepWindows


def measure(spec: dict, save) -> dict:
    arm, device, budget = spec["arm"], spec["device"], spec.get("budget_bytes")
    shapes = [Shape(**shape) for shape in spec["shapes"]]
    measured = set(spec["measured"])
    probe = MemoryProbe(device)
    result = {"arm": arm, "status": "running", "memory_kind": probe.kind, "steps": [], "attention": None}
    reason = arms.unavailable(arm, device)
    if reason:
        return {**result, "status": "skipped", "reason": reason}
    sharing = arms.ARMS[arm].prefix_sharing

    def over_budget(growth: int) -> None:  # the watchdog's thread
        worker.stop_process(save, {**result, "status": "over_budget", "stopped_at_bytes": growth})

    watchdog = Watchdog(probe, budget, over_budget) if budget and not probe.cuda else None

    def on_open(index: int) -> None:
        if watchdog and index in measured:
            watchdog.arm()

    def on_close(index: int, step: dict) -> None:
        if watchdog:
            watchdog.disarm()
        if index not in measured:
            return
        step.update(index=index, shape=asdict(shapes[index]), expected_tokens=shapes[index].embedded_tokens(sharing))
        result["steps"].append(step)
        if step["embedded_tokens"] != step["expected_tokens"]:
            raise worker.Done({**result, "status": "error", "error": (
                f"step {index} embedded {step['embedded_tokens']} token positions, not the {step['expected_tokens']} "
                "of its shape: the trainer did not take the batches in the planned order")})  # fmt: skip
        if budget and step["peak_bytes"] > budget:
            raise worker.Done({**result, "status": "over_budget"})
        if index == max(measured):
            raise worker.Done({**result, "status": "ok"})
        save(result)

    try:
        with StepWindows(probe, on_open, on_close) as windows:
            result["attention"] = windows.attention
            arms.run(arm, spec["model"], shapes, device, spec["gradient_checkpointing"])
        return {**result, "status": "error", "error": f"the run ended after {len(windows.steps)} steps, before the "
                f"last measured one ({max(measured)})"}  # fmt: skip
    except torch.OutOfMemoryError:
        return {**result, "status": "out_of_memory", "stopped_in_step": windows.open_index}
    except Exception as error:  # noqa: BLE001 (an arm that fails is reported, and the run goes on)
        return {**result, "status": "error", "error": f"{type(error).__name__}: {error}"[-1500:]}
    finally:
        if watchdog:
            watchdog.stop()
