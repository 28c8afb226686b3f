"""The run's configuration: one flat dataclass, read from a YAML/JSON file and overridden by flags.

Names follow TRL's ``DPOConfig`` where TRL has the knob (``learning_rate``,
``per_device_train_batch_size``, ``max_prompt_length``, ``padding_free``, ``overwrite_output_dir``,
...), so a TRL config ports by copying keys; ``prefix_sharing`` is dpo_fast's own. Relative paths
in a config file (``model``, ``tokenizer``, ``dataset``, ``eval_dataset``) are resolved against the
file's folder when they exist there; anything else (a hub name, a path relative to the working
directory) is kept as written.

Every value is checked against its field's declared type when the config is made, and coerced
where the intent is plain (``"1e-3"`` -> 0.001 for a float, ``"no"`` -> False for a bool, 8.0 -> 8
for an int): YAML 1.1 reads ``1e-3`` as a string. Anything else raises a ``ValueError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..backends import CHUNKED_BACKENDS
from ..objectives import CPO_LOSS_TYPES, DPO_LOSS_TYPES, KTO_LOSS_TYPES
from ..objectives.elementwise import F_DIVERGENCES
from . import objective as objective_lib

DEFAULT_DIR = Path(__file__).resolve().parent / "default"
DEFAULT_CONFIG = DEFAULT_DIR / "config.yaml"
REFERENCE_MODES = ("precompute", "model", "adapters", "none")
BACKENDS = ("auto", "reference", *CHUNKED_BACKENDS)
DTYPES = ("float32", "bfloat16", "float16")
PATH_KEYS = ("model", "tokenizer", "dataset", "eval_dataset")
# keys that hold a list, written as one string separated by commas (a YAML list is joined so)
LIST_KEYS = ("loss_type", "loss_weights", "report_to")
# report_to's trackers (accelerate's names; trackers.py)
TRACKER_NAMES = ("tensorboard", "wandb", "trackio")
# the smallest value each numeric key takes
MINIMUM = {
    "lora_r": 0, "lora_alpha": 1, "lora_dropout": 0, "label_smoothing": 0, "learning_rate": 0, "weight_decay": 0,
    "adam_beta1": 0, "adam_beta2": 0, "adam_epsilon": 0, "warmup_steps": 0, "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 1, "gradient_accumulation_steps": 1, "max_grad_norm": 0, "num_train_epochs": 1,
    "logging_steps": 1, "eval_steps": 0, "save_steps": 0, "save_total_limit": 0, "tensor_parallel": 1,
}  # fmt: skip


def _default_cache_dir() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dpo_fast" / "reference_logps")


@dataclass
class TrainConfig:
    """Every knob of a run. ``help`` in each field's metadata becomes the CLI flag's help and the table of keys
    in docs/training.md (``dpo_fast.trainer.cli.keys_table``); ``default`` there, where given, describes the default."""

    # model
    model: str = field(default="", metadata={"help": "HF model folder, hub name, or a config .json (random init)"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder or hub name; null: the model's"})
    dtype: str = field(default="float32", metadata={"help": f"weights dtype: {' | '.join(DTYPES)}"})
    attn_implementation: str | None = field(
        default=None, metadata={"help": "the model's attention: sdpa | eager | flex_attention | ...; null: its default"}
    )
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "PEFT target_modules: all-linear, or module names separated by commas"}
    )
    # data
    dataset: str = field(default="", metadata={"help": "JSON/JSONL/Parquet file, or a hub dataset name"})
    dataset_split: str = field(default="train", metadata={"help": "split of a hub dataset"})
    eval_dataset: str | None = field(default=None, metadata={"help": "held-out file or hub name; null: no eval"})
    eval_split: str = field(default="test", metadata={"help": "split of a hub eval dataset"})
    max_length: int | None = field(default=1024, metadata={"help": "prompt + completion tokens (keeps the start)"})
    max_prompt_length: int | None = field(default=512, metadata={"help": "prompt tokens kept (keeps the end)"})
    padding_free: bool = field(default=False, metadata={"help": "pack each batch into one row with segment_ids"})
    prefix_sharing: bool = field(
        default=False,
        metadata={"help": "each pair one sequence [prompt][chosen][rejected]: the prompt runs once (with padding_free: "
                  "all pairs in one row)"},
    )  # fmt: skip
    # objective and reference
    objective: str = field(
        default="dpo",
        metadata={"help": "which TRL trainer's loss: dpo (DPOTrainer) | cpo (CPOTrainer: CPO, SimPO, AlphaPO) | orpo "
                  "(ORPOTrainer) | kto (KTOTrainer, on the pairs unpaired); cpo and orpo take no reference"},
    )  # fmt: skip
    beta: float = field(default=0.1, metadata={"help": "the objective's temperature (ORPO: the odds-ratio weight)"})
    loss_type: str | None = field(
        default=None,
        metadata={"help": f"dpo: one of {' | '.join(DPO_LOSS_TYPES)}, or several separated by commas (or a YAML "
                  f"list); cpo: one of {' | '.join(CPO_LOSS_TYPES)}; orpo: null; kto: one of {' | '.join(KTO_LOSS_TYPES)}; "
                  "null: sigmoid (kto: kto)"},
    )  # fmt: skip
    loss_weights: str | None = field(
        default=None, metadata={"help": "dpo: one weight per loss_type, separated by commas; null: 1 each"}
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "dpo: robust's and aot's label smoothing, EXO's epsilon (as TRL's DPOConfig: sigmoid reads "
            "none); cpo: conservative sigmoid and simpo"
        },
    )
    f_divergence_type: str = field(
        default="reverse_kl", metadata={"help": f"dpo: f-DPO's divergence, one of {' | '.join(F_DIVERGENCES)}"}
    )
    f_alpha_divergence_coef: float = field(default=0.5, metadata={"help": "dpo: alpha of alpha_divergence"})
    discopop_tau: float = field(default=0.05, metadata={"help": "dpo: DiscoPOP's temperature"})
    use_weighting: bool = field(default=False, metadata={"help": "dpo: WPO's pair weights"})
    ld_alpha: float | None = field(
        default=None, metadata={"help": "dpo: LD-DPO's weight of completion tokens past the shorter one; null: off"}
    )
    cpo_alpha: float = field(default=1.0, metadata={"help": "cpo: weight of the chosen NLL (SimPO's paper: 0)"})
    simpo_gamma: float = field(default=0.5, metadata={"help": "cpo: SimPO's target margin (loss_type simpo)"})
    alpha: float = field(default=0.0, metadata={"help": "cpo: AlphaPO's reward shape; 0: log-prob rewards"})
    desirable_weight: float = field(default=1.0, metadata={"help": "kto: weight of the desirable (chosen) completions"})
    undesirable_weight: float = field(
        default=1.0, metadata={"help": "kto: weight of the undesirable (rejected) completions"}
    )
    reference: str = field(
        default="auto",
        metadata={"help": f"one of auto | {' | '.join(REFERENCE_MODES)}; auto: precompute where the objective reads a "
                  "reference (dpo, unless loss_type is sft alone; kto: model, adapters with LoRA), none otherwise"},
    )  # fmt: skip
    reference_cache_dir: str = field(
        default_factory=_default_cache_dir,
        metadata={
            "help": "precomputed log-probs",
            "default": "$XDG_CACHE_HOME or ~/.cache, then dpo_fast/reference_logps",
        },
    )
    backend: str = field(
        default="auto",
        metadata={
            "help": f"dpo_fast backend: {' | '.join(BACKENDS)}; auto: triton on CUDA, cpp on CPU once built, else torch"
        },
    )
    # optimization
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW peak learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay, of matrices only"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "any transformers.get_scheduler name"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "pairs per micro-batch per process"})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "pairs per eval batch per process"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1: num_train_epochs of the data"})
    num_train_epochs: int = field(default=1, metadata={"help": "epochs when max_steps is -1"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (mixed precision) over dtype's weights"})
    seed: int = field(default=42, metadata={"help": "seed of init, data order and dropout"})
    tensor_parallel: int = field(
        default=1,
        metadata={"help": "N > 1: the LM head split over the vocabulary across each group of N processes, which take "
                  "the same batches; the launched processes make data-parallel replicas of N (docs/vocab-parallel.md); "
                  "1: off"},
    )  # fmt: skip
    # bookkeeping
    output_dir: str = field(default="dpo-fast-output", metadata={"help": "metrics.jsonl and checkpoints"})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "replace the run in a non-empty output_dir (else a fresh run refuses it)"}
    )
    logging_steps: int = field(default=10, metadata={"help": "log every N steps"})
    report_to: str = field(
        default="none",
        metadata={"help": f"experiment trackers that also get every metrics.jsonl record: {' | '.join(TRACKER_NAMES)} "
                  "| none, or several separated by commas (or a YAML list)"},
    )  # fmt: skip
    eval_steps: int = field(default=0, metadata={"help": "eval every N steps (0: at the end only)"})
    save_steps: int = field(default=0, metadata={"help": "checkpoint every N steps (0: at the end only)"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept (0: all)"})
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "checkpoint folder, or 'auto' (the newest in output_dir; none: start fresh)"}
    )

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in LIST_KEYS and isinstance(value, (list, tuple)):
                value = ",".join(str(item) for item in value)
            setattr(self, f.name, _coerce(f.name, f.type, value))
        _check(self)

    @classmethod
    def default(cls, key: str):
        """The default value of ``key``."""
        f = next(f for f in dataclasses.fields(cls) if f.name == key)
        return f.default_factory() if f.default is dataclasses.MISSING else f.default

    @property
    def reference_mode(self) -> str:
        """``reference`` as the run uses it: set, or ``precompute`` where the objective reads a reference, else ``none``."""
        if self.reference != "auto":
            return self.reference
        if not objective_lib.needs_reference(self):
            return "none"
        if objective_lib.kl_needs_live_reference(self):
            return "adapters" if self.lora_r > 0 else "model"
        return "precompute"


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
        raise ValueError(f"config file {str(path)!r} must hold a mapping of keys to values")  # noqa: TRY004 (user input)
    for key in PATH_KEYS:
        if isinstance(values.get(key), str) and (path.parent / values[key]).exists():
            values[key] = str((path.parent / values[key]).resolve())
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} in {str(path)!r}; known keys: {sorted(known)}")
    return TrainConfig(**values)


_KINDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string"}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(key: str, declared: str, value):
    """``value`` as the declared type of field ``key`` (``"int"``, ``"str | None"``, ...), or a ``ValueError``."""
    kind, _, rest = declared.partition(" | ")
    nullable = rest == "None"
    if nullable and (value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none"))):
        return None
    expected = _KINDS[kind] + (" or null" if nullable else "")
    wrong = ValueError(f"{key} must be {expected}, got {value!r} ({type(value).__name__})")
    if kind == "str":
        if not isinstance(value, str):
            raise wrong
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise wrong
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise wrong
    if kind == "int" and isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    try:
        number = float(value)
    except ValueError:
        raise wrong from None
    if not math.isfinite(number):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    if kind == "float":
        return number
    if isinstance(value, int):
        return value
    if not number.is_integer():
        raise wrong
    return int(number)


def _check(cfg: TrainConfig) -> None:
    if not cfg.model:
        raise ValueError("model is required: an HF model folder, a hub name, or a config .json")
    if not cfg.dataset:
        raise ValueError("dataset is required: a JSON/JSONL/Parquet file or a hub dataset name")
    if not cfg.output_dir:
        raise ValueError("output_dir must name a folder")
    for key, least in MINIMUM.items():
        if getattr(cfg, key) < least:
            raise ValueError(f"{key} must be >= {least}, got {getattr(cfg, key)}")
    for key in ("adam_beta1", "adam_beta2", "lora_dropout"):
        if not getattr(cfg, key) < 1:
            raise ValueError(f"{key} must be < 1, got {getattr(cfg, key)}")
    objective = objective_lib.build(cfg)
    for key, allowed in (("reference", ("auto", *REFERENCE_MODES)), ("backend", BACKENDS), ("dtype", DTYPES)):
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{key} must be one of {' | '.join(allowed)}, got {getattr(cfg, key)!r}")
    if cfg.reference not in ("auto", "none") and not objective.needs.reference:
        what = "loss_type='sft' alone" if cfg.objective == "dpo" else f"objective={cfg.objective!r}"
        raise ValueError(
            f"reference={cfg.reference!r} conflicts with {what}, which reads no reference: remove reference (or set "
            "it to auto or none)"
        )
    if cfg.reference == "precompute" and objective_lib.kl_needs_live_reference(cfg):
        raise ValueError(
            "reference='precompute' cannot serve objective='kto' with loss_type='kto': its KL estimate pairs each "
            "prompt with another completion of the same micro-batch, which changes every epoch; set reference to "
            "model or adapters (or auto)"
        )
    if cfg.objective == "kto" and cfg.prefix_sharing:
        raise ValueError("prefix_sharing: objective='kto' runs single completions, no pairs to share a prompt; set "
                         "prefix_sharing to false")  # fmt: skip
    if cfg.objective == "orpo" and cfg.prefix_sharing:
        raise ValueError(
            "prefix_sharing: objective='orpo' takes its NLL over the chosen prompt tokens too (as TRL's ORPOTrainer), "
            "which the shared layout scores once for both completions; set prefix_sharing to false"
        )
    if cfg.reference_mode == "adapters" and cfg.lora_r <= 0:
        raise ValueError("reference='adapters' needs a LoRA policy: set lora_r > 0, or pick another reference")
    if cfg.max_length is not None and (cfg.max_prompt_length is None or not 0 < cfg.max_prompt_length < cfg.max_length):
        raise ValueError(
            f"max_prompt_length must be set and in (0, max_length={cfg.max_length}) so every completion keeps "
            f"a token, got {cfg.max_prompt_length}; or set max_length to null to turn truncation off"
        )
    trackers = [] if cfg.report_to == "none" else cfg.report_to.split(",")
    if any(name not in TRACKER_NAMES for name in trackers) or len(set(trackers)) < len(trackers):
        raise ValueError(
            f"report_to must be none, or one or more of {' | '.join(TRACKER_NAMES)} separated by commas (each once), "
            f"got {cfg.report_to!r}"
        )
    if cfg.max_steps == 0 or cfg.max_steps < -1:
        raise ValueError(f"max_steps must be -1 (use num_train_epochs) or >= 1, got {cfg.max_steps}")
