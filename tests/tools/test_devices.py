"""Every backend-parametrized test builds its tensors on its backend's device (``helpers.device_of``).

On a machine with a GPU, the torch, triton and cuda backends take CUDA tensors; a test that builds on CPU
there fails (``cuda``, ``triton``) or quietly tests the CPU instead (``torch``). CPU CI sees that fault through
the device check of tests/conftest.py: the suite runs again with meta declared as every backend's device, and
each backend-parametrized test must hand meta tensors, and only those, to its first call into dpo_fast.
"""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

# A backend test as one should not be written: its tensors on CPU whatever the backend.
CANARY = """
import pytest
import torch
from helpers import BACKENDS, device_of

import dpo_fast


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["declared", "cpu"])
def test_canary(backend, where):
    device = device_of(backend) if where == "declared" else "cpu"
    labels = torch.zeros(2, 3, dtype=torch.long, device=device)
    dpo_fast.token_logps(torch.randn(2, 3, 4, device=device), torch.randn(5, 4, device=device), labels,
                         backend=backend)
"""


def _device_check(*paths) -> subprocess.CompletedProcess:
    # --runxfail: a test expected to fail for another reason still gets its inputs checked
    command = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--runxfail", *map(str, paths)]
    env = {**os.environ, "DPO_FAST_DEVICE_CHECK": "1"}
    return subprocess.run(command, check=False, capture_output=True, text=True, env=env, cwd=TESTS.parent)


def test_backend_tests_build_their_tensors_on_the_backend_device():
    result = _device_check(TESTS)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1], result.stdout[-2000:]


def test_the_device_check_catches_a_test_that_builds_on_cpu(tmp_path):
    for name in ("conftest.py", "helpers.py"):
        (tmp_path / name).write_text((TESTS / name).read_text())
    (tmp_path / "test_canary.py").write_text(CANARY)
    result = _device_check(tmp_path / "test_canary.py")
    outcomes = {line.split()[1]: line.split()[0] for line in result.stdout.splitlines() if "::test_canary[" in line}
    assert outcomes and all(
        outcome == ("PASSED" if "declared" in test else "FAILED") for test, outcome in outcomes.items()
    ), result.stdout[-4000:]
    assert "off the backend's device meta" in result.stdout
