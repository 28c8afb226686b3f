"""Finds or builds the C++ and CUDA extensions of ``csrc/``, and says why when it cannot.

Two extensions, one folder of ``csrc/`` each (and the headers at the top of ``csrc/``, which both
include), bound with pybind11 and built with ninja through ``torch.utils.cpp_extension``:

- ``cpp``: ``csrc/cpu/``, the CPU kernel (module ``dpo_fast._cpp`` when built ahead of time);
- ``cuda``: ``csrc/cuda/``, the CUDA row kernels and their host side (``dpo_fast._cuda``).

``load(name)`` takes the module ``setup.py`` built ahead of time when its build tag (a hash of the
sources, the flags and the torch version) matches this installation's sources and torch; otherwise
it builds the extension just in time with ninja, once per process, into torch's extension cache
(``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``), where a later process finds it
built. A stale or foreign build is therefore never used.

This module imports torch only when it builds or loads: ``setup.py`` loads it by path.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

_LOG = logging.getLogger(__name__)
_HOW = "see csrc/README.md for what the build needs"


@dataclass(frozen=True)
class Extension:
    """One extension: its ``csrc/`` folder and how it is compiled."""

    name: str  # the backend's name
    module: str  # the module setup.py builds ahead of time
    folder: str  # under csrc/: every .cpp and .cu file in it is a source
    cflags: tuple[str, ...]
    ldflags: tuple[str, ...] = ()
    cuda_cflags: tuple[str, ...] = ()

    def sources(self, root: Path) -> list[Path]:
        """The files compiled: every .cpp and .cu file of the folder."""
        return sorted(path for path in (root / self.folder).iterdir() if path.suffix in (".cpp", ".cu"))

    def build_tag(self, root: Path, torch_version: str) -> str:
        """A C identifier naming the sources, the headers (the folder's and the shared ones), flags and torch."""
        digest = hashlib.sha256(f"{torch_version} {self.cflags} {self.ldflags} {self.cuda_cflags}".encode())
        shared = sorted(root.glob("*.h"))  # csrc/common.h: included by both extensions
        own = sorted(path for path in (root / self.folder).iterdir() if path.suffix in (".cpp", ".cu", ".h", ".cuh"))
        for path in (*shared, *own):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
        return "tag" + digest.hexdigest()[:16]

    def compile_args(self, root: Path, torch_version: str) -> dict[str, list[str]]:
        tag = f"-DDPO_FAST_BUILD_TAG={self.build_tag(root, torch_version)}"
        return {"cxx": [*self.cflags, tag], "nvcc": [*self.cuda_cflags, tag]}


EXTENSIONS = {
    # -g0: no debug information (Python's own CFLAGS ask for it, and it doubles the build time).
    # -fopenmp: at::parallel_for is OpenMP code compiled into the extension (torch's own libgomp runs it).
    # -fno-tree-pre: GCC's partial redundancy elimination splits the clamped exp of row_math.h into
    # branches, and the row loops then stay scalar (3x slower).
    "cpp": Extension(
        "cpp", "dpo_fast._cpp", "cpu", cflags=("-O3", "-g0", "-fopenmp", "-fno-tree-pre"), ldflags=("-fopenmp",)
    ),
    "cuda": Extension("cuda", "dpo_fast._cuda", "cuda", cflags=("-O3", "-g0"), cuda_cflags=("-O3",)),
}


class BuildError(RuntimeError):
    """The extension cannot be had here; the message says why and how to get it."""


def sources_root() -> Path | None:
    """``csrc/``: packaged beside this file (``dpo_fast/csrc`` in a wheel), or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parent / "csrc"):
        if candidate.is_dir():
            return candidate
    return None


def load(name: str) -> ModuleType:
    """The extension module of backend ``name`` (``cpp`` or ``cuda``), built just in time if needed.

    Raises:
        BuildError: it cannot be built here; the message says why and how to get it.
    """
    module = _load(name)
    if isinstance(module, str):
        raise BuildError(module)
    return module


def unavailable_reason(name: str) -> str | None:
    """Why the extension of ``name`` cannot be had here (building it if needed), or None."""
    module = _load(name)
    return module if isinstance(module, str) else None


def is_built(name: str) -> bool:
    """Whether the extension is ready without compiling: built ahead of time, or loaded in this process."""
    return _prebuilt(name) is not None or isinstance(_RESULTS.get(name), ModuleType)


_RESULTS: dict[str, ModuleType | str] = {}


def _load(name: str) -> ModuleType | str:
    """The module, or the reason it cannot be had (a failed build is not retried in this process)."""
    if name not in _RESULTS:
        _RESULTS[name] = _prebuilt(name) or _build_just_in_time(EXTENSIONS[name])
    return _RESULTS[name]


@functools.cache
def _prebuilt(name: str) -> ModuleType | None:
    """The ahead-of-time module when it exists, imports, and was built from these sources for this torch."""
    import torch

    extension = EXTENSIONS[name]
    try:
        module = importlib.import_module(extension.module)
    except ImportError:
        return None
    root = sources_root()
    if root is not None and module.build_tag != extension.build_tag(root, torch.__version__):
        _LOG.info("dpo_fast: %s was built from other sources or another torch; rebuilding", extension.module)
        return None
    return module


def _missing_tools(extension: Extension) -> str | None:
    import torch
    from torch.utils import cpp_extension

    if extension.name == "cuda":
        if torch.version.cuda is None:
            return "this PyTorch is a CPU build (torch.version.cuda is None); install a CUDA build of PyTorch"
        if cpp_extension.CUDA_HOME is None:
            return "nvcc was not found; install the CUDA toolkit or set CUDA_HOME to it"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed; pip install ninja"
    return None


def _build_just_in_time(extension: Extension) -> ModuleType | str:
    import torch
    from torch.utils import cpp_extension

    root = sources_root()
    if root is None:
        return f"the extension was not built at install and its sources (csrc/) are not installed; {_HOW}"
    missing = _missing_tools(extension)
    if missing is not None:
        return f"its extension is not built and cannot be built here: {missing}"
    _LOG.warning("dpo_fast: the %s extension was not built at install: building csrc/%s with ninja "
                 "(or loading torch's cached build of it)", extension.name, extension.folder)  # fmt: skip
    args = extension.compile_args(root, torch.__version__)
    try:
        return cpp_extension.load(
            name=f"dpo_fast_{extension.name}", sources=[str(path) for path in extension.sources(root)],
            extra_cflags=args["cxx"], extra_cuda_cflags=args["nvcc"], extra_ldflags=list(extension.ldflags),
        )  # fmt: skip
    except Exception as error:  # noqa: BLE001 (a compiler's error: report it, the backend is then unavailable)
        return f"building its extension (csrc/{extension.folder}) failed: {str(error)[-3000:]}; {_HOW}"
