"""The run's processes: accelerate's ``Accelerator``, FSDP2 for real on CPU, and a line saying what runs.

``accelerate launch`` chooses the parallelism: one process, DDP (``--multi_gpu``), or FSDP
(``--use_fsdp --fsdp_version 2``). accelerate (1.15) takes FSDP only on accelerators: on CPU
processes (``ACCELERATE_USE_CPU=1``, gloo) it sets ``MULTI_CPU`` and wraps the model in DDP, leaving
``--use_fsdp`` unread. ``make_accelerator`` switches such a state to FSDP with the plugin that the
launcher's environment describes, so that ``accelerator.prepare`` shards the model with
``fully_shard`` on CPU as it does on GPUs (torch's FSDP2 runs on gloo). ``describe`` says which
parallelism a prepared model runs, counting its DTensor (sharded) parameters.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor


def fsdp_requested() -> bool:
    """``accelerate launch --use_fsdp`` (or a config file with FSDP) started this process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_accelerator(**kwargs) -> Accelerator:
    """``Accelerator(**kwargs)``, with FSDP2 on CPU processes when the launcher asked for FSDP (see the module)."""
    accelerator = Accelerator(**kwargs)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise ValueError(
            f"the launcher started {launched} processes but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}); on CPU processes set ACCELERATE_USE_CPU=1"
        )
    shard_cpu_processes(accelerator.state)
    return accelerator


def shard_cpu_processes(state: AcceleratorState) -> None:
    """Turn a ``MULTI_CPU`` state into FSDP2 when FSDP was requested; nothing otherwise.

    The state is shared by every ``Accelerator`` of the process, so an Accelerator made later (a
    ``transformers.Trainer``'s) finds FSDP too. The process state (``PartialState``) is switched as
    well: each new ``AcceleratorState()`` copies its fields over the accelerator state's.
    """
    if state.distributed_type != DistributedType.MULTI_CPU or not fsdp_requested():
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"FSDP on CPU processes runs FSDP2 only, but fsdp_version is {plugin.fsdp_version}: "
            "launch with --fsdp_version 2"
        )
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    PartialState().distributed_type = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin


def describe(accelerator: Accelerator, model: torch.nn.Module) -> str:
    """One line: the parallelism a prepared ``model`` runs, over how many processes, and its sharded parameters."""
    processes = accelerator.num_processes
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    where = f"{processes} process{'es' if processes > 1 else ''} on {accelerator.device.type}" + (
        f" ({backend})" if backend else ""
    )
    params = list(model.parameters())
    sharded = sum(isinstance(p, DTensor) for p in params)
    if accelerator.is_fsdp2:
        return f"parallelism: FSDP2 (fully_shard) over {where}; {sharded} of {len(params)} parameter tensors sharded"
    if accelerator.distributed_type == DistributedType.FSDP:
        return f"parallelism: FSDP1 over {where}"
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return f"parallelism: DDP (data parallel, every process holds the whole model) over {where}"
    if processes > 1:
        return f"parallelism: {accelerator.distributed_type.value} over {where}"
    return f"parallelism: none, {where}"
