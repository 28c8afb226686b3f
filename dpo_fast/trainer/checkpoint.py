"""Checkpoints: written to a temporary folder, then renamed into place, so one is whole or absent.

``<output_dir>/checkpoint-<step>/`` holds

- ``model/``: the policy by ``save_pretrained`` (safetensors) and the tokenizer; loadable with
  ``from_pretrained`` (for LoRA, ``PeftModel.from_pretrained``: the adapters only);
- ``optimizer.pt``: full (unsharded) optimizer and scheduler state;
- ``rng_state_<rank>.pt``: each process's Python, NumPy and torch generators;
- ``trainer_state.json``: step, data position (epoch, step within the epoch) and the config.

Model and optimizer state go through ``torch.distributed.checkpoint.state_dict``, which gives
full state dicts from a plain, DDP or FSDP module alike.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .config import TrainConfig

_PREFIX = "model."  # DPOModel holds the HF (or PEFT) model as .model


def save(accelerator: Accelerator, model, optimizer, scheduler, tokenizer, cfg: TrainConfig, state: dict) -> Path:
    """Write ``checkpoint-<state['step']>`` under ``cfg.output_dir`` and prune old ones; returns its path."""
    final = Path(cfg.output_dir) / f"checkpoint-{state['step']}"
    partial = Path(cfg.output_dir) / f".checkpoint-{state['step']}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    model_state, optim_state = get_state_dict(
        model, optimizer.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if accelerator.is_main_process:
        policy = accelerator.unwrap_model(model).model
        weights = {key.removeprefix(_PREFIX): value for key, value in model_state.items()}
        policy.save_pretrained(partial / "model", state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(partial / "model")
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


def latest(output_dir: str) -> Path | None:
    """The newest whole checkpoint under ``output_dir``, or None."""
    found = sorted(Path(output_dir).glob("checkpoint-*"), key=_step_of)
    return found[-1] if found else None


def load(path: Path, accelerator: Accelerator, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG from ``path``; returns its trainer state."""
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"resume_from_checkpoint {str(path)!r} is not a checkpoint folder (no trainer_state.json)")
    policy = accelerator.unwrap_model(model).model
    weights = {}
    for file in sorted((path / "model").glob("*.safetensors")):
        weights.update(load_file(file))
    saved = torch.load(path / "optimizer.pt", weights_only=False)
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
    _set_rng_state(torch.load(path / f"rng_state_{accelerator.process_index}.pt", weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())


def _check_complete(policy, weights: dict, path: Path) -> None:
    """Every parameter is in the file, but for the second name of a tied one (e.g. lm_head.weight)."""
    first_names = {name for name, _ in policy.named_parameters()}
    missing = first_names - set(weights)
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} lacks weights {sorted(missing)[:5]}...; is it from another model?")


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


def _step_of(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def _prune(output_dir: Path, keep: int) -> None:
    if keep > 0:
        for old in sorted(output_dir.glob("checkpoint-*"), key=_step_of)[:-keep]:
            shutil.rmtree(old)
