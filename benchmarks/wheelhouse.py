#!/usr/bin/env python3
"""Download into ``.whl/`` (git-ignored) the wheels an offline GPU machine lacks, to carry there with the checkout.

    python benchmarks/wheelhouse.py                      # the pins below
    python benchmarks/wheelhouse.py verl==0.9.1          # plus (or in place of the pin of) NAME==VERSION
    python benchmarks/wheelhouse.py --machine list.txt   # check the needs against that machine's `pip list`

Run it where there is network, from the checkout. It downloads, with ``pip download --no-deps
--only-binary=:all: --python-version 3.12``, one wheel per pin for CPython on x86-64 Linux (manylinux), rewrites
``.whl/`` to hold exactly those wheels and a copy of ``benchmarks/check_wheels.py``, and checks every wheel's
Requires-Dist against the GPU machine's packages (``check_wheels.py``; exit status 1 when one is not met).

On the GPU machine, from the checkout (``benchmarks/gpu_check.py`` does this as its first step)::

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    python3 .whl/check_wheels.py --installed --import .whl

Only these wheels land in /tmp/site: the machine's torch, triton and transformers stay its own (the script
refuses to carry them).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKER = Path(__file__).resolve().parent / "check_wheels.py"

# What the reference GPU machine (Python 3.12, torch 2.11, triton 3.6, transformers 5.17, huggingface_hub 1.33:
# .ci/gpu-stack.txt) lacks for the tests and the benchmarks, and why each version.
PINS = {
    "trl": "1.16.0",  # the version FastDPOTrainer is tested with; needs transformers>=4.56.2, datasets>=4.7.0
    "liger-kernel": "0.8.5",  # a peer of the benchmarks and an oracle of the objective tests
    "cut-cross-entropy": "25.1.1",  # a peer of the benchmarks
    "datasets": "5.0.1",  # the newest that takes pyarrow>=21 (5.1+ want pyarrow>=24)
    "dill": "0.4.1",  # datasets: dill>=0.3.0,<0.4.2; multiprocess: dill>=0.4.1
    "multiprocess": "0.70.19",  # datasets: multiprocess<0.70.20
    "fsspec": "2026.6.0",  # datasets 5.0.1: fsspec<=2026.6.0 (the machine's own version is not known)
    "kernels": "0.19.1",  # Hugging Face's kernels (the test extra): the newest; needs huggingface-hub>=1.32
    "tomlkit": "0.15.3",  # kernels: tomlkit>=0.13.3
}
# Never carried: the machine's own builds would be shadowed (check_wheels.py refuses them too).
NEVER = re.compile(r"^(torch|triton|transformers|accelerate|huggingface-hub|tokenizers|safetensors|numpy|torchvision"
                   r"|torchaudio|pyarrow|pandas|scipy|jax|jaxlib|cupy-cuda13x|peft|nvidia-.*|cuda-.*)$")  # fmt: skip
# pip matches manylinux_2_N exactly: name every N a current GPU machine's glibc runs.
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]
SIZE_WARNING_MIB = 40  # .whl/ travels with the checkout: leave room for the checkout itself


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins_with(extra: list[str]) -> dict[str, str]:
    """The pins, each ``NAME==VERSION`` of ``extra`` added or replacing the pin of the same name."""
    pins = dict(PINS)
    for arg in extra:
        name, sep, version = arg.partition("==")
        if not sep or not name or not version:
            raise SystemExit(f"wheelhouse: pin each extra package as NAME==VERSION (got {arg!r})")
        if NEVER.match(normalized(name)):
            raise SystemExit(f"wheelhouse: refusing {arg}: the GPU machine has its own {normalized(name)}")
        pins = {key: value for key, value in pins.items() if normalized(key) != normalized(name)}
        pins[name] = version
    return pins


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extra", nargs="*", metavar="NAME==VERSION", help="more pins (replacing a pin of that name)")
    parser.add_argument("--out", type=Path, default=ROOT / ".whl", help="the folder to rewrite (default: .whl)")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default %(default)s)")
    parser.add_argument("--machine", type=Path, help="the GPU machine's `python3 -m pip list --format=freeze` "
                        "output, for the check (default: the reference machine in check_wheels.py)")  # fmt: skip
    parser.add_argument("--no-check", action="store_true", help="skip the Requires-Dist check")
    args = parser.parse_args(argv)
    pins = pins_with(args.extra)
    requirements = [f"{name}=={version}" for name, version in pins.items()]

    with tempfile.TemporaryDirectory() as tmp:
        download = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", args.python_version, "--implementation", "cp",
                    *(arg for platform in PLATFORMS for arg in ("--platform", platform)), "-d", tmp, *requirements]  # fmt: skip
        print(f"wheelhouse: downloading {len(requirements)} wheels for CPython {args.python_version}, manylinux x86-64")
        done = subprocess.run(download, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            noise = "is ignored: it is neither a file nor a directory"
            sys.stderr.write(
                "".join(line + "\n" for line in (done.stdout + done.stderr).splitlines() if noise not in line)
            )
            print(f"wheelhouse: pip download failed; {args.out} left as it was", file=sys.stderr)
            return 1
        wheels = sorted(Path(tmp).glob("*.whl"))
        if len(wheels) != len(requirements):
            print(f"wheelhouse: expected {len(requirements)} wheels, got {[w.name for w in wheels]}; {args.out} left "
                  "as it was", file=sys.stderr)  # fmt: skip
            return 1
        args.out.mkdir(parents=True, exist_ok=True)
        for old in args.out.glob("*.whl"):
            old.unlink()
        for wheel in wheels:
            shutil.move(str(wheel), args.out / wheel.name)
    shutil.copy2(CHECKER, args.out / CHECKER.name)

    total = 0
    for path in sorted(args.out.iterdir()):
        total += path.stat().st_size
        print(f"  {path.stat().st_size / 1024:9.1f} KiB  {path.name}")
    print(f"wheelhouse: {args.out} holds {total / 2**20:.1f} MiB")
    if total > SIZE_WARNING_MIB * 2**20:
        print(f"wheelhouse: WARNING: over {SIZE_WARNING_MIB} MiB to carry with the checkout", file=sys.stderr)

    status = 0
    if not args.no_check:
        check = [sys.executable, str(CHECKER), str(args.out)]
        if args.python_version != "3.12":  # else the reference machine's 3.12.3
            check += ["--python", args.python_version]
        if args.machine:
            check += ["--machine", str(args.machine)]
        done = subprocess.run(check, capture_output=True, text=True, check=False)
        print("".join(line + "\n" for line in done.stdout.splitlines() if not line.startswith("ok ")), end="")
        sys.stderr.write(done.stderr)
        status = done.returncode
        if status:
            print("wheelhouse: a requirement is not met (the FAIL lines)", file=sys.stderr)
    print("\nOn the GPU machine, from the checkout with .whl/ beside it:\n"
          "  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && "
          "export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}\n"
          "  python3 .whl/check_wheels.py --installed --import .whl")  # fmt: skip
    return status


if __name__ == "__main__":
    sys.exit(main())
