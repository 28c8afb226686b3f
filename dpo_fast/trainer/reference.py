"""Reference log-probs, four ways (``cfg.reference_mode``), as the objective's sums (``DPOModel._reference_logps``):

- ``precompute`` (default): one no-grad pass of the initial policy over the train and eval rows
  before training, cached on disk under a key of the initial policy's weights (a hash of their bytes,
  ``weights_digest``), its config and the tokenized data; the reference model need not stay in memory,
  and a rerun (or a resume) reads the cache.
- ``model``: a frozen copy of the initial policy, run beside it on every batch.
- ``adapters``: a LoRA policy with its adapters disabled, i.e. the base model.
- ``none``: reference-free DPO (reference log-probs 0), and the objectives that read no reference.

``build`` returns ``ref_logps(split, rows, batch) -> (2P,) float32``, chosen first, for the
batch of dataset rows ``rows`` of ``split`` ("train" or "eval"), collated as ``batch``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, broadcast_object_list
from torch.distributed.tensor import DTensor

from . import data
from . import objective as objective_lib
from .config import TrainConfig

RefLogps = Callable[[str, list[int], dict], torch.Tensor]


def frozen_copy(model: torch.nn.Module, rebuild: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """A no-grad, eval-mode copy of the policy for ``reference: model``, made before ``accelerator.prepare``
    (an FSDP-sharded module cannot be deep-copied).

    A model that DeepSpeed ZeRO-3 partitioned as it was built (transformers' ``zero.Init``) cannot be deep-copied
    either: ``rebuild()`` builds another one the same way (partitioned alike), and each process copies its own
    partition of every parameter into it; ``build`` checks that its weights are the policy's.
    """
    if not any(hasattr(param, "ds_id") for param in model.parameters()):
        return copy.deepcopy(model).requires_grad_(False).eval()
    copied = rebuild()
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in copied.named_parameters():
            param.ds_tensor.copy_(own[name].ds_tensor)
    return copied.requires_grad_(False).eval()


def build(cfg: TrainConfig, model, accelerator: Accelerator, splits: dict[str, datasets.Dataset], pad_id: int,
          frozen: torch.nn.Module | None = None) -> RefLogps:  # fmt: skip
    """The reference of ``cfg.reference_mode`` for the prepared policy ``model`` at its initial weights.

    ``frozen`` is ``frozen_copy`` of the policy before it was prepared, for ``reference: model``.
    """
    if cfg.reference_mode == "none":
        return lambda split, rows, batch: torch.zeros(2 * len(rows), device=accelerator.device)
    if cfg.reference_mode == "adapters":
        policy = accelerator.unwrap_model(model).model

        def with_adapters_disabled(split, rows, batch):
            was_training = model.training
            model.eval()  # no dropout in the reference
            with torch.no_grad(), policy.disable_adapter():
                logps = model(**batch)
            model.train(was_training)
            return logps

        return with_adapters_disabled
    if cfg.reference_mode == "model":
        if frozen is None:
            raise ValueError("reference='model' needs the frozen copy of the policy made before prepare")
        if any(hasattr(param, "ds_id") for param in frozen.parameters()):  # ZeRO-3: partitioned, like the policy
            frozen = _zero3_inference_engine(frozen, accelerator)
            if weights_digest(frozen, accelerator) != weights_digest(model, accelerator):
                raise ValueError("the reference copy's weights differ from the policy's initial weights")
        else:
            frozen = accelerator.prepare_model(frozen, evaluation_mode=True)

        def frozen_model(split, rows, batch):
            with torch.no_grad():
                return frozen(**batch)

        return frozen_model
    digest = weights_digest(model, accelerator)
    tables = {
        split: _cached_table(cfg, model, accelerator, rows, split, pad_id, digest) for split, rows in splits.items()
    }

    def precomputed(split, rows, batch):
        table = tables[split][rows]  # (P, 2): chosen, rejected
        return torch.cat([table[:, 0], table[:, 1]]).to(accelerator.device)

    return precomputed


def _zero3_inference_engine(frozen: torch.nn.Module, accelerator: Accelerator):
    """A DeepSpeed ZeRO-3 engine around the partitioned ``frozen`` copy, without an optimizer (as TRL prepares its
    reference model): its forward gathers each module's parameters as the policy's does."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    engine, *_ = deepspeed.initialize(model=frozen, config=config)
    engine.eval()
    return engine


def compute_table(model, accelerator: Accelerator, rows: datasets.Dataset, batch_size: int, padding_free: bool,
                  pad_id: int, prefix_sharing: bool = False) -> torch.Tensor:  # fmt: skip
    """(num_rows, 2) float32 log-probs [chosen, rejected] of every row under ``model``, no grad, eval mode,
    in the run's layout (``data.collate``: padded or packed, the prefix shared or not).

    Every process runs the same number of forwards (DDP and FSDP forwards are collective) on its
    share of the batches; the table is summed across processes.
    """
    table = torch.zeros(len(rows), 2, device=accelerator.device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for indices, counted in data.shard(data.eval_batches(len(rows), batch_size), accelerator):
            batch = data.to_device(
                data.collate(rows[indices], padding_free, pad_id, prefix_sharing), accelerator.device
            )
            logps = model(**batch).float()
            if counted:
                table[indices] = torch.stack(logps.chunk(2), dim=1)
    model.train(was_training)
    return accelerator.reduce(table, reduction="sum").cpu()


def weights_digest(model, accelerator: Accelerator) -> str:
    """sha256 of what the reference computes with: the prepared policy's weights (names, dtypes, shapes and bytes,
    LoRA adapters left out: they start as the identity) and its config; the same on every process. Collective.

    Sharded weights are made whole one tensor at a time: FSDP2's DTensors by ``full_tensor``, ZeRO-3's partitions by
    ``deepspeed.zero.GatheredParameters``; the main process hashes them.
    """
    policy = accelerator.unwrap_model(model).hf_model
    config = {key: value for key, value in policy.config.to_dict().items()
              if not key.startswith("_") and key != "transformers_version"}  # fmt: skip
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, param in policy.named_parameters():
        if "lora_" in name:
            continue
        with _whole(param) as whole:
            if accelerator.is_main_process:
                digest.update(f"{name} {whole.dtype} {tuple(whole.shape)}".encode())
                digest.update(memoryview(whole.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return broadcast_object_list([digest.hexdigest() if accelerator.is_main_process else None])[0]


class _whole:
    """``with _whole(param) as tensor``: the whole tensor of a parameter, gathered where it is sharded (collective)."""

    def __init__(self, param: torch.nn.Parameter):
        self.param, self.gathered = param, None

    def __enter__(self) -> torch.Tensor:
        if isinstance(self.param, DTensor):
            return self.param.full_tensor()
        if hasattr(self.param, "ds_id"):  # ZeRO-3
            import deepspeed

            self.gathered = deepspeed.zero.GatheredParameters([self.param])
            self.gathered.__enter__()
        return self.param

    def __exit__(self, *exc) -> None:
        if self.gathered is not None:
            self.gathered.__exit__(*exc)


def _cached_table(cfg, model, accelerator, rows, split, pad_id, digest: str) -> torch.Tensor:
    path = Path(cfg.reference_cache_dir) / f"{_cache_key(cfg, rows, digest)}.pt"
    hit = broadcast_object_list([path.is_file()])[0]  # the main process decides, so all take the same branch
    if hit:
        table = torch.load(path, weights_only=True) if accelerator.is_main_process else torch.zeros(len(rows), 2)
        return broadcast(table.to(accelerator.device)).cpu()
    table = compute_table(model, accelerator, rows, cfg.per_device_eval_batch_size, cfg.padding_free, pad_id,
                          cfg.prefix_sharing)  # fmt: skip
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(table, partial)
        os.replace(partial, path)
    accelerator.print(f"reference log-probs of the {split} rows computed and cached in {path}")
    return table


def _cache_key(cfg: TrainConfig, rows: datasets.Dataset, weights: str | None) -> str:
    """sha256 of the reference's weights, what changes its numbers, and the tokenized rows.

    Args:
        weights: ``weights_digest`` of the initial policy: the weights themselves, not where they came from (a
            config file's random init differs under ZeRO-3's partitioned init, a folder's files can change in place).
    """
    model_id = {"weights": weights}
    built = objective_lib.build(cfg)  # the log-probs are the objective's sums, weighted by LD-DPO's ld_alpha
    options = {"dtype": cfg.dtype, "bf16": cfg.bf16, "units": "sums"}
    if built.ld_alpha is not None:
        options["ld_alpha"] = built.ld_alpha
    if cfg.prefix_sharing:  # the same numbers up to float32 rounding, computed in another layout
        options["prefix_sharing"] = True
    digest = hashlib.sha256(json.dumps([model_id, options], sort_keys=True).encode())
    for batch in rows.iter(batch_size=4096):
        digest.update(json.dumps([batch[key] for key in ("prompt_ids", "chosen_ids", "rejected_ids")]).encode())
    return digest.hexdigest()[:32]
