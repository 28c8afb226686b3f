"""The run's configuration: one flat dataclass, read from a YAML/JSON file and overridden by flags.

Names follow TRL's ``DPOConfig`` where TRL has the knob (``learning_rate``,
``per_device_train_batch_size``, ``max_prompt_length``, ``padding_free``, ...), so a TRL config
ports by copying keys. Relative paths in a config file (``model``, ``tokenizer``, ``dataset``,
``eval_dataset``) are resolved against the file's folder when they exist there; anything else
(a hub name, a path relative to the working directory) is kept as written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..objectives import LOSS_TYPES

DEFAULT_DIR = Path(__file__).resolve().parent / "default"
DEFAULT_CONFIG = DEFAULT_DIR / "config.yaml"
REFERENCE_MODES = ("precompute", "model", "adapters", "none")
PATH_KEYS = ("model", "tokenizer", "dataset", "eval_dataset")


def _default_cache_dir() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpo_fast" / "reference_logps")


@dataclass
class TrainConfig:
    """Every knob of a run. ``help`` in each field's metadata becomes the CLI flag's help."""

    # model
    model: str = field(default="", metadata={"help": "HF model folder, hub name, or a config .json (random init)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder or hub name (default: model)"})
    dtype: str = field(default="float32", metadata={"help": "weights dtype: float32 | bfloat16 | float16"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "PEFT target_modules"})
    # data
    dataset: str = field(default="", metadata={"help": "JSON/JSONL/Parquet file, or a hub dataset name"})
    dataset_split: str = field(default="train", metadata={"help": "split of a hub dataset"})
    eval_dataset: str | None = field(default=None, metadata={"help": "held-out file or hub name (none: no eval)"})
    eval_split: str = field(default="test", metadata={"help": "split of a hub eval dataset"})
    max_length: int | None = field(default=1024, metadata={"help": "prompt + completion tokens (keeps the start)"})
    max_prompt_length: int | None = field(default=512, metadata={"help": "prompt tokens kept (keeps the end)"})
    padding_free: bool = field(default=False, metadata={"help": "pack each batch into one row with segment_ids"})
    # objective and reference
    beta: float = field(default=0.1, metadata={"help": "DPO beta"})
    loss_type: str = field(default="sigmoid", metadata={"help": f"one of {', '.join(LOSS_TYPES)}"})
    label_smoothing: float = field(default=0.0, metadata={"help": "cDPO / robust label smoothing"})
    reference: str = field(default="precompute", metadata={"help": f"one of {', '.join(REFERENCE_MODES)}"})
    reference_cache_dir: str = field(default_factory=_default_cache_dir, metadata={"help": "precomputed log-probs"})
    backend: str = field(default="auto", metadata={"help": "dpo_fast backend: auto | torch | triton | reference"})
    # optimization
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers.get_scheduler name"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "pairs per micro-batch per process"})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "pairs per eval batch per process"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1: num_train_epochs of the data"})
    num_train_epochs: int = field(default=1, metadata={"help": "epochs when max_steps is -1"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (mixed precision)"})
    seed: int = field(default=42, metadata={"help": "seed of init, data order and dropout"})
    # bookkeeping
    output_dir: str = field(default="dpo-fast-output", metadata={"help": "metrics.jsonl and checkpoints"})
    logging_steps: int = field(default=10, metadata={"help": "log every N steps"})
    eval_steps: int = field(default=0, metadata={"help": "eval every N steps (0: at the end only)"})
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N steps (0: at the end only)"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept (0: all)"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "checkpoint folder, or 'auto'"})

    def __post_init__(self):
        _check(self)


def load_config(path: str | os.PathLike | None = None, **overrides) -> TrainConfig:
    """Read a YAML or JSON config (the bundled default when ``path`` is None), then apply overrides.

    ``overrides`` replace the file's values (None included: ``max_length=None`` turns truncation
    off). Unknown keys raise, naming the key.
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise TypeError(f"config file {str(path)!r} must hold a mapping of keys to values")
    for key in PATH_KEYS:
        if isinstance(values.get(key), str) and (path.parent / values[key]).exists():
            values[key] = str((path.parent / values[key]).resolve())
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} in {str(path)!r}; known keys: {sorted(known)}")
    return TrainConfig(**values)


def _check(cfg: TrainConfig) -> None:
    if not cfg.model:
        raise ValueError("model is required: an HF model folder, a hub name, or a config .json")
    if not cfg.dataset:
        raise ValueError("dataset is required: a JSON/JSONL/Parquet file or a hub dataset name")
    if cfg.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {cfg.loss_type!r}")
    if cfg.reference not in REFERENCE_MODES:
        raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {cfg.reference!r}")
    if cfg.reference == "adapters" and cfg.lora_r <= 0:
        raise ValueError("reference='adapters' needs a LoRA policy: set lora_r > 0, or pick another reference")
    if cfg.max_length is not None and (cfg.max_prompt_length is None or not 0 < cfg.max_prompt_length < cfg.max_length):
        raise ValueError(
            f"max_prompt_length must be set and in (0, max_length={cfg.max_length}) so every completion keeps "
            f"a token, got {cfg.max_prompt_length}; or set max_length to null to turn truncation off"
        )
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be >= 1, got {getattr(cfg, key)}")
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise ValueError(f"max_steps must be -1 (use num_train_epochs) or >= 1, got {cfg.max_steps}")
