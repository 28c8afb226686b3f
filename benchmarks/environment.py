"""The machine and the software a run measured: what every results file records beside its numbers."""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import re

import torch

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


def describe(device: torch.device) -> dict:
    """Date, device, host and versions, as recorded at the top of a results file."""
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
