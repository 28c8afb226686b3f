"""Test setup: Triton's interpreter on machines without CUDA, hypothesis profiles, the markers, the device check."""

import dataclasses
import importlib.util
import os

import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors only in the interpreter; it must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from helpers import DEVICE_CHECK, device_of
from hypothesis import HealthCheck, Phase, settings

import dpo_fast
from dpo_fast import backends

if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None:
    # the triton backend applies it before its first launch; the kernel tests launch dpo_fast.kernels directly
    from dpo_fast.backends.triton_interpreter import patch_bf16_dot

    patch_bf16_dot()

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# under the device check a test ends at its first call into dpo_fast: one example, and no shrinking of a failure
settings.register_profile("device_check", max_examples=1, deadline=None, phases=[Phase.explicit, Phase.generate])
settings.load_profile("device_check" if DEVICE_CHECK else os.environ.get("HYPOTHESIS_PROFILE", "ci"))
if (
    DEVICE_CHECK
):  # tests that pick tokens by value (masks, nonzero) before calling dpo_fast get a shape for them on meta
    torch.fx.experimental._config.meta_nonzero_assume_all_nonzero = True


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module: the tiny models run fastest so, and do not fight other processes for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cpu_only(reason): a backend-parametrized test that runs on CPU tensors on every machine"
    )


def _backend_under_test(item) -> str | None:
    """The ``backend`` parameter of a backend-parametrized test, unless the test is marked cpu_only."""
    params = getattr(item, "callspec", None) and item.callspec.params
    if not params or "backend" not in params or item.get_closest_marker("cpu_only"):
        return None
    return params["backend"]


def pytest_collection_modifyitems(config, items):
    if DEVICE_CHECK:  # only the tests whose tensors must be on their backend's device
        checked = [item for item in items if _backend_under_test(item) is not None]
        config.hook.pytest_deselected(items=[item for item in items if item not in checked])
        items[:] = checked
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; a skip here is not a pass of the GPU path")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The device check: each backend-parametrized test runs with meta declared as its backend's device, up to its
# first call into dpo_fast (a public function, an adapter's chunk entry point, or an op under opcheck). That call
# fails the test if any tensor it is given lies elsewhere, and otherwise ends the test as a pass: meta tensors
# hold no values to compute with.
PUBLIC_ENTRIES = tuple(name for name in dpo_fast.__all__ if name.startswith("fused_linear_") or name.endswith("_logps"))


class DeviceChecked(BaseException):
    """Every tensor of a test's first call into dpo_fast was on the declared device (a BaseException: hypothesis
    passes it through rather than shrinking on it)."""


def _tensors(value, name):
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, (list, tuple)):
        for index, element in enumerate(value):
            yield from _tensors(element, f"{name}[{index}]")
    elif isinstance(value, dict):
        for key, element in value.items():
            yield from _tensors(element, f"{name}[{key!r}]")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):  # a backend's Chunk
        for field in dataclasses.fields(value):
            yield from _tensors(getattr(value, field.name), f"{name}.{field.name}")


def _entry_point(name, device):
    def check(*args, **kwargs):
        arguments = [*_tensors(list(args), "args"), *_tensors(kwargs, "kwargs")]
        off_device = [f"{where} on {tensor.device}" for where, tensor in arguments if tensor.device != device]
        assert not off_device, (
            f"{name} got tensors off the backend's device {device}: {', '.join(off_device)}; build a "
            "backend-parametrized test's tensors on helpers.device_of(backend), or mark the test cpu_only"
        )
        raise DeviceChecked

    return check


@pytest.fixture(autouse=True)
def _device_check(request, monkeypatch):
    backend = _backend_under_test(request.node)
    if not DEVICE_CHECK or backend is None:
        return
    device = device_of(backend)
    for name in PUBLIC_ENTRIES:
        monkeypatch.setattr(dpo_fast, name, _entry_point(f"dpo_fast.{name}", device))
    for adapter in backends.CHUNKED_BACKENDS:
        for name in ("logits_stats", "logits_grad"):
            monkeypatch.setattr(backends.get(adapter), name, _entry_point(f"backends.{adapter}.{name}", device))
    monkeypatch.setattr(torch.library, "opcheck", _entry_point("torch.library.opcheck", device))
    # compiled functions run eagerly: the check needs the call itself, not a graph of it
    monkeypatch.setattr(torch, "compile", lambda fn=None, **options: fn if fn is not None else (lambda f: f))


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    try:
        return (yield)
    except DeviceChecked:
        return True
