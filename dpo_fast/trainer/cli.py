"""``dpo-fast train [--config FILE] [--KEY VALUE ...]``: every config key is also a flag.

Flags override the file; without ``--config`` the bundled default runs (a tiny model learning to
prefer correct string reversals, a few minutes on a laptop CPU). Multi-process runs go through
``accelerate launch -m dpo_fast.trainer.cli train ...`` (see the README).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .config import TrainConfig, load_config

_PARSERS = {"str": str, "int": int, "float": float}


def _nullable(parse):
    return lambda text: None if text.lower() in ("none", "null") else parse(text)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="dpo-fast", description="DPO from hidden states, without the N x V logits")
    commands = top.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a causal LM with DPO", argument_default=argparse.SUPPRESS)
    train.add_argument("--config", help="YAML or JSON config file (default: the bundled example)")
    for f in dataclasses.fields(TrainConfig):
        flags = [f"--{f.name.replace('_', '-')}"] + ([f"--{f.name}"] if "_" in f.name else [])
        if f.type == "bool":
            train.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=f.metadata["help"])
            continue
        base, _, rest = f.type.partition(" | ")
        parse = _nullable(_PARSERS[base]) if rest == "None" else _PARSERS[base]
        train.add_argument(*flags, dest=f.name, type=parse, metavar=base.upper(), help=f.metadata["help"])
    return top


def main(argv: list[str] | None = None) -> int:
    args = vars(parser().parse_args(argv))
    args.pop("command")
    cfg = load_config(args.pop("config", None), **args)
    from .loop import train  # heavy imports (transformers, datasets, accelerate) only for a run

    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
