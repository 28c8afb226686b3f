"""Experiment trackers (``report_to``): TensorBoard, Weights & Biases and trackio through accelerate's trackers.

``report_to: tensorboard`` (or ``wandb``, ``trackio``, several separated by commas or a YAML list; ``none`` by
default) makes the run's ``Accelerator`` log with them (``Accelerator(log_with=...)``): every record the run writes
to ``metrics.jsonl`` also goes to each tracker, under the same names, at its ``step``; ``metrics.jsonl`` is written
as before. The run's config is each tracker's hyperparameters. Where each writes:

- ``tensorboard``: event files in ``<output_dir>/dpo-fast/``. A run starting at step S (0: fresh, else resumed)
  opens them with ``purge_step=S+1``, so TensorBoard hides what an earlier run there logged after step S, as
  ``metrics.jsonl`` is cut back to step S;
- ``wandb``: the project ``dpo-fast``, a run named after ``output_dir``'s folder, its files in ``<output_dir>/wandb/``
  (``WANDB_MODE=offline`` keeps it on disk);
- ``trackio``: the project ``dpo-fast``, a run named after ``output_dir``'s folder, in trackio's own store.

Logging happens on the main process only (accelerate's trackers do nothing elsewhere).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import is_tensorboard_available, is_trackio_available, is_wandb_available

from .config import TrainConfig

PROJECT = "dpo-fast"
# tracker -> (is it importable, the package to install)
TRACKERS = {
    "tensorboard": (is_tensorboard_available, "tensorboard"),
    "wandb": (is_wandb_available, "wandb"),
    "trackio": (is_trackio_available, "trackio"),
}


def names(report_to: str) -> list[str]:
    """The trackers ``report_to`` names (``"tensorboard,wandb"`` -> both), in order; ``"none"`` -> []."""
    return [] if report_to == "none" else report_to.split(",")


def check(cfg: TrainConfig) -> None:
    """A ``ValueError`` naming the package to install when a tracker ``cfg.report_to`` names is not importable."""
    for name in names(cfg.report_to):
        available, package = TRACKERS[name]
        if not available():
            raise ValueError(f"report_to: {name} needs the {package} package: pip install {package}")


def accelerator_kwargs(cfg: TrainConfig) -> dict:
    """The ``Accelerator`` keywords for ``cfg.report_to`` (none for ``none``)."""
    trackers = names(cfg.report_to)
    return {"log_with": trackers, "project_dir": cfg.output_dir} if trackers else {}


def hyperparameters(cfg: TrainConfig) -> dict:
    """The config as a tracker's hyperparameters: every key, a null as the string ``"null"`` (TensorBoard takes
    numbers, strings and booleans only)."""
    return {key: "null" if value is None else value for key, value in dataclasses.asdict(cfg).items()}


def start(accelerator: Accelerator, cfg: TrainConfig, start_step: int) -> None:
    """Start ``cfg.report_to``'s trackers for a run that starts at ``start_step`` (0: fresh); nothing for ``none``."""
    if not names(cfg.report_to):
        return
    run_name = Path(cfg.output_dir).resolve().name
    accelerator.init_trackers(
        PROJECT,
        config=hyperparameters(cfg),
        init_kwargs={
            "tensorboard": {"purge_step": start_step + 1},
            "wandb": {"name": run_name, "dir": cfg.output_dir},
            "trackio": {"name": run_name},
        },
    )


def log(accelerator: Accelerator, record: dict) -> None:
    """Send one ``metrics.jsonl`` record to the trackers: every value but ``step``, at ``step``."""
    if accelerator.trackers:
        accelerator.log({key: value for key, value in record.items() if key != "step"}, step=record["step"])
