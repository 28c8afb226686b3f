"""Preference data: load rows, check them, tokenize, order them into batches, collate a batch.

A row is ``{"prompt", "chosen", "rejected"}``, each plain text, or (conversational) a list of
``{"role", "content"}`` messages rendered with the tokenizer's chat template. Tokenized rows
hold ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (lists of int); a batch of P rows becomes
one forward of 2P sequences, chosen first (TRL's concatenated order), padded or packed, or, with
prefix sharing, of P sequences ``[prompt][chosen][rejected]``.

Errors name the dataset, and the row (rows count from 1, in the order of the file) or the line of
the file (lines count from 1) and the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import torch

from ..integrations.prefix_sharing import collate_shared
from ..layout import IGNORE_INDEX
from . import sources

FIELDS = ("prompt", "chosen", "rejected")
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_rows(source: str, split: str, key: str = "dataset") -> datasets.Dataset:
    """A local JSON/JSONL/Parquet file (all its rows) or a hub dataset name (``split`` of it).

    ``key`` (the config key that named ``source``) goes into errors. A JSON or JSONL file is read
    once first, so that bytes that are not UTF-8, a line that is not JSON, and a file with no row
    are reported with the file and line rather than from deep inside ``datasets``.
    """
    path = sources.local_path(key, source)
    if path is None:
        rows = sources.from_hub(key, source, lambda: datasets.load_dataset(source, split=split))
    elif path.suffix not in _FILE_BUILDERS:
        raise ValueError(f"{key} {source!r} must be a .json, .jsonl or .parquet file, or a hub dataset name")
    else:
        if path.suffix != ".parquet":
            _check_json_file(path, key)
        try:
            rows = datasets.load_dataset(_FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
        except datasets.exceptions.DatasetGenerationError as error:
            cause = error.__cause__ or error
            raise ValueError(f"{key} file {source!r} could not be read: {str(cause).splitlines()[0]}") from error
    if len(rows) == 0:
        raise ValueError(f"{key} {source!r} has no rows")
    return rows


def tokenize(rows: datasets.Dataset, tokenizer, max_length: int | None, max_prompt_length: int | None,
             name: str) -> datasets.Dataset:  # fmt: skip
    """Check every row and tokenize it; ``name`` (the dataset's source) goes into errors.

    Truncation as TRL does it: the prompt keeps its last ``max_prompt_length`` tokens, then each
    completion keeps its first ``max_length - len(prompt)``. Plain-text completions end with EOS;
    conversational ones end as the chat template ends an assistant turn.

    Returns:
        the dataset with int columns ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` only.
    """
    missing = [key for key in FIELDS if key not in rows.column_names]
    if missing:
        raise ValueError(
            f"dataset {name!r} lacks column(s) {missing}; a preference dataset needs {list(FIELDS)} "
            f"(it has {rows.column_names})"
        )

    def encode(row, position):
        index = position + 1  # rows count from 1 in errors
        for key in FIELDS:
            _check_field(row[key], key, index, name)
        prompt, chosen, rejected = _encode_row(row, tokenizer, index, name)
        if not prompt:
            raise ValueError(f"dataset {name!r} row {index}: field 'prompt' encodes to no token")
        if max_prompt_length is not None:
            prompt = prompt[-max_prompt_length:]
        if max_length is not None:
            chosen, rejected = chosen[: max_length - len(prompt)], rejected[: max_length - len(prompt)]
        return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}

    return rows.map(encode, with_indices=True, remove_columns=rows.column_names, desc=f"tokenizing {name}")


def epoch_batches(num_rows: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Row indices of each training batch of an epoch: a permutation seeded by (seed, epoch).

    The last partial batch is dropped.
    """
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return [order[start : start + batch_size] for start in range(0, num_rows - batch_size + 1, batch_size)]


def eval_batches(num_rows: int, batch_size: int) -> list[list[int]]:
    """Row indices of each eval batch, in order, the last one possibly smaller."""
    return [list(range(start, min(start + batch_size, num_rows))) for start in range(0, num_rows, batch_size)]


def shard(batches: list[list[int]], accelerator) -> list[tuple[list[int], bool]]:
    """This process's share of ``batches`` as ``(indices, counted)``.

    The list is padded by repeating its first batches until every process has as many (DDP and
    FSDP forwards are collective); the repeats have ``counted=False`` and add nothing to results.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    padded = batches + batches[: -len(batches) % world]
    return [(indices, i < len(batches)) for i, indices in enumerate(padded) if i % world == rank]


def to_device(batch: dict, device) -> dict:
    """Every tensor of a collated batch (and the prefix-shared layout's) on ``device``."""
    return {key: value.to(device) for key, value in batch.items()}


def collate(rows: dict[str, list[list[int]]], padding_free: bool, pad_id: int, prefix_sharing: bool = False) -> dict:
    """One forward's inputs for P tokenized rows: 2P sequences ``prompt + completion``, chosen first.

    ``labels[t]`` is the target of position t (``input_ids[t + 1]`` where that token is a
    completion token, ``IGNORE_INDEX`` elsewhere), so ``hidden[t]`` pairs with ``labels[t]``.

    Returns:
        padded: ``input_ids``, ``attention_mask``, ``labels``: (2P, T) int64.
        padding-free: ``input_ids``, ``position_ids``: (1, N) int64 with positions restarting at
        each sequence; ``labels``, ``segment_ids``: (N,) int64, sequence s in [0, 2P).
        prefix sharing: ``shared``, a ``prefix_sharing.SharedPrefixBatch``: each pair one sequence
        ``[prompt][chosen][rejected]``, a padded row per pair, or all P in one row when padding-free.
    """
    if prefix_sharing:
        return {"shared": collate_shared(rows, pad_id=pad_id, pairs_per_row=None if padding_free else 1)}
    prompts = rows["prompt_ids"] * 2
    completions = rows["chosen_ids"] + rows["rejected_ids"]
    sequences = [p + c for p, c in zip(prompts, completions)]
    targets = [[IGNORE_INDEX] * (len(p) - 1) + c + [IGNORE_INDEX] for p, c in zip(prompts, completions)]
    if padding_free:
        return {
            "input_ids": torch.tensor([tok for seq in sequences for tok in seq]).unsqueeze(0),
            "position_ids": torch.tensor([pos for seq in sequences for pos in range(len(seq))]).unsqueeze(0),
            "labels": torch.tensor([tok for tgt in targets for tok in tgt]),
            "segment_ids": torch.tensor([s for s, seq in enumerate(sequences) for _ in seq]),
        }
    length = max(map(len, sequences))
    return {
        "input_ids": torch.tensor([seq + [pad_id] * (length - len(seq)) for seq in sequences]),
        "attention_mask": torch.tensor([[1] * len(seq) + [0] * (length - len(seq)) for seq in sequences]),
        "labels": torch.tensor([tgt + [IGNORE_INDEX] * (length - len(tgt)) for tgt in targets]),
    }


def mismatched(rows: dict[str, list[list[int]]], max_length: int | None) -> dict[str, list[list[int]]]:
    """KTO's KL rows of P tokenized rows, in ``collate``'s form: sequence s of the 2P (chosen first) keeps its prompt
    and takes the completion of sequence s - 1 (cyclically), TRL's ``KL_completion_ids`` (completions rotated by one
    within the batch); a completion is cut to ``max_length`` minus its new prompt's length."""
    pairs = len(rows["prompt_ids"])
    completions = rows["chosen_ids"] + rows["rejected_ids"]
    rotated = completions[-1:] + completions[:-1]
    prompts = rows["prompt_ids"] * 2
    if max_length is not None:
        rotated = [c[: max(max_length - len(p), 1)] for p, c in zip(prompts, rotated)]
    return {"prompt_ids": rows["prompt_ids"], "chosen_ids": rotated[:pairs], "rejected_ids": rotated[pairs:]}


def _check_field(value, key: str, index: int, name: str) -> None:
    if value is None:
        raise ValueError(f"dataset {name!r} row {index}: field {key!r} is missing; every row needs {list(FIELDS)}")
    if isinstance(value, str):
        empty = not value.strip()
    elif isinstance(value, list):
        empty = not value or any(not isinstance(m, dict) or not str(m.get("content") or "").strip() for m in value)
    else:
        raise ValueError(  # noqa: TRY004 (user data: every bad row is a ValueError)
            f"dataset {name!r} row {index}: field {key!r} must be text or a list of {{'role', 'content'}} "
            f"messages, got {type(value).__name__}"
        )
    if empty:
        raise ValueError(f"dataset {name!r} row {index}: field {key!r} is empty (or has an empty message); "
                         "fix or drop the row")  # fmt: skip


def _encode_row(row, tokenizer, index: int, name: str) -> tuple[list[int], list[int], list[int]]:
    """Token ids of (prompt, chosen, rejected); the prompt with the tokenizer's special tokens."""
    kinds = {key: isinstance(row[key], list) for key in FIELDS}
    if len(set(kinds.values())) > 1:
        raise ValueError(
            f"dataset {name!r} row {index}: fields mix text and message lists ({kinds}); use one form for all three"
        )
    if not kinds["prompt"]:
        completion = [tokenizer(row[key], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                      for key in ("chosen", "rejected")]  # fmt: skip
        return tokenizer(row["prompt"])["input_ids"], *completion
    if tokenizer.chat_template is None:
        raise ValueError(f"dataset {name!r} is conversational but the tokenizer has no chat template; set one")
    prompt_text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    ids = [tokenizer(prompt_text, add_special_tokens=False)["input_ids"]]
    for key in ("chosen", "rejected"):
        full_text = tokenizer.apply_chat_template(row["prompt"] + row[key], tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ValueError(
                f"dataset {name!r} row {index}: the chat template renders prompt + {key!r} without the prompt "
                "as its prefix, so the completion cannot be cut out; use a template that appends turns"
            )
        ids.append(tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"])
    return tuple(ids)


def _check_json_file(path: Path, key: str) -> None:
    """UTF-8 throughout, at least one row, and (JSON lines) every non-blank line a JSON value."""
    with open(path, "rb") as file:
        head = file.read(4096).lstrip()
        file.seek(0)
        if head.startswith(b"["):  # one JSON array
            text = _utf8(file.read(), path, key, 1)
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{key} file {str(path)!r} line {error.lineno}: not valid JSON ({error.msg})"
                ) from None
            if not rows:
                raise ValueError(f"{key} file {str(path)!r} has no rows")
            return
        rows = 0
        for number, raw in enumerate(file, start=1):
            line = _utf8(raw, path, key, number).strip()
            if not line:
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{key} file {str(path)!r} line {number}: not valid JSON ({error.msg})") from None
            rows += 1
    if rows == 0:
        raise ValueError(f"{key} file {str(path)!r} has no rows")


def _utf8(raw: bytes, path: Path, key: str, first_line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = first_line + raw[: error.start].count(b"\n")
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(
            f"{key} file {str(path)!r} line {line}, column {column}: byte 0x{raw[error.start]:02x} is not UTF-8; "
            "save the file as UTF-8"
        ) from None
