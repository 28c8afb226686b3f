"""Packaging: ``dpo_fast``, ``kernels/triton/`` as ``dpo_fast.kernels``, ``csrc/`` as ``dpo_fast/csrc``
(the sources of the just-in-time build), and the C++/CUDA extensions built ahead of time when possible.

The extensions (``dpo_fast._cpp``; ``dpo_fast._cuda`` with a CUDA build of torch, nvcc and the CUDA
headers) are built here only when torch is importable in the build environment, that is with
``pip install --no-build-isolation``: pip's isolated build would fetch a second torch to build
against. A skipped or failed build never fails the install: the extension is then left out of it,
and dpo_fast builds it just in time on first use (``dpo_fast/_build.py``, which also holds the
sources and flags used here). With no GPU visible (a Docker build stage, a login node) the CUDA
extension is built for the H100/H200 (``TORCH_CUDA_ARCH_LIST=9.0``) unless ``TORCH_CUDA_ARCH_LIST``
says otherwise.
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
# torch finds no architecture to build for when no GPU is visible ("list index out of range")
CUDA_ARCH_LIST_WITHOUT_GPU = "9.0"


def _build_module():
    """``dpo_fast/_build.py`` by path: importing the package would need torch."""
    spec = importlib.util.spec_from_file_location("_dpo_fast_build", ROOT / "dpo_fast" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _say(message: str) -> None:
    print(f"dpo_fast: {message}", file=sys.stderr)


def cuda_skip_reason(torch, cuda_home: str | None) -> str | None:
    """Why the CUDA extension cannot be built ahead of time here, or None.

    Args:
        torch: the torch module of the build environment.
        cuda_home: ``torch.utils.cpp_extension.CUDA_HOME``, the toolkit torch found (None: no nvcc).
    """
    if torch.version.cuda is None:
        return "this torch is a CPU build"
    if cuda_home is None:
        return "nvcc was not found (install the CUDA toolkit or set CUDA_HOME to it)"
    header = Path(cuda_home, "include", "cuda_runtime_api.h")
    if not header.is_file():
        return f"the CUDA headers are missing ({header}; set CUDA_HOME to the CUDA toolkit's folder)"
    return None


def default_cuda_arch_list(torch, environ=os.environ) -> None:
    """Sets ``TORCH_CUDA_ARCH_LIST`` to sm_90 (H100/H200) when it is unset and no GPU is visible."""
    if not environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        environ["TORCH_CUDA_ARCH_LIST"] = CUDA_ARCH_LIST_WITHOUT_GPU
        _say(f"no GPU visible: building the CUDA extension for TORCH_CUDA_ARCH_LIST={CUDA_ARCH_LIST_WITHOUT_GPU}")


def optional_build_ext(base: type, objects: Path) -> type:
    """A ``build_ext`` command on ``base`` that never fails the install for an extension it cannot build.

    An extension that fails to compile or link, or that torch's checks refuse before any compiling
    (e.g. nvcc's CUDA version against torch's), is left out of the command's extensions, so that
    neither an editable install (which copies each built module into the source tree) nor a wheel
    looks for it; dpo_fast builds it just in time on first use.

    Args:
        base: the command to extend (``torch.utils.cpp_extension.BuildExtension``).
        objects: the object folder (ninja recompiles only what changed since the last build).
    """

    class OptionalBuildExtension(base):
        def finalize_options(self):
            super().finalize_options()
            # One object folder for editable installs and wheels alike (an editable install would
            # otherwise compile in a temporary one).
            self.build_temp = str(objects)

        def build_extensions(self):
            self.skipped = []
            try:
                super().build_extensions()
            except Exception as error:  # refused before any compiling: leave the CUDA extensions out
                cuda = [ext for ext in self.extensions if any(str(source).endswith(".cu") for source in ext.sources)]
                if not cuda or self.skipped:
                    raise
                for ext in cuda:
                    self._skip(ext, error)
                self.extensions = [ext for ext in self.extensions if ext not in cuda]
                super().build_extensions()
            self.extensions = [ext for ext in self.extensions if ext not in self.skipped]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # noqa: BLE001 (a compiler's error must not fail the install)
                self._skip(ext, error)

        def _skip(self, ext, error: Exception) -> None:
            self.skipped.append(ext)
            self.warn(f"dpo_fast: {ext.name} was not built ({error}); it will be built just in time on first use")

    return OptionalBuildExtension


def _extensions():
    """(ext_modules, cmdclass) for what this build environment can compile ahead of time."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    build = _build_module()
    csrc = ROOT / "csrc"
    extensions = []
    for extension in build.EXTENSIONS.values():
        if extension.name == "cuda":
            reason = cuda_skip_reason(torch, cpp_extension.CUDA_HOME)
            if reason is not None:
                _say(f"the CUDA extension is not built ahead of time: {reason}")
                continue
            default_cuda_arch_list(torch)
            make = cpp_extension.CUDAExtension
        else:
            make = cpp_extension.CppExtension
        extensions.append(make(
            extension.module, [str(path.relative_to(ROOT)) for path in extension.sources(csrc)],
            extra_compile_args=extension.compile_args(csrc, torch.__version__),
            extra_link_args=list(extension.ldflags),
        ))  # fmt: skip
    return extensions, {"build_ext": optional_build_ext(cpp_extension.BuildExtension, ROOT / "build" / "objects")}


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__; tests import its functions
    ext_modules, cmdclass = _extensions()
    setup(
        packages=[
            "dpo_fast",
            "dpo_fast.backends",
            "dpo_fast.csrc",
            "dpo_fast.csrc.cpu",
            "dpo_fast.csrc.cuda",
            "dpo_fast.integrations",
            "dpo_fast.kernels",
            "dpo_fast.objectives",
            "dpo_fast.trainer",
            "dpo_fast.trainer.default",
        ],
        package_dir={"dpo_fast.kernels": "kernels/triton", "dpo_fast.csrc": "csrc"},
        package_data={
            "dpo_fast.csrc": ["*.md", "*.h"],
            "dpo_fast.csrc.cpu": ["*.cpp", "*.h"],
            "dpo_fast.csrc.cuda": ["*.cpp", "*.cu", "*.cuh", "*.h"],
            "dpo_fast.trainer.default": ["*.json", "*.jsonl", "*.yaml", "tokenizer/*"],
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
