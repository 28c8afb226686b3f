"""The output folder of a run: what a fresh, overwriting or resumed run accepts there, and the metrics log.

- A fresh run refuses an ``output_dir`` that holds anything, unless ``overwrite_output_dir``: then
  the old run's ``metrics.jsonl`` and checkpoints are deleted (other files are left alone).
- ``resume_from_checkpoint: auto`` continues from the newest whole checkpoint in ``output_dir``, or
  starts fresh when there is none (a run killed before its first checkpoint).
- A resumed run makes the folder match the state it resumes: ``metrics.jsonl`` is cut back to the
  checkpoint's step (a line torn by a kill mid-write is dropped), and checkpoints of later steps,
  left by a run that went on past the resumed one, are refused unless ``overwrite_output_dir``
  deletes them; otherwise checkpoint pruning would keep the old run's and delete the new run's.

Nothing is created or deleted before the run has its data and model: a run that stops on a user
error leaves no empty ``output_dir`` behind and the old run intact.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from accelerate import Accelerator

from . import checkpoint
from .config import TrainConfig

LOG_NAME = "metrics.jsonl"


def resume_point(cfg: TrainConfig) -> Path | None:
    """The checkpoint this run resumes from (None: a fresh start), or a ``ValueError`` when the folder does not fit."""
    output_dir = Path(cfg.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir {cfg.output_dir!r} is a file, not a folder")
    if cfg.resume_from_checkpoint is None:
        entries = sorted(path.name for path in output_dir.iterdir()) if output_dir.is_dir() else []
        if entries and not cfg.overwrite_output_dir:
            shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
            raise ValueError(
                f"output_dir {cfg.output_dir!r} is not empty ({shown}): pass --resume-from-checkpoint auto to "
                "continue the run there, --overwrite-output-dir to replace it, or choose another output_dir"
            )
        return None
    if cfg.resume_from_checkpoint == "auto":
        resume = checkpoint.latest(output_dir)
        if resume is None:
            return None
    else:
        resume = Path(cfg.resume_from_checkpoint)
    step = checkpoint.trainer_state(resume)["step"]
    later = [path.name for later_step, path in checkpoint.checkpoints(output_dir) if later_step > step]
    if later and not cfg.overwrite_output_dir:
        raise ValueError(
            f"output_dir {cfg.output_dir!r} holds checkpoints after step {step} ({', '.join(later)}) of a run that "
            f"went on past {str(resume)!r}: pass --overwrite-output-dir to delete them, or resume into another output_dir"
        )
    return resume


def start(output_dir: str | Path, step: int, accelerator: Accelerator) -> None:
    """Make ``output_dir`` hold the run as of ``step`` (0: fresh): later checkpoints, partial ones and log lines go."""
    output_dir = Path(output_dir)
    if accelerator.is_main_process and output_dir.is_dir():
        for later_step, path in checkpoint.checkpoints(output_dir):
            if later_step > step:
                shutil.rmtree(path)
        for partial in output_dir.glob(".checkpoint-*.partial"):
            shutil.rmtree(partial)
        _truncate_log(output_dir / LOG_NAME, step)
    accelerator.wait_for_everyone()


def append(output_dir: str | Path, record: dict) -> None:
    """Add one record to ``<output_dir>/metrics.jsonl`` (the folder is made on the first write)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(output_dir) / LOG_NAME, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path: Path) -> tuple[list[dict], int]:
    """The whole records of a metrics log, and the number of lines that were not (a write cut short)."""
    records, torn = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            torn += 1
    return records, torn


def _truncate_log(path: Path, step: int) -> None:
    """Keep the records of steps up to ``step``; the others are written again by the resumed run."""
    if not path.is_file():
        return
    records, torn = read_log(path)
    if torn:
        print(f"{path}: dropped {torn} line(s) that were not a whole JSON record (a write cut short)", file=sys.stderr)
    kept = [record for record in records if record["step"] <= step]
    if not kept:
        path.unlink()
        return
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(record) + "\n" for record in kept))
    os.replace(partial, path)  # a kill now leaves the old log or the new one, never half of it
