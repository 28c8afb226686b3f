"""Every Triton kernel variant the launchers can pick, compiled ahead of time for an H100 (sm_90), no GPU.

CPU CI cannot run the kernels compiled, but it can compile them: ``python -m dpo_fast.kernels.aot``
compiles each variant with the tiles, warps and stages an H100 launch uses, through the ``ptxas``
shipped in the triton wheel, and reports registers, spills and shared memory. A spill (registers
moved to local memory, a slow path) or a block's shared memory over sm_90's 227 KiB fails here.
The compile runs in a subprocess without ``TRITON_INTERPRET`` (under the interpreter the kernels
are not compilable objects), on 2 processes; Triton's cache (``~/.triton/cache``) makes reruns quick.
"""

import itertools
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia", reason="the compile test needs triton's NVIDIA backend and ptxas")
aot = pytest.importorskip("dpo_fast.kernels.aot")
config = pytest.importorskip("dpo_fast.kernels.config")


@pytest.mark.slow
def test_every_variant_compiles_for_sm90_without_spills(tmp_path):
    report = tmp_path / "sm90.json"
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    jobs = str(min(2, os.cpu_count() or 1))
    run = subprocess.run(
        [sys.executable, "-m", "dpo_fast.kernels.aot", "--arch", "90", "--jobs", jobs, "--json", str(report)],
        check=False, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    print(run.stdout)
    assert report.exists(), run.stderr[-4000:]
    results = json.loads(report.read_text())

    assert [row["variant"] for row in results] == [variant.name for variant in aot.variants()]
    spilled = {row["variant"]: row["spill_bytes"] for row in results if row["spill_bytes"]}
    assert not spilled, f"variants that spill registers (bytes of stack frame): {spilled}"
    too_big = {row["variant"]: row["shared_bytes"] for row in results if row["shared_bytes"] > aot.SMEM_PER_BLOCK}
    assert not too_big, f"variants over sm_90's {aot.SMEM_PER_BLOCK} bytes of shared memory per block: {too_big}"
    assert all(row["blocks_per_sm"] >= 1 for row in results)
    assert run.returncode == 0, run.stderr[-4000:]


def test_variants_cover_every_launch():
    """Each flag combination, dtype and precision a launcher can pass maps to a compiled variant."""
    compiled = {(v.kernel, v.dtype, v.flags, v.launch) for v in aot.variants()}
    for kernel, (_, make_flags) in aot.KERNELS.items():
        for dtype, precision in aot.PRECISIONS:
            for switches in itertools.product((False, True), repeat=4):
                flags = make_flags(*switches)
                launch = config.gpu_config(kernel, aot.DTYPES[dtype], precision, flags)
                assert (kernel, dtype, tuple(flags.items()), launch) in compiled, (kernel, dtype, precision, flags)
    # 16 forward variants per (dtype, precision); the backward's kept logits need no bias, product or precision
    assert len(compiled) == len(aot.variants()) == 4 * 16 + 4 * 8 + 3 * 4


def test_occupancy_arithmetic():
    # 255 registers x 256 threads leave room for one block; 128 x 256 for two; 96 KiB of shared memory for two
    assert aot.blocks_per_sm(255, 8, 0) == 1
    assert aot.blocks_per_sm(128, 8, 0) == 2
    assert aot.blocks_per_sm(64, 4, 96 * 1024) == 2
    assert aot.blocks_per_sm(32, 4, 0) == 16
