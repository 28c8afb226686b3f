"""Test setup: Triton's interpreter on machines without CUDA, hypothesis profiles, the gpu marker."""

import importlib.util
import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors only in the interpreter; it must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    from triton_interpreter import patch_bf16_dot

    patch_bf16_dot()

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; a skip here is not a pass of the GPU path")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
