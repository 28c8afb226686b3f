"""Launch parameters for the kernels, by device: tile sizes, warps, pipeline stages, dot precision.

On a GPU the tiles are sized for Hopper-class tensor cores (128 x 128 logits per program, 64-wide
K steps for 16-bit inputs). On CPU tensors the kernels run in Triton's interpreter
(``TRITON_INTERPRET=1``), where the smallest tiles ``tl.dot`` accepts keep tests fast and make
even tiny vocabularies span several tiles and splits.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int
    input_precision: str
    # programs wanted in the forward grid; the vocabulary is split until the grid reaches it
    target_programs: int


def launch_config(hidden: torch.Tensor, vocab: int) -> LaunchConfig:
    # float32 operands: exact products unless the user allowed TF32 for matmuls in torch
    precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if hidden.device.type != "cuda":
        return LaunchConfig(16, 32, 16, 1, 1, precision, target_programs=4)
    sm_count = torch.cuda.get_device_properties(hidden.device).multi_processor_count
    block_k = 32 if hidden.dtype == torch.float32 else 64
    return LaunchConfig(128, 128, block_k, 8, 3, precision, target_programs=4 * sm_count)
