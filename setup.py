"""Packaging: ``dpo_fast``, the top-level ``kernels/`` as ``dpo_fast.kernels``, ``csrc/`` as ``dpo_fast/csrc``
(the sources of the just-in-time build), and the C++/CUDA extensions built ahead of time when possible.

The extensions (``dpo_fast._cpp``; ``dpo_fast._cuda`` with a CUDA build of torch and nvcc) are built
here only when torch is importable in the build environment, that is with
``pip install --no-build-isolation``: pip's isolated build would fetch a second torch to build
against. A skipped or failed build never fails the install; dpo_fast then builds the extension just
in time on first use (``dpo_fast/_build.py``, which also holds the sources and flags used here).
"""

import importlib.util
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _build_module():
    """``dpo_fast/_build.py`` by path: importing the package would need torch."""
    spec = importlib.util.spec_from_file_location("_dpo_fast_build", ROOT / "dpo_fast" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


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
            if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
                continue
            make = cpp_extension.CUDAExtension
        else:
            make = cpp_extension.CppExtension
        extensions.append(make(
            extension.module, [str(path.relative_to(ROOT)) for path in extension.sources(csrc)],
            extra_compile_args=extension.compile_args(csrc, torch.__version__),
            extra_link_args=list(extension.ldflags),
        ))  # fmt: skip

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """Builds each extension it can; one that fails is left to the just-in-time build."""

        def finalize_options(self):
            super().finalize_options()
            # One object folder for editable installs and wheels alike (an editable install would
            # otherwise compile in a temporary one): ninja recompiles only what changed since.
            self.build_temp = str(ROOT / "build" / "objects")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # a compiler's error must not fail the install
                self.warn(f"dpo_fast: {ext.name} was not built ({error}); it will be built just in time on first use")

    return extensions, {"build_ext": OptionalBuildExtension}


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
        "dpo_fast.trainer",
        "dpo_fast.trainer.default",
    ],
    package_dir={"dpo_fast.kernels": "kernels", "dpo_fast.csrc": "csrc"},
    package_data={
        "dpo_fast.csrc": ["*.md", "*.h"],
        "dpo_fast.csrc.cpu": ["*.cpp", "*.h"],
        "dpo_fast.csrc.cuda": ["*.cpp", "*.cu", "*.cuh", "*.h"],
        "dpo_fast.trainer.default": ["*.json", "*.jsonl", "*.yaml", "tokenizer/*"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
