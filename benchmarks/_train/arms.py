"""The training arms: whatever runs a DPO step, from fresh models, for a list of batch shapes.

``run(arm, config, shapes, device, gradient_checkpointing)`` trains ``len(shapes)`` optimizer
steps, step ``i`` on a batch of ``shapes[i]`` (``models.Shape``; every shape has the same number
of pairs), on a randomly initialised Llama from ``config`` (LlamaConfig keywords) and a frozen
copy as the live reference model; float32 on CPU, bf16 on CUDA; AdamW, learning rate 1e-6, beta 0.1.
The plain loops step with the optimizer TRL's trainer builds by default (transformers'
``adamw_torch_fused``: ``torch.optim.AdamW(fused=True)``, which allocates no temporaries; the
unfused one allocates up to twice the largest parameter during the update).
Nothing here measures: ``steps.StepWindows`` does, from outside, the same for every arm.

The arms (``ARMS``):

- ``trl``: TRL 1.16's ``DPOTrainer`` with its default LM head, the fused
  ``trl/kernels/chunked_logprob.py`` (log-probs, entropy, mean logit and top-1 per token);
- ``trl-liger``: the same with ``use_liger_kernel=True``: TRL 1.16 then applies Liger's layer
  kernels (RMSNorm, RoPE, SwiGLU, in Triton, so CUDA only) and keeps its own fused head;
- ``liger``: Liger-Kernel 0.8.5's fused DPO loss, ``LigerFusedLinearDPOLoss`` (the head and loss TRL
  ran for ``use_liger_kernel`` before 1.0; ``compiled=False`` on CPU), on the model's last hidden
  states and the reference's, in a plain loop; a chunk is one pair, whose ``[2, T, V]`` float32
  logits it holds;
- ``naive``: the full-logits step in a plain loop: ``h W^T`` for every position, ``log_softmax``,
  gather, the sigmoid DPO loss, autograd;
- ``body``: the model without its head, in a plain loop (the loss a fixed linear function of the
  last hidden states): what an arm's memory is beside its head;
- ``fast``: ``dpo_fast.integrations.trl.FastDPOTrainer`` (TRL's loop, dpo_fast's head and loss),
  its default token metrics on; ``fast-nometrics``: ``token_metrics=False``; ``fast-shared``:
  ``prefix_sharing=True`` (a pair's prompt runs once);
- ``dpo-fast-cli``: the lean trainer, ``dpo-fast train`` (its ``main``, in this process, with
  ``reference: model``); ``dpo-fast-cli-shared``: the same with ``prefix_sharing: true``.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from _train.models import PAD, Shape, build_models, enable_checkpointing, preference_rows, token_batch, tokenizer

BETA = 0.1
LEARNING_RATE = 1e-6


@dataclass(frozen=True)
class Arm:
    """An arm: ``runner`` is ``trainer`` (TRL's loop), ``cli`` (``dpo-fast train``) or ``loop`` (a plain loop)."""

    name: str
    runner: str
    description: str
    prefix_sharing: bool = False
    token_metrics: bool = True


ARMS = {arm.name: arm for arm in (
    Arm("trl", "trainer", "TRL DPOTrainer (its fused LM head)"),
    Arm("trl-liger", "trainer", "TRL DPOTrainer, use_liger_kernel=True"),
    Arm("liger", "loop", "Liger's fused DPO loss (LigerFusedLinearDPOLoss)"),
    Arm("naive", "loop", "naive step (full logits)"),
    Arm("body", "loop", "the body alone (no LM head)"),
    Arm("fast", "trainer", "FastDPOTrainer"),
    Arm("fast-nometrics", "trainer", "FastDPOTrainer, token_metrics=False", token_metrics=False),
    Arm("fast-shared", "trainer", "FastDPOTrainer, prefix_sharing=True", prefix_sharing=True),
    Arm("dpo-fast-cli", "cli", "dpo-fast train"),
    Arm("dpo-fast-cli-shared", "cli", "dpo-fast train, prefix_sharing: true", prefix_sharing=True),
)}  # fmt: skip


def unavailable(name: str, device: str) -> str | None:
    """Why ``name`` cannot run here, or None."""
    arm = ARMS[name]
    missing = {module: importlib.util.find_spec(module) is None for module in ("trl", "liger_kernel")}
    if arm.runner == "trainer" and missing["trl"]:
        return "trl is not installed"
    if name in ("trl-liger", "liger") and missing["liger_kernel"]:
        return "liger-kernel is not installed"
    if name == "trl-liger" and not device.startswith("cuda"):
        return ("TRL 1.16's use_liger_kernel applies Liger's Triton layer kernels (RMSNorm, RoPE, SwiGLU), which need "
                "a CUDA GPU; its LM head stays TRL's own fused head, measured by the trl arm")  # fmt: skip
    if arm.runner == "cli" and importlib.util.find_spec("dpo_fast.trainer") is None:
        return "the lean trainer (dpo_fast.trainer, `dpo-fast train`) is not installed"
    return None


def run(name: str, config: dict, shapes: list[Shape], device: str, gradient_checkpointing: bool) -> None:
    """Train ``len(shapes)`` steps of arm ``name``, step ``i`` on ``shapes[i]``, from fresh models."""
    if len({shape.pairs for shape in shapes}) != 1:
        raise ValueError(f"every step of a run takes the same number of pairs, not {[s.pairs for s in shapes]}")
    arm = ARMS[name]
    runner = {"trainer": _run_trainer, "cli": _run_cli, "loop": _run_loop}[arm.runner]
    runner(arm, config, shapes, device, gradient_checkpointing)


def _dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def _run_trainer(arm: Arm, config: dict, shapes: list[Shape], device: str, gradient_checkpointing: bool) -> None:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    cuda = device.startswith("cuda")
    policy, reference = build_models(config, device, _dtype(device))
    rows = [row for index, shape in enumerate(shapes) for row in preference_rows(shape, seed=index)]
    with tempfile.TemporaryDirectory() as output_dir:
        args = DPOConfig(
            output_dir=output_dir, per_device_train_batch_size=shapes[0].pairs, max_steps=len(shapes),
            max_length=None, beta=BETA, learning_rate=LEARNING_RATE, gradient_checkpointing=gradient_checkpointing,
            bf16=cuda, use_cpu=not cuda, train_sampling_strategy="sequential", use_liger_kernel=arm.name == "trl-liger",
            logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
        )  # fmt: skip
        trainer_class, options = DPOTrainer, {}
        if arm.name.startswith("fast"):
            from dpo_fast.integrations.trl import FastDPOTrainer

            trainer_class = FastDPOTrainer
            options = {"token_metrics": arm.token_metrics, "prefix_sharing": arm.prefix_sharing}
        trainer = trainer_class(model=policy, ref_model=reference, args=args, processing_class=tokenizer(),
                                train_dataset=Dataset.from_list(rows), **options)  # fmt: skip
        trainer.train()


def _cli_rows(shapes: list[Shape]) -> list[dict]:
    """The rows of the run's dataset, placed so that the lean trainer's step ``i`` takes those of ``shapes[i]``.

    Its batches are a seeded permutation of the rows (``dpo_fast.trainer.data.epoch_batches``, seed 0,
    epoch 0); with every shape alike the order does not matter. The probe checks the tokens each
    step embedded, so a change of that order shows as a failed measurement, not a wrong one.
    """
    per_step = [preference_rows(shape, seed=index) for index, shape in enumerate(shapes)]
    if all(shape == shapes[0] for shape in shapes):
        return [row for rows in per_step for row in rows]
    from dpo_fast.trainer.data import epoch_batches

    rows: list[dict | None] = [None] * sum(len(step_rows) for step_rows in per_step)
    for step_rows, indices in zip(per_step, epoch_batches(len(rows), shapes[0].pairs, 0, 0), strict=False):
        for row, index in zip(step_rows, indices, strict=True):
            rows[index] = row
    return rows


def _run_cli(arm: Arm, config: dict, shapes: list[Shape], device: str, gradient_checkpointing: bool) -> None:
    from transformers import LlamaConfig

    from dpo_fast.trainer import cli

    cuda = device.startswith("cuda")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        tokenizer(work / "tokenizer")
        LlamaConfig(**config).to_json_file(work / "model.json")
        with open(work / "train.jsonl", "w") as rows:
            rows.writelines(json.dumps(row) + "\n" for row in _cli_rows(shapes))
        settings = {
            "tokenizer": str(work / "tokenizer"), "dtype": "bfloat16" if cuda else "float32", "bf16": cuda,
            "attn_implementation": "sdpa", "gradient_checkpointing": gradient_checkpointing, "reference": "model",
            "per_device_train_batch_size": shapes[0].pairs, "max_length": None, "max_prompt_length": None,
            "beta": BETA, "learning_rate": LEARNING_RATE, "logging_steps": 1, "seed": 0,
            "prefix_sharing": arm.prefix_sharing, "backend": "auto",
        }  # fmt: skip
        (work / "config.json").write_text(json.dumps(settings))
        status = cli.main(["train", "--config", str(work / "config.json"), "--model", str(work / "model.json"),
                           "--dataset", str(work / "train.jsonl"), "--output-dir", str(work / "output"),
                           "--max-steps", str(len(shapes))])  # fmt: skip
        if status != 0:
            raise RuntimeError(f"dpo-fast train exited with {status}")


def _sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(rows,) summed log-probs of the labels from all ``rows x T x V`` float32 logits."""
    logps = (hidden.float() @ weight.float().T).log_softmax(-1)
    picked = logps.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (labels != -100)).sum(-1)


def _naive_loss(hidden, ref_hidden, weight, ref_weight, labels) -> torch.Tensor:
    with torch.no_grad():
        ref = _sequence_logps(ref_hidden, ref_weight, labels)
    policy = _sequence_logps(hidden, weight, labels)
    pairs = len(policy) // 2
    margin = (policy[:pairs] - ref[:pairs]) - (policy[pairs:] - ref[pairs:])
    return -F.logsigmoid(BETA * margin).mean()


def _liger_loss(hidden, ref_hidden, weight, ref_weight, labels) -> torch.Tensor:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss = LigerFusedLinearDPOLoss(beta=BETA, compiled=hidden.is_cuda, use_ref_model=True)
    return loss(weight, hidden, labels, ref_input=ref_hidden, ref_weight=ref_weight)[0]


def _body_loss(hidden, ref_hidden, weight, ref_weight, labels) -> torch.Tensor:
    direction = torch.randn(hidden.shape[-1], generator=torch.Generator().manual_seed(0)).to(hidden)
    return (hidden * direction).float().sum() / hidden.shape[0]


LOOP_LOSSES = {"naive": _naive_loss, "liger": _liger_loss, "body": _body_loss}


def _run_loop(arm: Arm, config: dict, shapes: list[Shape], device: str, gradient_checkpointing: bool) -> None:
    policy, reference = build_models(config, device, _dtype(device))
    if gradient_checkpointing:
        enable_checkpointing(policy)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LEARNING_RATE, fused=True)  # as TRL's trainer (above)
    loss_of = LOOP_LOSSES[arm.name]
    for index, shape in enumerate(shapes):
        ids, labels = (tensor.to(device) for tensor in token_batch(shape, seed=index))
        mask = (ids != PAD).long()
        with torch.no_grad():
            ref_hidden = reference.model(input_ids=ids, attention_mask=mask).last_hidden_state
        hidden = policy.model(input_ids=ids, attention_mask=mask).last_hidden_state
        loss_of(hidden, ref_hidden, policy.lm_head.weight, reference.lm_head.weight, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
