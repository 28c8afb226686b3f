"""Launch parameters of the kernels: tile sizes, warps, pipeline stages and the dot's input precision.

The GPU configuration is a pure function of the kernel, the operand dtype, the float32 precision
and the kernel's flags (``gpu_config``), so that it can be computed without a device: the
ahead-of-time compile test (``kernels/triton/aot.py``) compiles exactly what a launch on an H100 picks.
``kernels/README.md`` records each variant's registers, spills, shared memory and occupancy.

On CPU tensors the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``), by default with
the smallest tiles ``tl.dot`` accepts, which keeps tests fast and makes tiny vocabularies span
several tiles and splits. Tests set ``INTERPRETER_SM_COUNT`` to run the interpreter with the GPU's
configuration instead (its masks at tile edges, its split count).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# None: the interpreter runs small tiles; an SM count: it runs the GPU configuration of such a device
INTERPRETER_SM_COUNT: int | None = None
# programs wanted per SM in the forward grid; the vocabulary is split until the grid reaches them
PROGRAMS_PER_SM = 4


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes (``BLOCK_N`` tokens x ``BLOCK_V`` vocabulary entries, ``BLOCK_K`` hidden units per
    step), ``num_warps`` and ``num_stages`` of one launch, and the dot's ``input_precision``."""

    block_n: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int
    input_precision: str

    def constexprs(self) -> dict:
        """The kernel's tile constexprs."""
        return {
            "BLOCK_N": self.block_n,
            "BLOCK_V": self.block_v,
            "BLOCK_K": self.block_k,
            "INPUT_PRECISION": self.input_precision,
        }

    def options(self) -> dict:
        """The launch options (warps, stages)."""
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


def gpu_config(kernel: str, dtype: torch.dtype, precision: str, flags: dict) -> LaunchConfig:
    """The configuration of ``kernel`` (``"logits_stats"`` or ``"logits_grad"``) on an sm_90 GPU.

    Args:
        dtype: the operands' dtype (float32, bfloat16, float16).
        precision: ``"ieee"`` or ``"tf32"``, for float32 operands (ignored for 16-bit ones).
        flags: the kernel's flag constexprs (``HAS_BIAS``, ``WITH_METRICS``, ...), as launched.
    """
    if kernel not in ("logits_stats", "logits_grad"):
        raise ValueError(f"kernel={kernel!r}: expected 'logits_stats' or 'logits_grad'")
    if dtype != torch.float32 or flags.get("LOAD_LOGITS"):
        precision = "ieee"  # only products of float32 operands have a choice
    if dtype != torch.float32:
        block_n, block_v, block_k = 128, 128, 64  # wgmma m64n128k16, two warpgroups, 128-byte rows of K
    elif precision == "tf32":
        block_n, block_v, block_k = 128, 128, 32  # wgmma m64n128k8 on TF32 operands
    else:
        block_n, block_v, block_k = 128, 64, 16  # exact products on the FMA units, operands in registers
    if flags.get("STORE_LOGITS"):
        # the tile is stored through a layout conversion that holds it twice: half the columns, no spills
        block_v = 64
    return LaunchConfig(block_n, block_v, block_k, 8, 3, precision)


def interpreter_config(precision: str) -> LaunchConfig:
    """Small tiles for Triton's interpreter on CPU tensors."""
    return LaunchConfig(16, 32, 16, 1, 1, precision)


def launch_config(kernel: str, hidden: torch.Tensor, flags: dict, float32_precision: str) -> LaunchConfig:
    """The configuration for a launch of ``kernel`` on ``hidden``'s device and dtype.

    ``float32_precision`` (``"ieee"`` or ``"tf32"``) is how float32 operands are multiplied, as the
    caller read it from torch's settings; 16-bit operands ignore it.
    """
    precision = float32_precision if hidden.dtype == torch.float32 else "ieee"
    if hidden.device.type == "cuda" or INTERPRETER_SM_COUNT is not None:
        return gpu_config(kernel, hidden.dtype, precision, flags)
    return interpreter_config(precision)


def target_programs(device: torch.device) -> int:
    """Programs wanted in the forward grid: a few per SM (a few in the interpreter)."""
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return PROGRAMS_PER_SM * (INTERPRETER_SM_COUNT or 1)
