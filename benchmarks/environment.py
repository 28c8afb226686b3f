"""The machine, the software and the code a run measured: what every results file records beside its numbers.

``python benchmarks/environment.py`` prints the code state of this checkout (commit, uncommitted
changes, source fingerprint), to compare with the one a results file recorded.
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
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# What a run writes (and ``--resume`` reads): left out of the dirty check and of the fingerprint
RESULTS = "benchmarks/results"
# The code a measurement depends on: hashed into the source fingerprint, which needs no git
SOURCE_FOLDERS = ("dpo_fast", "kernels", "csrc", "benchmarks")
SOURCE_FILES = ("pyproject.toml", "setup.py")
# Where git cannot tell (a copy of the tree, as on the GPU machine), a launcher may state the commit it copied
STATED_COMMIT = "DPO_FAST_COMMIT"
SOURCE_SUFFIXES = (".py", ".cpp", ".cu", ".cuh", ".h", ".json", ".yaml", ".jsonl", ".jinja", ".toml")

# Distributions whose versions a run records (the peers' too, or "not installed").
PACKAGES = ("torch", "triton", "numpy", "dpo-fast", "trl", "liger-kernel", "cut-cross-entropy", "verl",
            "transformers", "nvidia-cutlass-dsl", "quack-kernels")  # fmt: skip


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


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


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


def code_state() -> dict:
    """The code a run measured.

    commit: ``git rev-parse HEAD`` (None outside a git checkout); dirty: whether the tree differed
    from it (None when unknown); dirty_files: ``git status --porcelain`` lines; diff_sha256: sha256
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
    status = _git("status", "--porcelain", "--untracked-files=all", *outside_results).stdout.decode()
    dirty_files = [line for line in status.splitlines() if line.strip()]
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


def dpo_fast_default(device: torch.device, dtype: torch.dtype) -> dict:
    """What ``fused_linear_dpo_loss`` runs here with its defaults: ``backend="auto"`` resolved on this
    machine (``cpp`` on CPU once its extension is built), ``grads_in_forward`` left to its default
    (True for every chunked backend, as ``dpo_fast.api`` decides), and the benchmark's row name for it."""
    from dpo_fast import backends, chunking

    backend = backends.resolve("auto", device, dtype)
    grads_in_forward = backend != "reference"
    return {
        "backend": backend, "grads_in_forward": grads_in_forward,
        "scratch_mib": chunking.DEFAULT_SCRATCH_MIB.get(device.type),
        "implementation": f"dpo_fast-{backend}" + ("" if grads_in_forward else "-recompute"),
    }  # fmt: skip


def describe(device: torch.device) -> dict:
    """Date, device, host, versions and code, as recorded at the top of a results file."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    meta = {
        "date": datetime.date.today().isoformat(),
        "device": {
            "type": device.type,
            "cpu": _cpu_model(),
            "cpu_cores_available": cores,
            "memory_gib": _memory_gib(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {"python": platform.python_version(), **{name: _version(name) for name in PACKAGES}},
        "torch_build": {"cuda": torch.version.cuda, "torch": torch.__version__},
        "env": {name: os.environ[name] for name in ("TRITON_INTERPRET", "OMP_NUM_THREADS") if name in os.environ},
        "code": code_state(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["device"].update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                              sm_count=props.multi_processor_count)  # fmt: skip
    return meta


def slug(meta: dict) -> str:
    """The device part of a results file's name: the GPU's name, or ``cpu``."""
    name = meta["device"].get("gpu", "cpu")
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


if __name__ == "__main__":
    print(json.dumps(code_state(), indent=1))
