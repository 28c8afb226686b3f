"""``dpo-fast train [--config FILE] [--KEY VALUE ...]``: every config key is also a flag.
``dpo-fast plot RUN_DIR [--out PNG]``: a run's metrics.jsonl drawn to a PNG (``plot.py``).

Flags override the file; without ``--config`` the bundled default runs (a tiny model learning to
prefer correct string reversals, a few minutes on a laptop CPU). Multi-process runs go through
``accelerate launch -m dpo_fast.trainer.cli train ...`` (docs/distributed.md).

A mistake in the config, the flags or the inputs (a ``ValueError`` or an ``OSError``; for ``plot`` also a
missing matplotlib) prints one line, ``dpo-fast COMMAND: error: ...``, and exits with status 2; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from . import plot as plot_lib
from .config import TrainConfig, load_config

_PARSERS = {"str": str, "int": int, "float": float}
USER_ERROR_STATUS = 2


def _nullable(parse):
    return lambda text: None if text.lower() in ("none", "null") else parse(text)


def _default(f: dataclasses.Field) -> str:
    if "default" in f.metadata:
        return f.metadata["default"]
    value = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return "none, required" if value == "" else str(value)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="dpo-fast", description="DPO from hidden states, without the N x V logits")
    commands = top.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train", help="train a causal LM with DPO", description="Train a causal LM with DPO. Every config key is "
        "a flag; flags override the --config file, whose values override the defaults shown.",
        argument_default=argparse.SUPPRESS,
    )  # fmt: skip
    train.add_argument("--config", help="YAML or JSON config file (default: the bundled example)")
    train.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")
    for f in dataclasses.fields(TrainConfig):
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        text = f"{f.metadata['help']} (default: {_default(f)})"
        if f.type == "bool":
            train.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=text)
            continue
        base, _, rest = f.type.partition(" | ")
        parse = _nullable(_PARSERS[base]) if rest == "None" else _PARSERS[base]
        train.add_argument(*flags, dest=f.name, type=parse, metavar=base.upper(), help=text)
    plot_lib.add_arguments(
        commands.add_parser("plot", help="draw a run's metrics.jsonl to a PNG", description=plot_lib.DESCRIPTION)
    )
    return top


def keys_table() -> str:
    """docs/training.md's table of config keys, from ``TrainConfig`` as ``--help`` shows them (a test keeps them equal)."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for f in dataclasses.fields(TrainConfig):
        meaning = f.metadata["help"].replace("|", "\\|")
        rows.append(
            f"| `{f.name}` | {f.type.replace(' | None', ' or null')} | {_default(f).replace('|', '/')} | {meaning} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    command = args.pop("command")
    debug = args.pop("debug", False)
    try:
        if command == "plot":
            plot_lib.run_command(**args)
            return 0
        cfg = load_config(args.pop("config", None), **args)
        from .loop import train  # heavy imports (transformers, datasets, accelerate) only for a run

        train(cfg)
    except (ValueError, OSError, *((ImportError,) if command == "plot" else ())) as error:
        if debug:
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"dpo-fast {command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return USER_ERROR_STATUS
    return 0


if __name__ == "__main__":
    sys.exit(main())
