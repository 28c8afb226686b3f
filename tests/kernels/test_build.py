"""Finding and building the extensions: reasons that say why and how, stale builds, what ``auto`` picks."""

import shutil
import subprocess
import sys
import sysconfig
import types

import pytest
import torch
from helpers import Case
from torch.utils import cpp_extension

import dpo_fast
from dpo_fast import _build, backends

CPU = torch.device("cpu")
BATCH = Case(pairs=1, length=3, hidden_dim=4, vocab=6, dtype=torch.float32, bias=False, softcap=None, packed=False,
             seed=0).build("cpu")  # fmt: skip


@pytest.fixture
def fresh_build(monkeypatch):
    """``_build`` with nothing loaded or built yet in this process, and no ahead-of-time module."""
    monkeypatch.setattr(_build, "_RESULTS", {})
    monkeypatch.setattr(_build, "_prebuilt", lambda name: None)


def test_a_backend_that_cannot_be_built_is_refused_with_the_reason(monkeypatch):
    monkeypatch.setitem(_build._RESULTS, "cpp", "its extension is not built and cannot be built here: because")
    with pytest.raises(ValueError, match="backend='cpp' cannot run here: its extension .* because"):
        dpo_fast.fused_linear_dpo_loss(BATCH["hidden"], BATCH["weight"], BATCH["labels"], reference_free=True,
                                       backend="cpp")  # fmt: skip


def test_missing_sources_say_how_to_get_them(fresh_build, monkeypatch):
    monkeypatch.setattr(_build, "sources_root", lambda: None)
    assert "csrc/README.md" in _build.unavailable_reason("cpp")
    with pytest.raises(_build.BuildError, match="sources"):
        _build.load("cpp")


def test_missing_ninja_says_pip_install_ninja(fresh_build, monkeypatch):
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    assert "pip install ninja" in _build.unavailable_reason("cpp")


@pytest.mark.skipif(torch.version.cuda is not None, reason="this torch has CUDA")
def test_cuda_extension_on_a_cpu_torch_says_install_a_cuda_torch(fresh_build):
    assert "CUDA build of PyTorch" in _build.unavailable_reason("cuda")


def test_backends_refuse_the_other_device():
    assert "CUDA tensors" in backends.get("cpp").unavailable_reason(torch.device("cuda"), torch.float32)
    assert "backend='cpp'" in backends.get("cuda").unavailable_reason(CPU, torch.float32)
    assert "float64" in backends.get("cuda").unavailable_reason(torch.device("cuda"), torch.float64)


@pytest.mark.parametrize("built, expected", [(True, "cpp"), (False, "torch")])
def test_auto_picks_cpp_on_cpu_only_when_built(monkeypatch, built, expected):
    monkeypatch.setattr(backends.get("cpp"), "is_built", lambda: built)
    assert backends.resolve("auto", CPU, torch.float32) == expected


def test_a_stale_ahead_of_time_module_is_not_used(monkeypatch):
    tag = _build.EXTENSIONS["cpp"].build_tag(_build.sources_root(), torch.__version__)
    for module_tag, used in ((tag, True), ("tag_from_other_sources", False)):
        module = types.SimpleNamespace(build_tag=module_tag)
        monkeypatch.setitem(sys.modules, _build.EXTENSIONS["cpp"].module, module)
        assert (_build._prebuilt.__wrapped__("cpp") is module) == used


def test_build_tag_follows_sources_flags_and_torch(tmp_path):
    extension = _build.EXTENSIONS["cpp"]
    (tmp_path / "cpu").mkdir()
    source = tmp_path / "cpu" / "kernel.cpp"
    source.write_text("int f() { return 0; }\n")
    tag = extension.build_tag(tmp_path, "2.13.0")
    assert tag.isidentifier() and tag == extension.build_tag(tmp_path, "2.13.0")
    assert tag != extension.build_tag(tmp_path, "2.14.0")
    assert tag != _build.Extension(**{**extension.__dict__, "cflags": ("-O2",)}).build_tag(tmp_path, "2.13.0")
    source.write_text("int f() { return 1; }\n")
    assert tag != extension.build_tag(tmp_path, "2.13.0")


def test_build_tag_follows_the_shared_headers(tmp_path):
    """csrc/common.h, included by both extensions, is part of each one's tag."""
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "kernel.cpp").write_text('#include "../common.h"\n')
    header = tmp_path / "common.h"
    header.write_text("#pragma once\n")
    tag = _build.EXTENSIONS["cpp"].build_tag(tmp_path, "2.13.0")
    header.write_text("#pragma once\nint checked();\n")
    assert tag != _build.EXTENSIONS["cpp"].build_tag(tmp_path, "2.13.0")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc here")
def test_cuda_host_side_compiles_without_torch_cuda_headers(tmp_path):
    """csrc/cuda/bindings.cpp needs only torch's CPU headers and the CUDA runtime's, so it compiles here too.

    nvcc hands a .cpp file to the host compiler with the CUDA include path. (.ci/run compiles the
    .cu files; linking the extension needs a CUDA build of torch, running it a GPU.)
    """
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    command = [
        "nvcc", "-std=c++20", "-Xcompiler=-fsyntax-only,-Wall,-Werror", "-DTORCH_EXTENSION_NAME=dpo_fast_cuda",
        "-DTORCH_API_INCLUDE_EXTENSION_H", *(f"-isystem={path}" for path in includes), "-c",
        str(_build.sources_root() / "cuda" / "bindings.cpp"), "-o", str(tmp_path / "bindings.o"),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
