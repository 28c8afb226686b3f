"""Ahead-of-time compile of every kernel variant the launchers can pick, for a GPU target, without a GPU.

A variant is a kernel (``logits_stats``, ``logits_grad``), an operand dtype (bf16, fp16, fp32), a
float32 precision ("ieee", "tf32") and a combination of the kernel's flags, each normalized as the
launcher normalizes it (``flags()`` of the kernel's module), compiled with exactly the tiles, warps
and stages of ``config.gpu_config``. Arguments are specialized as for the common launch: 16-byte
aligned pointers, H, V and strides divisible by 16. Each compile goes through ``triton.compile``
(``ASTSource``, ``GPUTarget``) and the ``ptxas`` shipped in the triton wheel; registers and the
stack frame (where spills go) are read from the cubin with the wheel's ``cuobjdump``, shared
memory from the compiled kernel's metadata. Triton's compile cache makes a repeated run quick.

    python -m dpo_fast.kernels.aot [--arch 90] [--jobs 2] [--json out.json]

prints one row per variant (the table of ``kernels/README.md``). Run it without
``TRITON_INTERPRET=1``: under the interpreter ``@triton.jit`` gives functions that cannot be compiled.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

from . import config
from .logits_grad import flags as grad_flags
from .logits_grad import logits_grad_kernel
from .logits_stats import flags as stats_flags
from .logits_stats import logits_stats_kernel

# sm_90: shared memory a block may use (227 KiB), per SM (228 KiB, 1 KiB of it reserved per block),
# registers per SM, allocated per warp in units of 256, and the warp and block limits per SM
SMEM_PER_BLOCK = 227 * 1024
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
REGISTERS_PER_SM = 65536
REGISTER_UNIT_PER_WARP = 256
WARPS_PER_SM = 64
BLOCKS_PER_SM = 32

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (dtype, precision) pairs a launch can pick: float32 operands in either precision
PRECISIONS = (("bf16", "ieee"), ("fp16", "ieee"), ("fp32", "ieee"), ("fp32", "tf32"))
KERNELS = {
    "logits_stats": (logits_stats_kernel, stats_flags),
    "logits_grad": (logits_grad_kernel, grad_flags),
}
# pointer arguments holding the operands' dtype; the others hold int64 indices or float32 values
_OPERAND_POINTERS = {"hidden_ptr", "weight_ptr", "bias_ptr", "grad_ptr"}
_INDEX_POINTERS = {"rows_ptr", "targets_ptr"}
_FLOAT_SCALARS = {"softcap", "inv_temperature"}
_DIVISIBLE_INTS = {"vocab", "hidden_dim", "vocab_per_split"}


@dataclasses.dataclass(frozen=True)
class Variant:
    kernel: str
    dtype: str
    precision: str
    flags: tuple[tuple[str, bool], ...]

    @property
    def launch(self) -> config.LaunchConfig:
        return config.gpu_config(self.kernel, DTYPES[self.dtype], self.precision, dict(self.flags))

    @property
    def name(self) -> str:
        on = [name for name, value in self.flags if value] or ["plain"]
        return f"{self.kernel} {self.dtype} {self.launch.input_precision} {'+'.join(on)}"


def variants() -> list[Variant]:
    """Every distinct variant the launchers can pick, in a stable order."""
    seen: dict[tuple, Variant] = {}
    for kernel, (_, make_flags) in KERNELS.items():
        for dtype, precision in PRECISIONS:
            for switches in itertools.product((False, True), repeat=4):
                flags = tuple(make_flags(*switches).items())
                variant = Variant(kernel, dtype, precision, flags)
                seen.setdefault((kernel, dtype, flags, variant.launch), variant)
    return list(seen.values())


def _signature(fn, dtype: str, constexprs: dict) -> tuple[dict, dict]:
    """Argument types and divisibility attributes, as the launcher's arguments specialize."""
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            element = dtype if name in _OPERAND_POINTERS else "i64" if name in _INDEX_POINTERS else "fp32"
            signature[name] = f"*{element}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in _DIVISIBLE_INTS or name.startswith("stride_"):
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _resource_usage(cubin: bytes) -> dict:
    from triton.backends import nvidia

    cuobjdump = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run(
            [cuobjdump, "--dump-resource-usage", file.name], capture_output=True, text=True, check=True
        ).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", report)
    if usage is None:
        raise RuntimeError(f"no resource usage in cuobjdump's report:\n{report}")
    return dict(zip(("registers", "stack_bytes", "static_shared_bytes", "local_bytes"), map(int, usage.groups())))


def blocks_per_sm(registers: int, num_warps: int, shared_bytes: int) -> int:
    """Resident blocks per sm_90 SM, limited by registers, warps, blocks and shared memory."""
    registers_per_warp = -(-registers * 32 // REGISTER_UNIT_PER_WARP) * REGISTER_UNIT_PER_WARP
    by_registers = REGISTERS_PER_SM // (registers_per_warp * num_warps)
    by_shared = SMEM_PER_SM // (shared_bytes + SMEM_RESERVED_PER_BLOCK)
    return min(by_registers, WARPS_PER_SM // num_warps, BLOCKS_PER_SM, by_shared)


def compile_variant(variant: Variant, arch: int = 90) -> dict:
    """Compile one variant for ``cuda`` sm_``arch``; its launch config and resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, _ = KERNELS[variant.kernel]
    launch = variant.launch
    constexprs = {**dict(variant.flags), **launch.constexprs()}
    signature, attrs = _signature(fn, variant.dtype, constexprs)
    started = time.perf_counter()
    compiled = triton.compile(
        ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=launch.options()
    )
    usage = _resource_usage(compiled.asm["cubin"])
    shared = compiled.metadata.shared + usage["static_shared_bytes"]
    return {
        "variant": variant.name,
        "kernel": variant.kernel,
        "dtype": variant.dtype,
        "precision": launch.input_precision,
        "flags": dict(variant.flags),
        "tile": f"{launch.block_n}x{launch.block_v}x{launch.block_k}",
        "num_warps": launch.num_warps,
        "num_stages": launch.num_stages,
        "registers": usage["registers"],
        "spill_bytes": usage["stack_bytes"] + usage["local_bytes"],
        "shared_bytes": shared,
        "blocks_per_sm": blocks_per_sm(usage["registers"], launch.num_warps, shared),
        "seconds": round(time.perf_counter() - started, 2),
    }


def compile_all(arch: int = 90, jobs: int = 1) -> list[dict]:
    """Compile every variant (``jobs`` processes), in the order of ``variants()``."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("kernels.aot compiles for a GPU: run it without TRITON_INTERPRET=1")
    todo = variants()
    if jobs <= 1:
        return [compile_variant(variant, arch) for variant in todo]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        return list(pool.map(compile_variant, todo, itertools.repeat(arch)))


def table(results: list[dict]) -> str:
    """A markdown table of the results."""
    columns = ("kernel", "dtype", "precision", "flags", "tile NxVxK", "warps", "stages", "registers", "spills (B)")
    columns += ("smem (KiB)", "blocks/SM")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in results:
        flags = ", ".join(name for name, value in row["flags"].items() if value) or "-"
        lines.append(
            f"| {row['kernel']} | {row['dtype']} | {row['precision']} | {flags} | {row['tile']} | {row['num_warps']} "
            f"| {row['num_stages']} | {row['registers']} | {row['spill_bytes']} | {row['shared_bytes'] / 1024:.0f} "
            f"| {row['blocks_per_sm']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for sm_90")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = compile_all(args.arch, args.jobs)
    print(table(results))
    print(f"\n{len(results)} variants for sm_{args.arch} in {time.perf_counter() - started:.1f} s")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)
    spilled = [row["variant"] for row in results if row["spill_bytes"]]
    too_big = [row["variant"] for row in results if row["shared_bytes"] > SMEM_PER_BLOCK]
    for label, names in (("spill registers", spilled), ("use too much shared memory", too_big)):
        if names:
            print(f"{len(names)} variants {label}: {', '.join(names)}", file=sys.stderr)
    return 1 if spilled or too_big else 0


if __name__ == "__main__":
    sys.exit(main())
