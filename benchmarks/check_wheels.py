#!/usr/bin/env python3
"""Check that the wheels in a folder (default ``.whl``) can run together on an offline GPU machine.

Every wheel's Requires-Dist that applies there (markers evaluated for the machine's Python; an extra's needs only
where another requirement asks for that extra) must be met by another wheel in the folder or by a package the
machine has.

    python benchmarks/check_wheels.py [DIR]                      # against MACHINE below (the stack CI's second
                                                                 # job tests, .ci/gpu-stack.txt), Python 3.12
    python benchmarks/check_wheels.py --machine list.txt [DIR]   # against another machine's package list:
                                                                 # `python3 -m pip list --format=freeze` run there
    python3 .whl/check_wheels.py --installed --import .whl       # on the GPU machine itself, after the install

A package the list names without a version counts as "version not known" (not a pass) where a version range is
asked for. Exit status 1 when a need is missing or out of range, a name appears twice, a wheel would shadow the
machine's own torch stack, or an import fails. Standard library and ``packaging`` only, so that
``benchmarks/wheelhouse.py`` can copy it into ``.whl/`` to run on the GPU machine.
"""

from __future__ import annotations

import argparse
import email.parser
import importlib
import importlib.metadata as metadata
import pathlib
import sys
import zipfile

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

# The reference GPU machine (one H100 or H200, no network): Python 3.12.3 and these versions from its `pip list`;
# MACHINE_NAMES are the other packages of its image, versions not given.
MACHINE_PYTHON = "3.12.3"
MACHINE_VERSIONS = {
    "accelerate": "1.15.0", "botorch": "0.18.1", "cupy-cuda13x": "14.2.0", "gpytorch": "1.15.2",
    "huggingface-hub": "1.33.0", "jax": "0.11.2", "jax-cuda13-pjrt": "0.11.2", "jax-cuda13-plugin": "0.11.2",
    "jaxlib": "0.11.2", "jaxtyping": "0.3.11", "numpy": "2.5.2", "numpyro": "0.21.0", "onnx": "1.23.1",
    "onnx-ir": "1.0.0", "onnxruntime": "1.30.0", "onnxscript": "0.7.2", "pytorch-lightning": "2.6.6",
    "safetensors": "0.8.0", "sentence-transformers": "6.0.1", "sentencepiece": "0.2.2", "tiktoken": "0.14.0",
    "tokenizers": "0.23.2", "torch": "2.11.0", "torch-geometric": "2.8.0.post1", "torchaudio": "2.11.0",
    "torchdiffeq": "0.2.5", "torchmetrics": "1.9.0", "torchvision": "0.26.0", "transformers": "5.17.0",
    "triton": "3.6.0",
}  # fmt: skip
MACHINE_NAMES = set(
    """
absl-py aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs build certifi charset-normalizer chex
click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cycler
cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
grpcio h11 h5py hf-xet httpcore httpx humanize hypothesis idna imageio iniconfig interface-meta jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py
markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions
nanobind narwhals networkx ninja numba numba-cuda nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx
opencv-python-headless opt-einsum opt-einsum-fx optax optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil py-cpuinfo pyarrow pybind11 pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pyyaml regex requests rich sacrebleu scikit-build-core scikit-image scikit-learn scipy seaborn
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile timm toolz tqdm treescope typer typing-extensions
typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()
)

# A wheel of these would be found ahead of the machine's own build of its stack.
NEVER_CARRY = {"torch", "triton", "transformers", "accelerate", "huggingface-hub", "tokenizers", "safetensors",
               "numpy", "torchvision", "torchaudio", "pyarrow", "pandas", "scipy", "jax", "jaxlib", "cupy-cuda13x",
               "peft"}  # fmt: skip
NEVER_CARRY_PREFIXES = ("nvidia-", "cuda-")

# Names to import with --import beyond each wheel's top-level modules ("module:attribute").
PROBES = {
    "trl": ["trl:DPOTrainer", "trl:DPOConfig"],
    "liger-kernel": ["liger_kernel.chunked_loss:LigerFusedLinearDPOLoss"],
    "cut-cross-entropy": ["cut_cross_entropy:linear_cross_entropy"],
    "datasets": ["datasets:Dataset"],
    "kernels": ["kernels:get_kernel"],
}


class Wheel:
    """A wheel's name, version, Requires-Python, Requires-Dist and top-level modules, read from its METADATA."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            meta = [n for n in names if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
            if len(meta) != 1:
                raise SystemExit(f"{path.name}: expected one .dist-info/METADATA, found {len(meta)}")
            message = email.parser.Parser().parsestr(archive.read(meta[0]).decode("utf-8"))
            top_level = meta[0].split("/")[0] + "/top_level.txt"
            if top_level in names:
                self.modules = archive.read(top_level).decode().split()
            else:
                self.modules = sorted({n.split("/")[0].removesuffix(".py") for n in names
                                       if not n.split("/")[0].endswith((".dist-info", ".data"))
                                       and (n.endswith(".py") or "/" in n)})  # fmt: skip
        self.name = canonicalize_name(message["Name"])
        self.version = Version(message["Version"])
        self.requires_python = SpecifierSet(message.get("Requires-Python") or "")
        self.requires = [Requirement(r) for r in message.get_all("Requires-Dist") or []]


def read_machine(path: pathlib.Path) -> tuple[dict[str, str], set[str]]:
    """``{name: version}`` and the bare names of a package list (``pip list --format=freeze`` lines)."""
    versions, names = {}, set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, version = line.partition("==")
        if version:
            versions[canonicalize_name(name)] = version.strip()
        else:
            names.add(canonicalize_name(name))
    return versions, names


def applies(req: Requirement, env: dict, extras: set[str]) -> bool:
    return req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in {""} | extras)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", default=".whl")
    parser.add_argument("--installed", action="store_true", help="check against what this Python finds (run on the "
                        "GPU machine, after the install)")  # fmt: skip
    parser.add_argument("--machine", type=pathlib.Path, help="the GPU machine's `pip list --format=freeze` output "
                        "(default: the reference machine written in this script)")  # fmt: skip
    parser.add_argument("--python", default=MACHINE_PYTHON, help="the GPU machine's Python (default %(default)s)")
    parser.add_argument("--import", dest="do_import", action="store_true", help="also import each wheel's modules")
    args = parser.parse_args(argv)

    paths = sorted(pathlib.Path(args.dir).glob("*.whl"))
    if not paths:
        print(f"no wheels in {args.dir}")
        return 1
    versions, names = read_machine(args.machine) if args.machine else (MACHINE_VERSIONS, MACHINE_NAMES)
    wheels: dict[str, Wheel] = {}
    bad = unknown = good = 0
    for path in paths:
        wheel = Wheel(path)
        if wheel.name in wheels:
            print(f"FAIL  two versions of {wheel.name}: {wheels[wheel.name].path.name} and {path.name}")
            bad += 1
        if wheel.name in NEVER_CARRY or wheel.name.startswith(NEVER_CARRY_PREFIXES):
            print(f"FAIL  {path.name} would shadow the GPU machine's own {wheel.name}: remove it")
            bad += 1
        wheels[wheel.name] = wheel

    if args.installed:
        env = default_environment()
        python = env["python_full_version"]
    else:
        python = args.python
        env = {**default_environment(), "python_version": ".".join(python.split(".")[:2]),
               "python_full_version": python, "implementation_version": python, "implementation_name": "cpython",
               "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
               "platform_machine": "x86_64", "os_name": "posix"}  # fmt: skip
    where = "the distributions installed here" if args.installed else f"{args.machine or 'the reference machine'}"
    print(f"checking {len(wheels)} wheels in {args.dir} against {where}, Python {python}")

    def installed(name: str) -> Version | None:
        try:
            return Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            return None

    if args.installed:  # the install must have put each wheel's own version first on sys.path
        for wheel in wheels.values():
            if installed(wheel.name) != wheel.version:
                print(f"FAIL  {wheel.path.name}: Python finds {wheel.name} {installed(wheel.name)}; is the install "
                      "folder first on PYTHONPATH?")  # fmt: skip
                bad += 1

    todo = [(name, set()) for name in wheels]  # (distribution, extras asked of it)
    seen: set[tuple[str, str]] = set()
    while todo:
        name, extras = todo.pop()
        if name in wheels:
            wheel = wheels[name]
            if not wheel.requires_python.contains(python, prereleases=True):
                print(f"FAIL  {wheel.path.name} needs Python {wheel.requires_python}")
                bad += 1
            needs = [r for r in wheel.requires if applies(r, env, extras)]
            owner = f"{wheel.name} {wheel.version}"
        else:  # a machine package asked for extras: only the extras' own needs are ours to check
            try:
                raw = [Requirement(r) for r in metadata.requires(name) or []]
            except metadata.PackageNotFoundError:
                raw = []
            needs = [r for r in raw if r.marker is not None and applies(r, env, extras)
                     and not r.marker.evaluate({**env, "extra": ""})]  # fmt: skip
            owner = f"{name}[{','.join(sorted(extras))}]"
        for req in needs:
            if (owner, str(req)) in seen:
                continue
            seen.add((owner, str(req)))
            dep = canonicalize_name(req.name)
            if dep in wheels:
                have, source = wheels[dep].version, "wheel"
            elif args.installed:
                have, source = installed(dep), "installed"
            elif dep in versions:
                have, source = Version(versions[dep]), "GPU machine"
            else:
                have, source = None, "GPU machine" if dep in names else None
            if source is None or (args.installed and have is None):
                print(f"FAIL  {owner} needs {req}: missing")
                bad += 1
                continue
            if have is None and str(req.specifier):
                print(f"????  {owner} needs {req}: on the GPU machine, version not known")
                unknown += 1
            elif have is None or req.specifier.contains(have, prereleases=True):
                print(f"ok    {owner} needs {req}: {source} {have or '(any version)'}")
                good += 1
            else:
                print(f"FAIL  {owner} needs {req}: {source} has {have}")
                bad += 1
            if req.extras:
                if dep in wheels or args.installed:
                    todo.append((dep, set(req.extras)))
                else:
                    print(f"????  {owner} needs {dep}[{','.join(sorted(req.extras))}]: the extra's needs are not in "
                          "a package list")  # fmt: skip
                    unknown += 1

    if args.do_import:
        for wheel in wheels.values():
            for target in [m for m in wheel.modules if m and not m.startswith("_")] + PROBES.get(wheel.name, []):
                module, _, attribute = target.partition(":")
                try:
                    found = importlib.import_module(module)
                    if attribute:
                        getattr(found, attribute)
                    print(f"ok    import {target}" + ("" if attribute else f"  ({getattr(found, '__file__', '')})"))
                    good += 1
                except Exception as error:  # every failure with its causes, then go on
                    chain = [error]
                    while chain[-1].__cause__ is not None and len(chain) < 5:
                        chain.append(chain[-1].__cause__)
                    why = " <- ".join(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}" for e in chain)
                    print(f"FAIL  import {target}: {why}")
                    bad += 1

    print(f"{good} ok, {unknown} version not known, {bad} failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
