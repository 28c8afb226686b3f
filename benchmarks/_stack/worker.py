"""The one subprocess worker: a function of ``benchmarks/`` run in a fresh Python process (or, for smoke runs, here).

A measurement that must not share a process with another (on CPU the peak resident set is the
whole process's; on either device an arm may monkey-patch the libraries it uses) runs as::

    outcome = worker.run("_train.probe:measure", spec, isolate=True, timeout_s=600)

The target is ``module:function`` importable with ``benchmarks/`` on ``sys.path``, called as
``function(spec, save) -> dict | None``. ``save(result)`` records a result so far (a worker cut
short by its timeout or killed keeps the last one); raising ``Done(result)`` ends the work with
that result at once (in a fresh process, without the interpreter's teardown); the function's
return value, if not None, is the result too. From another thread, ``stop_process(save, result)``
ends a fresh process at once with that result (a watchdog's way out of a long kernel). In a fresh process the spec must be JSON; the
process gets ``environ`` on top of this one's environment (on CPU, ``memory.CPU_ENV``).

``isolate=False`` calls the function in this process (smoke runs, where start-up would be most of
the time; the measurements then share the process).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1]
_in_child = False  # set in the fresh process


class Done(BaseException):  # noqa: N818 (not an error: the work's end; BaseException so that no `except Exception` of a library stops it)
    """Raised by a target to end its work now with ``result``."""

    def __init__(self, result: dict):
        super().__init__("worker done")
        self.result = result


@dataclass
class Outcome:
    """What came back: the result (None if none was saved), the exit status (0 in-process), whether the
    timeout stopped it, and the end of its error output when it failed."""

    result: dict | None
    returncode: int
    timed_out: bool = False
    error: str | None = None

    @property
    def killed(self) -> bool:
        """Killed by SIGKILL, on CPU usually the kernel's out-of-memory killer."""
        return self.returncode in (-9, 137)


def stop_process(save: Callable[[dict], None], result: dict) -> bool:
    """From any thread of a fresh worker process: save ``result`` and end the process now (no return).
    In-process (``isolate=False``) nothing can stop the work from another thread: returns False."""
    if not _in_child:
        return False
    save(result)
    os._exit(0)


def _target(name: str) -> Callable:
    module, _, function = name.partition(":")
    return getattr(importlib.import_module(module), function)


def run(target: str, spec: dict, isolate: bool = True, timeout_s: float | None = None,
        environ: dict[str, str] | None = None) -> Outcome:  # fmt: skip
    """Run ``target(spec, save)`` in a fresh process (``isolate``) or in this one; see the module's docstring."""
    if not isolate:
        saved = [None]

        def save(result: dict) -> None:
            saved[0] = result

        try:
            returned = _target(target)(spec, save)
        except Done as done:
            returned = done.result
        return Outcome(returned if returned is not None else saved[0], 0)
    with tempfile.TemporaryDirectory(prefix="bench-worker-") as scratch:
        spec_path, result_path = Path(scratch, "spec.json"), Path(scratch, "result.json")
        spec_path.write_text(json.dumps(spec))
        command = [sys.executable, __file__, target, str(spec_path), str(result_path)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=timeout_s,
                                  env={**os.environ, **(environ or {})}, check=False)  # fmt: skip
            returncode, timed_out, stderr = done.returncode, False, done.stderr
        except subprocess.TimeoutExpired as expired:
            stderr = expired.stderr.decode(errors="replace") if isinstance(expired.stderr, bytes) else expired.stderr
            returncode, timed_out = -9, True
        result = json.loads(result_path.read_text()) if result_path.exists() else None
    error = None if returncode == 0 else f"worker exit {returncode}: {(stderr or '').strip()[-1500:]}"
    return Outcome(result, returncode, timed_out, error)


def _child(target: str, spec_path: str, result_path: str) -> None:
    """The fresh process: run the target, write each saved result atomically, skip the teardown once done."""
    global _in_child
    _in_child = True

    def save(result: dict) -> None:
        partial = Path(result_path + ".part")
        partial.write_text(json.dumps(result))
        partial.replace(result_path)

    try:
        returned = _target(target)(json.loads(Path(spec_path).read_text()), save)
    except Done as done:
        returned = done.result
    if returned is not None:
        save(returned)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the result is written: no teardown of the libraries the work loaded


if __name__ == "__main__":
    sys.path[0] = str(BENCHMARKS)  # benchmarks/, not this folder: the stack's modules are ``_stack.*``
    from _stack import worker  # this module under its own name: targets raise its Done, read its flag

    worker._child(*sys.argv[1:])
