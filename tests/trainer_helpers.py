"""What the trainer's tests share: a tiny Llama config, tiny data files, one run in this process, launches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from dpo_fast.trainer import TrainConfig, train
from dpo_fast.trainer.config import DEFAULT_DIR

TESTS = Path(__file__).resolve().parent  # tests/, where the files launched as scripts import from
TOKENIZER = str(DEFAULT_DIR / "tokenizer")
TINY_LLAMA = {"model_type": "llama", "vocab_size": 40, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "tie_word_embeddings": True}  # fmt: skip


def write_tiny_files(folder: Path, train_rows: int = 64, eval_rows: int = 24) -> Path:
    """``model.json`` (TINY_LLAMA) and the first rows of the bundled data as ``train.jsonl``, ``eval.jsonl``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.json").write_text(json.dumps(TINY_LLAMA))
    for name, count in (("train", train_rows), ("eval", eval_rows)):
        lines = (DEFAULT_DIR / f"{name}.jsonl").read_text().splitlines()[:count]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def run_values(files: Path, out: Path, **overrides) -> dict:
    """The config of a tiny run on ``files`` into ``out``; runs beside each other share a reference cache."""
    values = {
        "model": str(files / "model.json"), "tokenizer": TOKENIZER, "dataset": str(files / "train.jsonl"),
        "eval_dataset": str(files / "eval.jsonl"), "output_dir": str(out),
        "reference_cache_dir": str(out.parent / "cache"), "max_length": 32, "max_prompt_length": 16,
        "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8, "learning_rate": 3e-3, "max_steps": 6,
        "logging_steps": 1, "seed": 0,
    }  # fmt: skip
    return {**values, **overrides}


def run(files: Path, out: Path, **overrides) -> list[dict]:
    """Train on the tiny files in this process; returns the run's metrics.jsonl records."""
    try:
        train(TrainConfig(**run_values(files, out, **overrides)))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return logged(out)


def logged(out: Path) -> list[dict]:
    """The records of ``<out>/metrics.jsonl``."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_records(records):
    return [r for r in records if "loss" in r]


def weights(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted((checkpoint_dir / "model").glob("*.safetensors")) for k, v in load_file(f).items()}


def flags(values: dict) -> list[str]:
    """``values`` as ``dpo-fast train`` flags."""
    out = []
    for key, value in values.items():
        if isinstance(value, bool):
            out.append(f"--{'' if value else 'no-'}{key}")
        else:
            out += [f"--{key}", "null" if value is None else str(value)]
    return out


def cpu_env() -> dict:
    """The environment of CPU processes: one thread each, no GPU seen (DeepSpeed's CPU accelerator); gloo is set up by
    ``dpo_fast.trainer.parallel.setup_cpu_processes``, for DDP, FSDP2 and DeepSpeed alike (no ACCELERATE_USE_CPU)."""
    env = {key: value for key, value in os.environ.items() if key != "ACCELERATE_USE_CPU"}
    # a test file launched as a script (tests/<layer>/test_x.py) imports what tests/ holds, as under pytest
    path = os.pathsep.join([str(TESTS), *filter(None, [env.get("PYTHONPATH")])])
    return {**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "PYTHONPATH": path}


def launch(processes: int, launcher_flags: list[str], program: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``program`` (``-m module ...`` or ``script.py ...``) on CPU processes; output kept."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), *launcher_flags, *program]  # fmt: skip
    done = subprocess.run(command, check=False, env=cpu_env(), capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        )
    return done


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
