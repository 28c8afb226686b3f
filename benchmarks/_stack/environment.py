"""The one environment record: the machine, the software and the code a run measured.

Every results file of ``benchmarks/`` (``bench_loss.py``, ``bench_train.py``, ``bench_memory.py``,
``record_figures.py``, ``gpu_check.py``) records ``describe()`` beside its numbers. It imports
torch only inside ``describe``, so a machine where torch does not import still gets a record
saying why (``gpu_check.py`` runs it before anything else is known to work)::

    python benchmarks/_stack/environment.py             # this checkout's code state (commit, changes, fingerprint)
    python benchmarks/_stack/environment.py --describe  # the whole record for this machine, as JSON
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# What a run writes (and ``--resume`` reads): left out of the dirty check and of the fingerprint
RESULTS = "benchmarks/results"
# The code a measurement depends on: hashed into the source fingerprint, which needs no git
SOURCE_FOLDERS = ("dpo_fast", "kernels", "csrc", "benchmarks")
SOURCE_FILES = ("pyproject.toml", "setup.py")
SOURCE_SUFFIXES = (".py", ".cpp", ".cu", ".cuh", ".h", ".json", ".yaml", ".jsonl", ".jinja", ".toml")
# Where git cannot tell (a copy of the tree, as on the GPU machine), a launcher may state the commit it copied
STATED_COMMIT = "DPO_FAST_COMMIT"

# Distributions whose versions a record holds (a version, or None when not installed): dpo_fast's stack and every peer
PACKAGES = ("torch", "triton", "numpy", "dpo-fast", "transformers", "accelerate", "datasets", "peft", "trl",
            "liger-kernel", "cut-cross-entropy", "verl", "nvidia-cutlass-dsl", "quack-kernels",
            "huggingface-hub")  # fmt: skip


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def version(package: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, check=False)
    except OSError:  # no git on this machine
        return None


def source_fingerprint() -> str:
    """sha256 over the source files' paths and bytes (``SOURCE_FOLDERS``, ``SOURCE_FILES``; ``benchmarks/results``
    left out): the same on every copy of the same tree, with or without git (the GPU machine gets a copy)."""
    paths = [ROOT / name for name in SOURCE_FILES if (ROOT / name).is_file()]
    for folder in SOURCE_FOLDERS:
        paths += [path for path in (ROOT / folder).rglob("*") if path.is_file() and path.suffix in SOURCE_SUFFIXES]
    digest = hashlib.sha256()
    for path in sorted(paths):
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(RESULTS + "/") or "__pycache__" in path.parts:
            continue
        digest.update(relative.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _porcelain_lines(status_z: bytes) -> list[str]:
    """``git status --porcelain -z`` as ``"XY path"`` lines, paths as they are (without ``-z`` git quotes a path
    with a space or a non-ASCII letter); a rename's or copy's source path, its own NUL-ended field, is left out."""
    fields = iter(status_z.decode().split("\0"))
    lines = []
    for line in fields:
        if line:
            lines.append(line)
            if "R" in line[:2] or "C" in line[:2]:
                next(fields, None)
    return lines


def code_state() -> dict:
    """The code a run measured.

    commit: ``git rev-parse HEAD`` (None outside a git checkout); dirty: whether the tree differed
    from it (None when unknown); dirty_files: ``git status --porcelain`` lines (paths unquoted); diff_sha256: sha256
    of ``git diff HEAD`` and of each untracked file's path and bytes, so that two runs of the same
    uncommitted change are recognisable; source_sha256: ``source_fingerprint()``. The results
    folder is left out of all of them: a run writes there. Outside a git checkout, ``stated_commit``
    holds what the launcher put in ``$DPO_FAST_COMMIT`` (not checked here; None if unset).
    """
    state = {"commit": None, "dirty": None, "dirty_files": None, "diff_sha256": None,
             "source_sha256": source_fingerprint()}  # fmt: skip
    head = _git("rev-parse", "HEAD")
    if head is None or head.returncode != 0:
        state["git"] = "not a git checkout (or no git here): the commit is unknown; source_sha256 identifies the code"
        state["stated_commit"] = os.environ.get(STATED_COMMIT)
        return state
    outside_results = ["--", ".", f":(exclude){RESULTS}"]
    dirty_files = _porcelain_lines(
        _git("status", "--porcelain", "-z", "--untracked-files=all", *outside_results).stdout
    )
    digest = hashlib.sha256(_git("diff", "HEAD", "--binary", *outside_results).stdout)
    for line in dirty_files:
        if line.startswith("??"):
            path = line[3:]
            digest.update(path.encode() + b"\0" + (ROOT / path).read_bytes())
    state.update(commit=head.stdout.decode().strip(), dirty=bool(dirty_files), dirty_files=dirty_files,
                 diff_sha256=digest.hexdigest() if dirty_files else None)  # fmt: skip
    return state


def code_summary(code: dict | None) -> str:
    """``code_state()`` in a sentence, for a report; a file from before the code was recorded says so."""
    if code is None:
        return "Code: not recorded (this file was written before the commit was recorded)."
    fingerprint = f"source sha256 {code['source_sha256'][:12]}"
    if code["commit"] is None:
        stated = code.get("stated_commit")
        said = f" The launcher stated commit {stated} (${STATED_COMMIT}, not checked here)." if stated else ""
        return f"Code: commit unknown ({code.get('git', 'no git')}); {fingerprint}.{said}"
    if not code["dirty"]:
        return f"Code: commit {code['commit'][:10]}, clean tree; {fingerprint}."
    files = ", ".join(line[3:] for line in code["dirty_files"][:8]) + (" ..." if len(code["dirty_files"]) > 8 else "")
    return (f"Code: commit {code['commit'][:10]} **with uncommitted changes** ({len(code['dirty_files'])} files: "
            f"{files}; diff sha256 {code['diff_sha256'][:12]}); {fingerprint}.")  # fmt: skip


def dpo_fast_default(device, dtype) -> dict:
    """What ``fused_linear_dpo_loss`` runs here with its defaults (a ``torch.device`` and ``torch.dtype``):
    ``backend="auto"`` resolved on this machine (``cpp`` on CPU once its extension is built),
    ``grads_in_forward`` left to its default (True for every chunked backend, as ``dpo_fast.api``
    decides), and ``bench_loss.py``'s row name for it."""
    from dpo_fast import backends, chunking

    backend = backends.resolve("auto", device, dtype)
    grads_in_forward = backend != "reference"
    return {
        "backend": backend, "grads_in_forward": grads_in_forward,
        "scratch_mib": chunking.DEFAULT_SCRATCH_MIB.get(device.type),
        "implementation": f"dpo_fast-{backend}" + ("" if grads_in_forward else "-recompute"),
    }  # fmt: skip


def _torch_record(device: str | None) -> tuple[str, dict]:
    """(the device type, what torch says about it); device None: ``cuda`` where torch sees one, else ``cpu``."""
    try:
        import torch
    except Exception as error:  # noqa: BLE001 (a torch that does not import is what the record must say)
        return device or "cpu", {"error": f"torch does not import: {error!r}"}
    kind = str(device) if device else ("cuda" if torch.cuda.is_available() else "cpu")
    found = {"torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available()}
    if kind.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(kind))
        found.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                     sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}")  # fmt: skip
    build = {"torch": torch.__version__, "cuda": torch.version.cuda}
    return kind.split(":")[0], {"device": found, "torch_build": build}


def describe(device: str | None = None) -> dict:
    """The record at the top of a results file.

    ``device``: ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``), or None for the one torch would use.
    Returns ``date`` (YYYY-MM-DD) and ``started`` (UTC, ISO 8601); ``device``: ``type``, ``cpu``
    (model name), ``cpu_cores_available``, ``memory_gib`` (host RAM), ``load_average_1m`` (at the
    start; a run adds ``load_average_1m_end``), ``torch_threads``, ``cuda_available``, and on CUDA
    ``gpu`` (name), ``gpu_memory_gib``, ``sm_count``, ``capability``; ``versions``: ``python`` and
    each of ``PACKAGES`` (None: not installed); ``torch_build``: torch's version and its CUDA;
    ``env``: ``TRITON_INTERPRET`` and ``OMP_NUM_THREADS`` where set; ``code``: ``code_state()``;
    ``error`` only where torch does not import.
    """
    kind, found = _torch_record(device)
    now = datetime.datetime.now(datetime.timezone.utc)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    record = {
        "date": now.date().isoformat(),
        "started": now.isoformat(timespec="seconds"),
        "device": {"type": kind, "cpu": _cpu_model(), "cpu_cores_available": cores, "memory_gib": _memory_gib(),
                   "load_average_1m": round(os.getloadavg()[0], 2), **found.get("device", {})},
        "versions": {"python": platform.python_version(), **{name: version(name) for name in PACKAGES}},
        "torch_build": found.get("torch_build", {}),
        "env": {name: os.environ[name] for name in ("TRITON_INTERPRET", "OMP_NUM_THREADS") if name in os.environ},
        "code": code_state(),
    }  # fmt: skip
    if "error" in found:
        record["error"] = found["error"]
    return record


def finish(record: dict) -> None:
    """Add what a run knows only at its end: the load average then (``device.load_average_1m_end``)."""
    record["device"]["load_average_1m_end"] = round(os.getloadavg()[0], 2)


def device_name(record: dict) -> str:
    """The device in words: the GPU's name, or the CPU's with its cores."""
    device = record["device"]
    return device.get("gpu") or f"{device['cpu']} ({device['cpu_cores_available']} cores)"


def versions_line(record: dict) -> str:
    """``name version, ...`` of what is installed (files written before None meant that said "not installed")."""
    installed = {name: value for name, value in record["versions"].items() if value not in (None, "not installed")}
    return ", ".join(f"{name} {value}" for name, value in installed.items())


def slug(record: dict) -> str:
    """The device part of a results file's name: the GPU's name, or ``cpu``."""
    name = record["device"].get("gpu", "cpu")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


if __name__ == "__main__":
    if sys.argv[1:] == ["--describe"]:
        print(json.dumps(describe()))
    else:
        print(json.dumps(code_state(), indent=1))
