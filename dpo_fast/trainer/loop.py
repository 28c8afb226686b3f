"""The training loop: ``train(cfg)`` reads top to bottom, setup, reference, steps, eval, checkpoints.

Data order is a function of (seed, epoch), and a step's micro-batches are a function of the
step, so the data position of a run is its step: a resumed run takes the same batches as an
uninterrupted one. A step is ``gradient_accumulation_steps`` micro-batches on each of the
processes; global micro-batch ``(step_in_epoch * accumulation + micro) * processes + rank``
of the epoch's order goes to process ``rank``.
"""

from __future__ import annotations

import json
from contextlib import nullcontext

import torch
from accelerate.utils import set_seed
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import SchedulerType, get_scheduler

from ..integrations import hf
from . import checkpoint, data, output, parallel, reference, sources, tensor_parallel, trackers
from . import model as model_lib
from . import objective as objective_lib
from .config import TrainConfig


def train(cfg: TrainConfig) -> dict[str, float]:
    """Run the preference objective ``cfg`` names; returns the last logged train and eval metrics.

    Metrics have TRL's names (``objective_lib.metric_names``: the objective's trainer's), each a sum over pairs
    in ``_sums`` divided by the pair count to log; the token metrics (``hf.TOKEN_METRICS``: entropy,
    logits/chosen, logits/rejected, mean_token_accuracy) follow as sums and counts over completion tokens.
    """
    # what can be checked without loading anything: local paths exist, the output folder fits the run
    sources.check(cfg)
    trackers.check(cfg)
    resume = output.resume_point(cfg)
    if cfg.lr_scheduler_type not in {kind.value for kind in SchedulerType}:
        raise ValueError(f"lr_scheduler_type must be one of {' | '.join(k.value for k in SchedulerType)}, "
                         f"got {cfg.lr_scheduler_type!r}")  # fmt: skip
    accelerator = parallel.make_accelerator(mixed_precision="bf16" if cfg.bf16 else "no",
                                            **trackers.accelerator_kwargs(cfg))  # fmt: skip
    zero_stage = parallel.zero_stage(accelerator)  # DeepSpeed ZeRO's stage, None without DeepSpeed
    if zero_stage is not None:  # before the model loads: ZeRO-3 partitions it as it is built (zero.Init)
        for note in parallel.configure_deepspeed(accelerator, cfg):
            accelerator.print(note)
    tp = tensor_parallel.TensorParallel.setup(cfg, accelerator)  # None unless tensor_parallel > 1
    data_acc = tensor_parallel.data_view(accelerator, tp)  # the processes as the data sees them
    set_seed(cfg.seed)

    # data: tokenized once (by the main process first, the others read datasets' cache)
    tokenizer = model_lib.load_tokenizer(cfg)
    with accelerator.main_process_first():
        splits = {"train": _tokenized("dataset", cfg.dataset, cfg.dataset_split, tokenizer, cfg)}
        if cfg.eval_dataset:
            splits["eval"] = _tokenized("eval_dataset", cfg.eval_dataset, cfg.eval_split, tokenizer, cfg)
    train_rows = splits["train"]
    micro_batches_per_step = cfg.gradient_accumulation_steps * data_acc.num_processes
    steps_per_epoch = len(train_rows) // cfg.per_device_train_batch_size // micro_batches_per_step
    if steps_per_epoch == 0:
        raise ValueError(
            f"dataset {cfg.dataset!r} has {len(train_rows)} rows, fewer than one step's "
            f"{cfg.per_device_train_batch_size * micro_batches_per_step} (batch size x accumulation x processes)"
        )
    total_steps = cfg.max_steps if cfg.max_steps > 0 else steps_per_epoch * cfg.num_train_epochs

    # model, optimizer, schedule; weight decay on matrices only
    model = model_lib.DPOModel(model_lib.load_model(cfg), cfg)
    if tp is not None:
        tp.shard_head(model, model.hf_model, accelerator.device)
    objective = model.objective  # read before accelerate wraps the model
    metric_names = objective_lib.metric_names(objective)
    num_sums = len(metric_names) + 1 + 2 * len(hf.TOKEN_METRICS)

    def sums_of(out: model_lib.StepOutput) -> torch.Tensor:
        """(num_sums,) float64: the pair metrics summed over the batch's pairs, the pair count, the token sums."""
        return torch.cat([out.pair_sums, out.token_sums.to(out.pair_sums)])

    def means(sums: torch.Tensor) -> dict[str, float]:
        """The pair metrics (means over pairs) and the token metrics (means over completion tokens) of summed sums."""
        count = len(metric_names)
        values = dict(zip(metric_names, (sums[:count] / sums[count]).tolist()))
        return {**values, **hf.token_metric_means(sums[count + 1 :])}

    if cfg.prefix_sharing:
        model_lib.check_prefix_sharing(model.hf_model, accelerator.device)
    optimizer = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay),
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
    )
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, cfg.warmup_steps, total_steps)
    frozen = None
    if cfg.reference_mode == "model":

        def rebuild() -> model_lib.DPOModel:  # ZeRO-3's copy: built as the policy was, the run's generators untouched
            with torch.random.fork_rng():
                return model_lib.DPOModel(model_lib.load_model(cfg), cfg)

        frozen = reference.frozen_copy(model, rebuild)
    policy = model.hf_model
    # under ZeRO-3 the head's weight, read (not called) in the wrapped module's forward, is gathered there by
    # DeepSpeed (an "external parameter" of that module) and again before its backward: the forward returns a
    # ModelOutput (model.StepOutput), whose loss DeepSpeed's hooks see
    if tp is None:
        model, optimizer = accelerator.prepare(model, optimizer)
        accelerator.print(parallel.describe(accelerator, model, policy))
    else:
        model, optimizer = tp.prepare(accelerator, model, optimizer)
        accelerator.print(tp.describe(accelerator, policy))

    # the reference is taken from the initial weights, before any checkpoint is loaded
    ref_logps = reference.build(cfg, model, data_acc, splits, tokenizer.pad_token_id, frozen)
    start_step = 0
    if resume is not None:
        state = checkpoint.load(resume, accelerator, model, optimizer, scheduler)
        if state["steps_per_epoch"] != steps_per_epoch:
            raise ValueError(
                f"checkpoint {str(resume)!r} ran {state['steps_per_epoch']} steps per epoch, this run "
                f"{steps_per_epoch}: resume with the same data, batch size, accumulation and process count"
            )
        start_step = state["step"]
        accelerator.print(f"resuming from {resume} at step {start_step}")
    output.start(cfg.output_dir, start_step, accelerator)  # the folder now holds the run as of start_step
    trackers.start(accelerator, cfg, start_step)

    def log(record: dict) -> None:
        if accelerator.is_main_process:
            output.append(cfg.output_dir, record)
        trackers.log(accelerator, record)  # report_to's trackers, the same record

    def collate(split: str, rows: list[int]) -> dict:
        batch = data.collate(splits[split][rows], cfg.padding_free, tokenizer.pad_token_id, cfg.prefix_sharing)
        return data.to_device(batch, accelerator.device)

    kl_on = objective_lib.kl_needs_live_reference(cfg)

    def kl_of(split: str, rows: list[int]) -> torch.Tensor | None:
        """KTO's KL estimate of a micro-batch, as TRL's KTOTrainer: the policy's (no grad) and the reference's
        summed log-probs of its mismatched sequences, mean difference over the processes, clamped at 0."""
        if not kl_on:
            return None
        mismatched = data.mismatched(splits[split][rows], cfg.max_length)
        batch = data.to_device(data.collate(mismatched, cfg.padding_free, tokenizer.pad_token_id), accelerator.device)
        with torch.no_grad():
            difference = (model(**batch) - ref_logps(split, rows, batch)).double().mean()
        return data_acc.reduce(difference, "mean").clamp(min=0)

    def evaluate(step: int) -> dict[str, float]:
        sums = torch.zeros(num_sums, dtype=torch.float64, device=accelerator.device)
        model.eval()
        with torch.no_grad():
            batches = data.eval_batches(len(splits["eval"]), cfg.per_device_eval_batch_size)
            for rows, counted in data.shard(batches, data_acc):
                batch = collate("eval", rows)
                out = model(**batch, ref_logps=ref_logps("eval", rows, batch), kl=kl_of("eval", rows))
                sums += sums_of(out) if counted else 0
        model.train()
        record = {"eval_" + name: value for name, value in means(data_acc.reduce(sums, "sum")).items()}
        log({"step": step, "epoch": step / steps_per_epoch, **record})
        return record

    # the loop
    model.train()
    last = {}
    window = torch.zeros(num_sums, dtype=torch.float64, device=accelerator.device)
    progress = tqdm(total=total_steps, initial=start_step, desc=cfg.objective, disable=not accelerator.is_main_process)
    for step in range(start_step, total_steps):
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        order = data.epoch_batches(len(train_rows), cfg.per_device_train_batch_size, cfg.seed, epoch)
        for micro in range(cfg.gradient_accumulation_steps):
            rows = order[(step_in_epoch * cfg.gradient_accumulation_steps + micro) * data_acc.num_processes
                         + data_acc.process_index]  # fmt: skip
            batch = collate("train", rows)
            ref = ref_logps("train", rows, batch)
            kl = kl_of("train", rows)
            last_micro = micro == cfg.gradient_accumulation_steps - 1
            if zero_stage is not None:
                # the engine scales the loss by its accumulation steps (the run's), and at the last micro-batch
                # reduces the gradients, clips them (max_grad_norm), steps the optimizer and zeroes the gradients
                out = model(**batch, ref_logps=ref, kl=kl)
                model.set_gradient_accumulation_boundary(last_micro)
                model.backward(out.loss)
                model.step()
            else:
                with nullcontext() if last_micro else accelerator.no_sync(model):
                    out = model(**batch, ref_logps=ref, kl=kl)
                    accelerator.backward(out.loss / cfg.gradient_accumulation_steps)
            window += sums_of(out)
        if tp is not None:  # the all-reduce a data-parallel wrapper would have made, over tensor_parallel's replicas
            tp.average_gradients(model.parameters())
        clip = cfg.max_grad_norm > 0
        if zero_stage is not None:
            grad_norm = model.get_global_grad_norm() if clip else None  # the norm before clipping, as below
        else:
            clip_grad_norm_ = accelerator.clip_grad_norm_ if tp is None else tp.clip_grad_norm_
            grad_norm = clip_grad_norm_(model.parameters(), cfg.max_grad_norm) if clip else None
        if isinstance(grad_norm, DTensor):  # FSDP2
            grad_norm = grad_norm.full_tensor()
        learning_rate = scheduler.get_last_lr()[0]
        if zero_stage is None:  # DeepSpeed's engine stepped at the last micro-batch
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        done = step + 1
        progress.update(1)

        if done % cfg.logging_steps == 0 or done == total_steps:
            last = means(data_acc.reduce(window, "sum"))
            window.zero_()
            extra = {} if grad_norm is None else {"grad_norm": float(grad_norm)}  # DeepSpeed's is a float
            log({"step": done, "epoch": done / steps_per_epoch, "learning_rate": learning_rate, **extra, **last})
            accuracy = {"acc": f"{last['rewards/accuracies']:.2f}"} if "rewards/accuracies" in last else {}
            progress.set_postfix(loss=f"{last['loss']:.4f}", **accuracy)
        if "eval" in splits and ((cfg.eval_steps and done % cfg.eval_steps == 0) or done == total_steps):
            last.update(evaluate(done))
        if (cfg.save_steps and done % cfg.save_steps == 0) or done == total_steps:
            position = {"epoch": epoch, "step_in_epoch": step_in_epoch + 1, "steps_per_epoch": steps_per_epoch}
            checkpoint.save(accelerator, model, optimizer, scheduler, tokenizer, cfg, {"step": done, **position})
    progress.close()
    accelerator.print(json.dumps(last, indent=2))
    accelerator.end_training()
    return last


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW's parameter groups: weight decay on the trainable matrices, none on the vectors; no empty group.

    A parameter's dimensions are its full shape's: under ZeRO-3 each is a 1-D placeholder of its partition
    (``ds_shape`` holds the shape), and an empty group would leave DeepSpeed's optimizer with fewer groups than the
    schedule.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in trainable if len(getattr(p, "ds_shape", p.shape)) >= 2]
    vectors = [p for p in trainable if len(getattr(p, "ds_shape", p.shape)) < 2]
    groups = [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def _tokenized(key: str, source: str, split: str, tokenizer, cfg: TrainConfig):
    rows = data.load_rows(source, split, key)
    return data.tokenize(rows, tokenizer, cfg.max_length, cfg.max_prompt_length, source)
