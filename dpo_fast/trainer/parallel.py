"""The run's processes: accelerate's ``Accelerator`` on GPUs or CPU processes alike, FSDP2 and DeepSpeed ZeRO on CPU
for real, and a line saying what runs.

``accelerate launch`` chooses the parallelism: one process, DDP (``--multi_gpu``), FSDP (``--use_fsdp
--fsdp_version 2``) or DeepSpeed ZeRO (``--use_deepspeed`` or a config file with ``distributed_type: DEEPSPEED``).
On CPU processes (no accelerator) accelerate 1.16 finds no process-group backend: each process sets itself up as
rank 0 of 1, or (with ``ACCELERATE_USE_CPU=1``) as ``MULTI_CPU`` over gloo, which wraps the model in DDP and turns
``--use_fsdp`` and DeepSpeed silently off. ``setup_cpu_processes`` makes accelerate's process state over gloo
itself, before anything else does, so that the same launch works on CPU processes as on GPUs:

- DeepSpeed requested: ``PartialState(backend="gloo")``; accelerate then starts ``deepspeed.comm`` on gloo (DeepSpeed's
  CPU accelerator, which it picks where there is no GPU) and the state is ``DEEPSPEED`` over every process;
- otherwise ``PartialState(cpu=True, backend="gloo")``, i.e. ``MULTI_CPU``; when FSDP was requested,
  ``shard_cpu_processes`` switches that state to FSDP2 (accelerate takes FSDP only on accelerators), so
  ``accelerator.prepare`` shards with ``fully_shard`` as on GPUs (torch's FSDP2 runs on gloo).

On GPUs nothing of this runs: accelerate sets itself up (NCCL). ``describe`` says which parallelism a prepared model
runs, counting its sharded (FSDP2) or partitioned (ZeRO-3) parameters; ``zero_stage`` and ``configure_deepspeed``
are what the loop needs under DeepSpeed.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.tensor import DTensor

_TRUE = ("1", "true", "yes", "on")


def fsdp_requested() -> bool:
    """``accelerate launch --use_fsdp`` (or a config file with FSDP) started this process."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def deepspeed_requested() -> bool:
    """``accelerate launch --use_deepspeed`` (or a config file with DeepSpeed) started this process."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def launched_processes() -> int:
    """The processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def has_accelerator() -> bool:
    """This process sees an accelerator (a CUDA GPU, ...) that accelerate would pick a backend for."""
    try:
        return torch.accelerator.current_accelerator(check_available=True) is not None
    except (RuntimeError, TypeError):  # an older torch: no check_available, or raising where there is none
        return torch.cuda.is_available()


def setup_cpu_processes() -> None:
    """Set up accelerate's process state over gloo on CPU processes started by a launcher; nothing otherwise.

    Call it before anything makes an accelerate state: ``dpo-fast train`` does (``make_accelerator``); a script
    running ``FastDPOTrainer``, ``FastKTOTrainer`` or TRL's trainers calls it first and passes
    ``accelerator_config={"use_configured_state": True}`` to its ``DPOConfig``/``KTOConfig`` (see
    ``docs/distributed.md``). Does nothing for a single process, on a machine with an accelerator, or when the state
    exists already.
    """
    if PartialState._shared_state or launched_processes() <= 1 or has_accelerator():
        return
    if deepspeed_requested():
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() in _TRUE:
            raise ValueError(
                "ACCELERATE_USE_CPU=1 turns DeepSpeed off in accelerate (the run would be plain DDP): unset it; CPU "
                "processes need nothing else, the trainer sets up gloo itself"
            )
        PartialState(backend="gloo")  # accelerate starts deepspeed.comm on gloo: DEEPSPEED over every process
    else:
        PartialState(cpu=True, backend="gloo")  # MULTI_CPU; FSDP2 from it in shard_cpu_processes


def make_accelerator(**kwargs) -> Accelerator:
    """``Accelerator(**kwargs)`` after ``setup_cpu_processes``, with FSDP2 on CPU processes when the launcher asked for
    FSDP (see the module); refuses a state that does not span every process the launcher started."""
    setup_cpu_processes()
    accelerator = Accelerator(**kwargs)
    launched = launched_processes()
    if accelerator.num_processes != launched:
        raise ValueError(
            f"the launcher started {launched} processes but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}): was accelerate's state made before the trainer's (a PartialState "
            "or Accelerator without a backend)?"
        )
    if deepspeed_requested() and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise ValueError(
            f"the launcher asked for DeepSpeed but accelerate set up {accelerator.distributed_type.value}: "
            "ACCELERATE_USE_CPU=1 or a state made before the trainer's turns it off"
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


def zero_stage(accelerator: Accelerator) -> int | None:
    """The DeepSpeed ZeRO stage the run is under (0 to 3), or None without DeepSpeed."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


# the DeepSpeed config's keys the run's own keys decide, and how
_RUN_KEYS = {
    "train_micro_batch_size_per_gpu": "per_device_train_batch_size",
    "gradient_accumulation_steps": "gradient_accumulation_steps",
    "gradient_clipping": "max_grad_norm",
}


def configure_deepspeed(accelerator: Accelerator, cfg) -> list[str]:
    """Write the run's batch size, accumulation and clipping into the DeepSpeed config, before ``prepare``.

    The engine takes these from its config (it scales the loss by its accumulation steps, steps the optimizer at the
    last micro-batch and clips there), so they must be the run's: ``per_device_train_batch_size``,
    ``gradient_accumulation_steps`` and ``max_grad_norm`` (0: no clipping), whatever the DeepSpeed config (``auto``
    or a number) or the launcher's flags said. The optimizer and the schedule are the run's too (AdamW and
    ``lr_scheduler_type``); a DeepSpeed config that names its own is refused.

    Returns:
        one line per value of the DeepSpeed config that the run's key replaced (printed by the caller).
    """
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ValueError(
                f"the DeepSpeed config names its own {section} ({config[section].get('type', '?')}); dpo-fast train "
                f"runs AdamW with the run's learning_rate and lr_scheduler_type: remove '{section}' from the config"
            )
    notes = []
    for ds_key, run_key in _RUN_KEYS.items():
        value = getattr(cfg, run_key)
        previous = config.get(ds_key, "auto")
        if previous not in ("auto", None) and previous != value:
            notes.append(f"DeepSpeed config {ds_key}={previous} replaced by the run's {run_key}={value}")
        config[ds_key] = value
    config["train_batch_size"] = (
        cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    )
    accelerator.gradient_accumulation_steps = cfg.gradient_accumulation_steps
    return notes


def _zero3_partition(param: torch.nn.Parameter) -> tuple[int, int] | None:
    """(elements held by this process, elements in all) of a ZeRO-3 parameter; None for any other tensor."""
    if not hasattr(param, "ds_numel"):
        return None
    return param.ds_tensor.numel(), param.ds_numel


def describe(accelerator: Accelerator, model: torch.nn.Module, policy: torch.nn.Module | None = None) -> str:
    """One line: the parallelism a prepared ``model`` runs, over how many processes, and its sharded parameters.

    Args:
        policy: the causal LM inside ``model`` (its LM head is named under ZeRO-3).
    """
    processes = accelerator.num_processes
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    where = f"{processes} process{'es' if processes > 1 else ''} on {accelerator.device.type}" + (
        f" ({backend})" if backend else ""
    )
    params = list(model.parameters())
    sharded = sum(isinstance(p, DTensor) for p in params)
    if zero_stage(accelerator) is not None:
        if not hasattr(model, "zero_optimization_stage"):
            return f"parallelism: DeepSpeed requested, but the model is not a DeepSpeed engine ({type(model).__name__})"
        stage = model.zero_optimization_stage()  # the engine's own
        line = f"parallelism: DeepSpeed ZeRO-{stage} over {where}"
        if stage == 3:
            partitioned = [p for p in params if (share := _zero3_partition(p)) is not None and share[0] < share[1]]
            line += f"; {len(partitioned)} of {len(params)} parameter tensors partitioned"
            head = None if policy is None else _zero3_partition(policy.get_output_embeddings().weight)
            if head is not None:
                line += f" (lm_head.weight: {head[0]} of {head[1]} elements on this process)"
        elif stage in (1, 2):  # the float32 master weights (and their optimizer state) are partitioned
            held = sum(p.numel() for p in getattr(model.optimizer, "single_partition_of_fp32_groups", []))
            total = sum(p.numel() for p in params if p.requires_grad)
            line += f"; optimizer state partitioned ({held} of {total} trainable elements on this process)"
        return line
    if accelerator.is_fsdp2:
        return f"parallelism: FSDP2 (fully_shard) over {where}; {sharded} of {len(params)} parameter tensors sharded"
    if accelerator.distributed_type == DistributedType.FSDP:
        return f"parallelism: FSDP1 over {where}"
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return f"parallelism: DDP (data parallel, every process holds the whole model) over {where}"
    if processes > 1:
        return f"parallelism: {accelerator.distributed_type.value} over {where}"
    return f"parallelism: none, {where}"
