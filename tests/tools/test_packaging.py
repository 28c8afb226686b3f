"""Installing dpo_fast: a wheel in a fresh virtualenv, and installs that survive an extension they cannot build.

The fresh environments borrow the running interpreter's site-packages (torch, triton, setuptools,
pip) through a ``.pth`` line, appended after their own site-packages, so the dpo_fast they import
is the one installed there. The builds run on a copy of the project (tracked and untracked,
not-ignored files), never in this checkout. A planted ``#include`` of a missing header makes a C++
source fail at once, where a real compile would take a minute.

setup.py's promise (docs/api.md, "Building the C++/CUDA extension"): a skipped or failed extension never
fails the install. Issue 12, finding 6: with a CUDA build of torch and nvcc but no GPU (a Docker
build stage, a login node), torch found no architecture to build for, the CUDA extension failed,
and the editable install then died copying the module that was never built.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import types
import venv
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[2]
PLANTED = '#include "no_such_header_planted_by_test_packaging.h"\n'

CHECK_WHEEL = r"""
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

CHECK_EDITABLE = r"""
import importlib.util, sys, torch
import dpo_fast, dpo_fast.kernels
project = sys.argv[1]
assert dpo_fast.__file__.startswith(project) and dpo_fast.kernels.__file__.startswith(project), dpo_fast.__file__
assert importlib.util.find_spec("dpo_fast._cpp") is None, "the extension that did not compile is installed"
hidden = torch.randn(2, 3, 4, requires_grad=True)
out = dpo_fast.fused_linear_dpo_loss(hidden, torch.randn(5, 4), torch.randint(0, 5, (2, 3)), reference_free=True,
                                     backend="torch")
out.loss.backward()
print("ok")
"""


def _setup_module() -> types.ModuleType:
    """setup.py's functions (importing it runs no build: ``setup()`` runs only as ``__main__``)."""
    spec = importlib.util.spec_from_file_location("dpo_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _copy_project(destination: Path) -> Path:
    """The checkout's tracked and untracked, not-ignored files; without git (a copy of the tree, as on the
    GPU machine), every file but build outputs, caches and environments."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.split("\0")  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        ignored = shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "*.so", "__pycache__", ".*cache",
                                         ".hypothesis", ".whl", "gpu-results", "runs")  # fmt: skip
        return Path(shutil.copytree(ROOT, destination, ignore=ignored))
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def _plant_compile_error(project: Path, folder: str) -> None:
    """Every C++ source of ``csrc/<folder>`` fails at its first line."""
    for source in (project / "csrc" / folder).glob("*.cpp"):
        source.write_text(PLANTED + source.read_text())


def _borrowing_venv(env_dir: Path) -> Path:
    """A fresh virtualenv that sees the running interpreter's site-packages folders after its own; its python."""
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    own_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    borrowed = [path for path in sys.path if Path(path).name == "site-packages"]
    Path(own_site, "borrowed_site.pth").write_text("".join(f"{path}\n" for path in borrowed))
    return python


def _cuda_toolkit() -> str | None:
    """A CUDA toolkit folder with its headers: torch's CUDA_HOME, else /usr/local/cuda; None if neither has them."""
    for candidate in (cpp_extension.CUDA_HOME, "/usr/local/cuda"):
        if candidate and Path(candidate, "include", "cuda_runtime_api.h").is_file():
            return candidate
    return None


def _build_ext_in_place(project: Path, **env: str) -> subprocess.CompletedProcess:
    """``python setup.py build_ext --inplace`` in ``project``, with no GPU visible and ``env`` added."""
    environ = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **env}
    environ.pop("TORCH_CUDA_ARCH_LIST", None)
    return subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=project, env=environ, capture_output=True, text=True, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_wheel_imports_in_a_fresh_virtualenv(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path, ROOT],
        check=True,
    )
    (wheel,) = tmp_path.glob("dpo_fast-*.whl")
    python = _borrowing_venv(tmp_path / "venv")
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", "--no-index", wheel], check=True
    )
    result = subprocess.run([python, "-c", CHECK_WHEEL], capture_output=True, text=True, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


@pytest.mark.slow
def test_editable_install_survives_an_extension_that_does_not_compile(tmp_path):
    """The install command of the README, with the C++ extension failing to compile: it installs without it."""
    project = _copy_project(tmp_path / "project")
    _plant_compile_error(project, "cpu")
    python = _borrowing_venv(tmp_path / "venv")
    install = subprocess.run(
        [python, "-m", "pip", "install", "-v", "--no-deps", "--no-index", "--no-build-isolation", "-e", project],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    log = install.stdout + install.stderr
    assert install.returncode == 0, log[-4000:]
    assert "dpo_fast._cpp was not built" in log, log[-4000:]
    check = subprocess.run([python, "-c", CHECK_EDITABLE, str(project)], capture_output=True, text=True,
                           cwd=tmp_path, check=False)  # fmt: skip
    assert check.returncode == 0, check.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.skipif(torch.version.cuda is None, reason="this torch is a CPU build: setup.py skips the CUDA extension")
@pytest.mark.skipif(_cuda_toolkit() is None, reason="no CUDA toolkit with its headers here")
def test_cuda_extension_builds_for_sm_90_without_a_gpu(tmp_path):
    """Finding 6: a CUDA torch, nvcc, no GPU visible, no TORCH_CUDA_ARCH_LIST: ``_cuda`` is built for sm_90.

    The C++ extension is planted to fail (a minute saved); the build must go on without it.
    """
    project = _copy_project(tmp_path / "project")
    _plant_compile_error(project, "cpu")
    build = _build_ext_in_place(project, CUDA_HOME=_cuda_toolkit())
    log = build.stdout + build.stderr
    assert build.returncode == 0, log[-4000:]
    assert "arch=compute_90,code=sm_90" in log, log[-4000:]
    (module,) = (project / "dpo_fast").glob("_cuda*.so")
    assert not list((project / "dpo_fast").glob("_cpp*.so"))
    load = (
        "import sys, torch, importlib.util as u; s = u.spec_from_file_location('dpo_fast._cuda', sys.argv[1]); "
        "m = u.module_from_spec(s); s.loader.exec_module(m); print(m.build_tag, m.logits_stats, m.logits_grad)"
    )
    loaded = subprocess.run([sys.executable, "-c", load, str(module)], capture_output=True, text=True, check=False)
    assert loaded.returncode == 0, loaded.stderr[-3000:]


@pytest.mark.skipif(torch.version.cuda is None, reason="this torch is a CPU build: setup.py skips the CUDA extension")
def test_an_nvcc_that_torch_refuses_leaves_the_cuda_extension_out(tmp_path):
    """torch refuses nvcc 12 with a CUDA 13 torch before compiling anything: the build goes on without ``_cuda``."""
    toolkit = tmp_path / "cuda-12"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "include").mkdir()
    (toolkit / "include" / "cuda_runtime_api.h").write_text("")
    other_major = 12 if not torch.version.cuda.startswith("12.") else 11
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {other_major}.0, V{other_major}.0.0'\n")
    nvcc.chmod(0o755)
    project = _copy_project(tmp_path / "project")
    _plant_compile_error(project, "cpu")
    build = _build_ext_in_place(project, CUDA_HOME=str(toolkit))
    log = build.stdout + build.stderr
    assert build.returncode == 0, log[-4000:]
    assert "dpo_fast._cuda was not built" in log, log[-4000:]


def test_cuda_skip_reasons_name_what_is_missing(tmp_path):
    setup = _setup_module()
    cpu_torch = types.SimpleNamespace(version=types.SimpleNamespace(cuda=None))
    cuda_torch = types.SimpleNamespace(version=types.SimpleNamespace(cuda="13.0"))
    assert "CPU build" in setup.cuda_skip_reason(cpu_torch, "/usr/local/cuda")
    assert "nvcc was not found" in setup.cuda_skip_reason(cuda_torch, None)
    assert str(tmp_path / "include" / "cuda_runtime_api.h") in setup.cuda_skip_reason(cuda_torch, str(tmp_path))
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime_api.h").write_text("")
    assert setup.cuda_skip_reason(cuda_torch, str(tmp_path)) is None


@pytest.mark.parametrize(
    "gpu_visible, given, expected",
    [(False, None, "9.0"), (False, "8.0", "8.0"), (True, None, None), (False, "", "9.0")],
)
def test_cuda_arch_list_defaults_to_sm_90_when_no_gpu_is_visible(gpu_visible, given, expected):
    setup = _setup_module()
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: gpu_visible))
    environ = {} if given is None else {"TORCH_CUDA_ARCH_LIST": given}
    setup.default_cuda_arch_list(fake_torch, environ)
    assert environ.get("TORCH_CUDA_ARCH_LIST") == expected


def test_declared_minimums_are_the_versions_ci_tests():
    """pyproject.toml's lower bounds for torch, triton, transformers, accelerate and datasets are the
    versions .ci/gpu-stack.txt pins (CI's second job; the GPU machine's stack): declared is tested."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [
        requirement for extra in project["optional-dependencies"].values() for requirement in extra
    ]
    pins = dict(line.split("==") for line in (ROOT / ".ci" / "gpu-stack.txt").read_text().split() if "==" in line)
    for name in ("torch", "triton", "transformers", "accelerate", "datasets"):
        bounds = {requirement.split(">=")[1].split(",")[0] for requirement in requirements
                  if requirement.startswith(f"{name}>=")}  # fmt: skip
        assert bounds, f"pyproject.toml declares no minimum for {name}"
        pinned = pins[name].split(".")
        assert all(pinned[: len(bound.split("."))] == bound.split(".") for bound in bounds), (name, bounds, pins[name])


# From the repository root (first on sys.path under ``python -m pytest``, ``python -c``, a notebook), transformers
# imports Hugging Face's ``kernels`` package (transformers/integrations/hub_kernels.py, reached from TRL, peft and
# TrainingArguments); the repository's Triton sources must never be found under that name. The test extra installs
# ``kernels`` (CI); where it is not installed (the GPU machine's offline stack), ``import kernels`` must find at most
# the repository's bare folder, a namespace without the sources, which transformers does not take for the package.
IMPORT_FROM_ROOT = r"""
import importlib.metadata, sys
from pathlib import Path
root = Path(sys.argv[1])
import transformers.integrations.hub_kernels
from trl import DPOConfig
import kernels, dpo_fast.kernels
try:
    importlib.metadata.distribution("kernels")
except importlib.metadata.PackageNotFoundError:
    assert getattr(kernels, "__file__", None) is None and not hasattr(kernels, "triton"), kernels
else:
    assert Path(kernels.__file__).resolve().parent != (root / "kernels").resolve(), kernels.__file__
assert Path(dpo_fast.kernels.__file__).parent.name in ("triton", "kernels"), dpo_fast.kernels.__file__
assert callable(dpo_fast.kernels.logits_stats) and callable(dpo_fast.kernels.logits_grad)
print("ok", getattr(kernels, "__file__", None), dpo_fast.kernels.__file__)
"""

# Without Hugging Face's ``kernels`` installed, ``import kernels`` from the root finds the repository's folder as a
# namespace portion (a folder without __init__.py); the Triton sources below it must still refuse that name.
SOURCES_UNDER_ANOTHER_NAME = r"""
import importlib, importlib.machinery, importlib.util, sys
spec = importlib.machinery.PathFinder.find_spec("kernels", [sys.argv[1]])
assert spec.loader is None or spec.origin in (None, "namespace"), spec  # a namespace portion, not a regular package
sys.modules["kernels"] = importlib.util.module_from_spec(spec)
for name in ("kernels.triton", "kernels.triton.config", "kernels.triton.logits_stats", "kernels.triton.aot"):
    try:
        importlib.import_module(name)
    except ImportError as error:
        assert "dpo_fast.kernels" in str(error), error
    else:
        raise AssertionError(f"{name} imported")
print("ok")
"""


def test_the_repository_root_does_not_shadow_the_kernels_package_transformers_imports():
    result = subprocess.run([sys.executable, "-c", IMPORT_FROM_ROOT, str(ROOT)], cwd=ROOT, capture_output=True,
                            text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok"), result.stdout


def test_the_test_extra_installs_the_kernels_package():
    """The layout test above runs its full check (transformers importing the real package) only with it."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "kernels" in extras["test"]


def test_the_triton_sources_refuse_to_load_as_the_top_level_kernels():
    result = subprocess.run([sys.executable, "-c", SOURCES_UNDER_ANOTHER_NAME, str(ROOT)], cwd=ROOT,
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
