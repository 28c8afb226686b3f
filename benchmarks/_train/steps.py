"""Each optimizer step of a training run, measured from outside the trainer: memory, time, tokens, attention.

``StepWindows`` puts two global hooks on torch (a forward pre-hook on every module, a post-hook on
every optimizer's ``step``), so it measures any trainer alike (TRL's, FastDPOTrainer, the lean
trainer behind ``dpo-fast train``, a plain loop) without reaching into it. A step's window opens at
the first module call after the previous optimizer step (the first of the run for step 0), so it
holds the reference pass, the forward, the backward and the optimizer's update, and none of the
logging or gradient zeroing between steps; it closes when ``optimizer.step()`` returns.

Per step: ``peak_bytes``, the memory probe's peak in the window above the memory at its opening
(so the weights and the optimizer state that existed then are left out; the gradients, which the
trainers free between steps, are in); ``baseline_bytes``, that opening memory; ``seconds``; and
``embedded_tokens``, the most token positions one embedding call saw (the batch's ``2 x pairs x T``,
or with prefix sharing a ``[prompt][chosen][rejected]`` row a pair). Over the whole run it also
counts the calls to ``scaled_dot_product_attention`` with and without an attention mask, and the
largest mask's shape (a (rows, 1, T, T) mask is the one thing of the attention that grows as T^2).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from _stack.memory import MemoryProbe
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook


class StepWindows:
    """Measure each optimizer step while installed (``with StepWindows(probe) as windows: train()``).

    ``on_open(index)`` and ``on_close(index, step)`` are called as windows open and close (the
    close callback may raise to end the run there). ``steps`` lists the closed windows.
    """

    def __init__(self, probe: MemoryProbe, on_open: Callable[[int], None] | None = None,
                 on_close: Callable[[int, dict], None] | None = None):  # fmt: skip
        self.probe, self.on_open, self.on_close = probe, on_open, on_close
        self.steps: list[dict] = []
        self.attention = {"calls_with_mask": 0, "calls_without_mask": 0, "largest_mask": None}
        self._open: dict | None = None
        self._handles = []
        self._sdpa = None

    def __enter__(self) -> StepWindows:
        self._handles = [register_module_forward_pre_hook(self._forward),
                         register_optimizer_step_post_hook(self._step_done)]  # fmt: skip
        self._sdpa = torch.nn.functional.scaled_dot_product_attention
        torch.nn.functional.scaled_dot_product_attention = self._attention
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        torch.nn.functional.scaled_dot_product_attention = self._sdpa

    @property
    def open_index(self) -> int | None:
        """The index of the step whose window is open, or None between steps."""
        return None if self._open is None else len(self.steps)

    def _forward(self, module: torch.nn.Module, args: tuple) -> None:
        if self._open is None:
            self._open = {"baseline_bytes": self.probe.start(), "start": time.perf_counter(), "embedded_tokens": 0}
            if self.on_open:
                self.on_open(len(self.steps))
        if isinstance(module, torch.nn.Embedding) and args and isinstance(args[0], torch.Tensor):
            self._open["embedded_tokens"] = max(self._open["embedded_tokens"], args[0].numel())

    def _step_done(self, optimizer, args, kwargs) -> None:
        window, self._open = self._open, None
        if window is None:  # an optimizer step without a forward since the last one: nothing to measure
            return
        step = {"peak_bytes": self.probe.growth(), "baseline_bytes": window["baseline_bytes"],
                "seconds": time.perf_counter() - window["start"], "embedded_tokens": window["embedded_tokens"]}  # fmt: skip
        self.steps.append(step)
        if self.on_close:
            self.on_close(len(self.steps) - 1, step)

    def _attention(self, query, key, value, attn_mask=None, *args, **kwargs):
        if attn_mask is None:
            self.attention["calls_without_mask"] += 1
        else:
            self.attention["calls_with_mask"] += 1
            largest = self.attention["largest_mask"]
            if largest is None or attn_mask.numel() > largest["elements"]:
                self.attention["largest_mask"] = {"shape": list(attn_mask.shape), "dtype": str(attn_mask.dtype),
                                                  "elements": attn_mask.numel()}  # fmt: skip
        return self._sdpa(query, key, value, attn_mask, *args, **kwargs)
