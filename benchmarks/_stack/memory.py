"""The one memory probe: the peak memory of a stretch of work, in bytes, on CPU or CUDA.

``MemoryProbe.start()`` takes the memory now as the baseline and resets the peak to it;
``growth()`` is the peak since then above the baseline.

- CPU (Linux): the process's resident set. The peak is the kernel's high-water mark (``VmHWM`` in
  ``/proc/self/status``), reset to the current resident set (``VmRSS``) by writing ``5`` to
  ``/proc/self/clear_refs``; ``ru_maxrss`` would not do, as it cannot be reset and a child process
  starts with its parent's. A process that measures so runs with ``CPU_ENV``: glibc's mmap
  threshold fixed at its 128 KiB default (left dynamic, it rises after the first large free and
  keeps freed blocks in the heap, and the peak then moves by tens of MiB with the heap's
  fragmentation, not with the tensors).
- CUDA: ``torch.cuda.memory_allocated`` and ``max_memory_allocated`` (after a synchronize): the
  tensors, not the caching allocator's reserve or the CUDA context.

``Watchdog`` calls back, from a thread, once the growth passes a limit: a worker that only needs to
know that a step does not fit in a budget stops there instead of finishing the step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

# The environment of a process that measures its resident set (see above)
CPU_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


class MemoryProbe:
    """Peak memory above a baseline, in bytes: the resident set on CPU, allocated tensors on CUDA.

    ``kind`` names the figure in results files: ``"rss"`` or ``"cuda_allocated"``.
    """

    def __init__(self, device: str = "cpu"):
        self.cuda = str(device).startswith("cuda")
        self.kind = "cuda_allocated" if self.cuda else "rss"
        self.baseline = 0

    def current(self) -> int:
        """Bytes in use now."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return _status_bytes("VmRSS")

    def start(self) -> int:
        """Reset the peak to the memory in use now, which becomes the baseline; returns it."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # VmHWM := VmRSS
        self.baseline = self.current()
        return self.baseline

    def peak(self) -> int:
        """The most bytes in use since ``start()``."""
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _status_bytes("VmHWM")

    def growth(self) -> int:
        """The peak since ``start()`` above the baseline, in bytes."""
        return self.peak() - self.baseline


class Watchdog:
    """Calls ``on_exceed(growth_bytes)`` once, from its thread, when ``probe.growth()`` passes ``limit`` bytes.

    It reads the probe every ``interval_s`` seconds while armed (``arm()``, ``disarm()``), so the
    growth it reports may pass the limit by what the work allocates in one interval.
    """

    def __init__(self, probe: MemoryProbe, limit: int, on_exceed: Callable[[int], None], interval_s: float = 0.01):
        self.probe, self.limit, self.on_exceed, self.interval_s = probe, limit, on_exceed, interval_s
        self._armed = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def arm(self) -> None:
        self._armed.set()

    def disarm(self) -> None:
        self._armed.clear()

    def stop(self) -> None:
        self._stopped.set()
        self._armed.set()  # wake the thread so that it ends
        self._thread.join()

    def _watch(self) -> None:
        while not self._stopped.is_set():
            self._armed.wait()
            if self._stopped.is_set():
                return
            growth = self.probe.growth()
            if growth > self.limit:
                self._stopped.set()
                self.on_exceed(growth)
                return
            self._stopped.wait(self.interval_s)
