"""Checkpoints: written to a temporary folder, then renamed into place, so one is whole or absent.

``<output_dir>/checkpoint-<step>/`` holds

- ``model/``: the policy by ``save_pretrained`` (safetensors) and the tokenizer; loadable with
  ``AutoModelForCausalLM.from_pretrained`` (for LoRA: the adapters, for ``PeftModel.from_pretrained``);
- ``base/``: for LoRA on a model built from a config ``.json`` (a random init that exists nowhere
  else), the base model and the tokenizer, and ``model/adapter_config.json`` names this folder
  as its ``base_model_name_or_path``;
- ``optimizer.pt``: full (unsharded) optimizer and scheduler state; under DeepSpeed instead
- ``deepspeed/`` (the engine's own checkpoint, ``engine.save_checkpoint``: each process's partition of the
  optimizer state and, under ZeRO-3, of the float32 weights) and ``scheduler.pt`` (the schedule);
- ``rng_state_<rank>.pt``: each process's Python, NumPy and torch generators;
- ``trainer_state.json``: step, data position (epoch, step within the epoch) and the config.

Model and optimizer state go through ``torch.distributed.checkpoint.state_dict``, which gives
full state dicts from a plain, DDP or FSDP module alike. Under DeepSpeed ZeRO the engine saves and
restores its own partitions (as accelerate's ``save_state`` and transformers' Trainer do), so a resume
continues from exactly the saved optimizer state; ``model/`` is the consolidated model all the same
(under ZeRO-3 gathered a module at a time, ``_zero3_consolidated_16bit_state_dict``, in the weights' own
dtype). ``optimizer.pt``, ``scheduler.pt`` and the RNG files are read with ``torch.load(weights_only=True)``:
a checkpoint from elsewhere cannot run code on load through them. DeepSpeed reads ``deepspeed/`` with its
own ``torch.load(weights_only=False)``: resume only from DeepSpeed checkpoints you trust.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from . import parallel
from .config import TrainConfig
from .model import built_from_config

_PREFIX = "model."  # DPOModel holds the HF (or PEFT) model as .model
_PEFT_PREFIX = "base_model.model."  # a PeftModel's names of the transformers model's weights
_DEEPSPEED_DIR, _DEEPSPEED_TAG = "deepspeed", "state"  # engine.save_checkpoint(<checkpoint>/deepspeed, tag="state")
# what np.random.get_state() pickles, allowed by torch.load(weights_only=True) (as transformers' Trainer does)
_NUMPY_CORE = getattr(np, "_core", None) or np.core
_RNG_GLOBALS = [_NUMPY_CORE.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def save(accelerator: Accelerator, model, optimizer, scheduler, tokenizer, cfg: TrainConfig, state: dict) -> Path:
    """Write ``checkpoint-<state['step']>`` under ``cfg.output_dir`` and prune old ones; returns its path."""
    final = Path(cfg.output_dir) / f"checkpoint-{state['step']}"
    partial = Path(cfg.output_dir) / f".checkpoint-{state['step']}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    deepspeed = parallel.zero_stage(accelerator) is not None
    if deepspeed:  # every process writes its partitions; the main process gets the consolidated weights
        model.save_checkpoint(str(partial / _DEEPSPEED_DIR), tag=_DEEPSPEED_TAG, save_latest=False)
        model_state, optim_state = _deepspeed_model_state(model), None
    else:
        model_state, optim_state = get_state_dict(
            model, optimizer.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    if accelerator.is_main_process:
        policy = accelerator.unwrap_model(model).model
        second_names = _second_names_of_tied(policy)
        weights = {
            name: value for key, value in model_state.items() if (name := key.removeprefix(_PREFIX)) not in second_names
        }
        policy.save_pretrained(partial / "model", state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(partial / "model")
        if hasattr(policy, "peft_config") and built_from_config(cfg):
            _save_lora_base(policy, weights, tokenizer, partial, final)
        if deepspeed:
            torch.save({"scheduler": scheduler.state_dict()}, partial / "scheduler.pt")
        else:
            torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict()}, partial / "optimizer.pt")
        record = {**state, "config": dataclasses.asdict(cfg)}
        (partial / "trainer_state.json").write_text(json.dumps(record, indent=2))
    torch.save(_rng_state(), partial / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        _prune(Path(cfg.output_dir), cfg.save_total_limit)
    accelerator.wait_for_everyone()
    return final


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every whole checkpoint under ``output_dir`` (``checkpoint-<step>`` folders), by step.

    Anything else (``checkpoint-copy``, a partial ``.checkpoint-<step>.partial``, files) is not one.
    """
    found = []
    for path in Path(output_dir).glob("checkpoint-*"):
        step = path.name.removeprefix("checkpoint-")
        if step.isdigit() and path.is_dir():
            found.append((int(step), path))
    return sorted(found)


def latest(output_dir: str | Path) -> Path | None:
    """The newest whole checkpoint under ``output_dir``, or None."""
    found = checkpoints(output_dir)
    return found[-1][1] if found else None


def trainer_state(path: Path) -> dict:
    """The ``trainer_state.json`` of checkpoint ``path`` (step, data position, config)."""
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"resume_from_checkpoint {str(path)!r} is not a checkpoint folder (no trainer_state.json)")
    return json.loads((path / "trainer_state.json").read_text())


def load(path: Path, accelerator: Accelerator, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG from ``path``; returns its trainer state."""
    state = trainer_state(path)
    saved_by_deepspeed = (path / _DEEPSPEED_DIR).is_dir()
    if parallel.zero_stage(accelerator) is not None:
        if not saved_by_deepspeed:
            raise ValueError(
                f"checkpoint {str(path)!r} was saved without DeepSpeed: resume it without DeepSpeed, as it was run"
            )
        loaded, _ = model.load_checkpoint(
            str(path / _DEEPSPEED_DIR), tag=_DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise ValueError(f"DeepSpeed found no checkpoint in {str(path / _DEEPSPEED_DIR)!r}")
        scheduler.load_state_dict(_load_plain(path / "scheduler.pt")["scheduler"])
        _set_rng_state(_load_plain(path / f"rng_state_{accelerator.process_index}.pt"))
        return state
    if saved_by_deepspeed:
        raise ValueError(
            f"checkpoint {str(path)!r} was saved under DeepSpeed ZeRO (its optimizer state is partitioned): resume it "
            "under DeepSpeed with the same number of processes"
        )
    policy = accelerator.unwrap_model(model).model
    weights = {}
    for file in sorted((path / "model").glob("*.safetensors")):
        weights.update(load_file(file))
    saved = _load_plain(path / "optimizer.pt")
    if hasattr(policy, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(policy, weights)
        model_state = {}
    else:
        model_state = {_PREFIX + key: value for key, value in weights.items()}
        _check_complete(policy, weights, path)
    set_state_dict(
        model, optimizer.optimizer, model_state_dict=model_state, optim_state_dict=saved["optimizer"],
        options=StateDictOptions(full_state_dict=True, strict=False),
    )  # fmt: skip
    scheduler.load_state_dict(saved["scheduler"])
    _set_rng_state(_load_plain(path / f"rng_state_{accelerator.process_index}.pt"))
    return state


def _deepspeed_model_state(engine) -> dict[str, torch.Tensor] | None:
    """The full state dict of a DeepSpeed engine's module on the main process (None elsewhere); collective.

    ZeRO-3 partitions the weights: they are gathered a module at a time (a tied weight once, under both names).
    ZeRO-1 and 2 leave every process the whole module.
    """
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()
    return {key: value.detach().cpu() for key, value in engine.module.state_dict().items()}


def _load_plain(path: Path):
    """``torch.load`` of tensors, containers, numbers and RNG states only; anything else raises ``ValueError``."""
    try:
        with torch.serialization.safe_globals(_RNG_GLOBALS):
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{str(path)!r} holds objects other than tensors, numbers and RNG states; it was not loaded, as loading "
            f"them could run code (torch.load(weights_only=True) said: {str(error).strip().splitlines()[0]})"
        ) from None


def _save_lora_base(policy, weights: dict, tokenizer, partial: Path, final: Path) -> None:
    """Write the base model under ``partial / "base"`` and name it (at ``final``) in the adapters' config.

    Args:
        weights: the PeftModel's full state dict (``base_model.model.<name>``, ``<module>.base_layer.weight``
            for the wrapped layers, ``lora_A``/``lora_B`` for the adapters).
    """
    base = {
        key.removeprefix(_PEFT_PREFIX).replace(".base_layer.", "."): value
        for key, value in weights.items() if "lora_" not in key
    }  # fmt: skip
    policy.get_base_model().save_pretrained(partial / "base", state_dict=base, safe_serialization=True)
    tokenizer.save_pretrained(partial / "base")
    adapter_config = partial / "model" / "adapter_config.json"
    values = json.loads(adapter_config.read_text())
    values["base_model_name_or_path"] = str((final / "base").resolve())
    adapter_config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def _check_complete(policy, weights: dict, path: Path) -> None:
    """Every parameter is in the file, but for the second name of a tied one (e.g. lm_head.weight)."""
    first_names = {name for name, _ in policy.named_parameters()}
    missing = first_names - set(weights)
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks weights {sorted(missing)[:5]}...; is it from another model?")


def _second_names_of_tied(policy: torch.nn.Module) -> set[str]:
    """The names of a parameter after its first (``lm_head.weight`` of a tied embedding): saved once.

    Gathered full state dicts (FSDP) give each name its own tensor, so ``save_pretrained`` cannot see the tie.
    """
    first_by_id, second = {}, set()
    for name, param in policy.named_parameters(remove_duplicate=False):
        if first_by_id.setdefault(id(param), name) != name:
            second.add(name)
    return second


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _prune(output_dir: Path, keep: int) -> None:
    if keep > 0:
        for _, old in checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
