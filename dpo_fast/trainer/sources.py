"""Where a run's model, tokenizer and data come from: a local file or folder, or a Hugging Face hub name.

A name that exists on disk is local. A name that does not, but looks like a path (absolute, starting
with ``.`` or ``~``, more than one ``/``, a backslash, or a file suffix such as ``.json``), is
reported as not found at once, with no call to the hub. Anything else is a hub name; a failure to
load it says that it is neither here nor loadable from the hub, in one line.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from .config import TrainConfig

T = TypeVar("T")
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".yaml", ".yml", ".csv", ".txt", ".safetensors", ".bin", ".pt")


def local_path(key: str, name: str) -> Path | None:
    """The absolute path of the local file or folder ``name`` (config key ``key``), or None for a hub name.

    Raises:
        ValueError: ``name`` looks like a path and nothing exists there.
    """
    path = Path(name).expanduser()
    if path.exists():
        return path.resolve()
    if _looks_like_a_path(name):
        raise ValueError(f"{key} {name!r} not found: no such file or folder (looked in {os.getcwd()})")
    return None


def check(cfg: TrainConfig) -> None:
    """Every local-looking source of ``cfg`` exists (model, tokenizer, dataset, eval_dataset); no network."""
    for key in ("model", "tokenizer", "dataset", "eval_dataset"):
        if getattr(cfg, key):
            local_path(key, getattr(cfg, key))


def from_hub(key: str, name: str, load: Callable[[], T]) -> T:
    """``load()`` of hub name ``name``; its failure as one ``ValueError`` naming ``key`` and the cause."""
    try:
        return load()
    except (OSError, ValueError, ConnectionError) as error:  # missing repo, no network, bad repo id
        cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{key} {name!r} is not a local file or folder (looked in {os.getcwd()}) and could not be loaded "
            f"from the Hugging Face hub: {cause}"
        ) from error


def _looks_like_a_path(name: str) -> bool:
    return (
        name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1 or name.lower().endswith(_FILE_SUFFIXES)
    )
