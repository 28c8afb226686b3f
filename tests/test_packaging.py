"""A built wheel installs into a fresh virtual environment and imports, kernels included.

The fresh environment borrows the running interpreter's site-packages (torch, triton) through a
``.pth`` line, appended after its own site-packages, so the dpo_fast it imports is the wheel's:
the test checks that, and that ``dpo_fast.kernels`` (the top-level ``kernels/`` folder) and
``dpo_fast.integrations`` are in it.
"""

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHECK = r"""
import os, sys, torch
import dpo_fast, dpo_fast.kernels
assert dpo_fast.__file__.startswith(sys.prefix), dpo_fast.__file__
assert dpo_fast.kernels.__file__.startswith(sys.prefix), dpo_fast.kernels.__file__
import dpo_fast.kernels.aot, dpo_fast.kernels.config, dpo_fast.kernels.logits_tile
import dpo_fast.kernels.logits_grad, dpo_fast.kernels.logits_stats
import dpo_fast.integrations.hf
assert dpo_fast.integrations.hf.__file__.startswith(sys.prefix)
hidden = torch.randn(2, 3, 4, requires_grad=True)
out = dpo_fast.fused_linear_dpo_loss(hidden, torch.randn(5, 4), torch.randint(0, 5, (2, 3)), reference_free=True)
out.loss.backward()
print("ok", dpo_fast.__version__, dpo_fast.kernels.__file__)
"""


@pytest.mark.slow
def test_wheel_imports_in_a_fresh_virtualenv(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, ROOT],
        check=True,
    )
    (wheel,) = tmp_path.glob("dpo_fast-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    own_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(own_site, "borrowed_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], check=True)
    result = subprocess.run([python, "-c", CHECK], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
