"""``dpo-fast plot RUN_DIR``: a run's ``metrics.jsonl`` drawn as one PNG, for people who would rather look than read.

Takes a run folder (or its ``metrics.jsonl``) as ``dpo-fast train`` writes it (``output.append``): one JSON
record a line, each with an integer ``step``; a train record carries ``loss`` and the pair metrics
(``rewards/accuracies``, ``rewards/margins``, ...), an eval record the same names prefixed ``eval_``.
Gives ``<RUN_DIR>/metrics.png`` (or ``--out``): three panels side by side, loss, reward accuracy and reward
margin, each with the train curve (one point per logging window) and the eval curve (one point per
evaluation). A metric the run's objective does not log (KTO has no reward accuracy) leaves its panel
empty, with a note saying so.

Lines that are not whole records (a write cut short by a kill, or a run still writing) are skipped with a
note on stderr, as ``output.read_log`` skips them; a file with no record, or with none of the three
metrics, is a ``ValueError`` naming the file. matplotlib is imported only to draw; without it the
command stops with a ``ModuleNotFoundError`` naming ``pip install matplotlib``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

LOG_NAME = "metrics.jsonl"  # output.LOG_NAME; not imported from there, which would pull in accelerate and torch
DEFAULT_PNG = "metrics.png"
PANELS = (("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"))
EVAL_PREFIX = "eval_"
DESCRIPTION = "Draw a dpo-fast train run's metrics.jsonl (loss, reward accuracy and margin; train and eval) to one PNG."


def log_path(run: str | Path) -> Path:
    """The metrics log of ``run``: ``<run>/metrics.jsonl`` for a folder, ``run`` itself for a file.

    Raises ``FileNotFoundError`` naming the path when there is none.
    """
    run = Path(run)
    if run.is_dir():
        path = run / LOG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{str(run)!r} has no {LOG_NAME}: is it the output_dir of a dpo-fast train run?")
        return path
    if not run.exists():
        raise FileNotFoundError(f"{str(run)!r}: no such run folder or metrics file")
    return run


def read_records(path: str | Path) -> list[dict]:
    """The whole records of a metrics log, in step order.

    Takes a ``metrics.jsonl``; gives its records (dicts with an integer ``step``). Skips, with one note on
    stderr, lines that are not such a record; raises ``ValueError`` when none is left, or when a plotted
    metric holds something other than a number.
    """
    path = Path(path)
    records, skipped = [], 0
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1 if line.strip() else 0
            continue
        if isinstance(record, dict) and type(record.get("step")) is int:
            records.append(record)
        else:
            skipped += 1
    if not records:
        raise ValueError(
            f"{str(path)!r} holds no metrics record (a JSON object with an integer 'step' a line): "
            "is it the metrics.jsonl of a dpo-fast train run?"
        )
    if skipped:
        print(f"{path}: skipped {skipped} line(s) that were not a whole metrics record", file=sys.stderr)
    for record in records:
        for key, value in record.items():
            if _plotted(key) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{str(path)!r} step {record['step']}: {key} is {value!r}, not a number")
    return sorted(records, key=lambda record: record["step"])


def _plotted(key: str) -> bool:
    return key.removeprefix(EVAL_PREFIX) in dict(PANELS)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """The steps and values of ``key`` over the records that log it (NaN kept: it shows as a gap)."""
    rows = [(record["step"], float(record[key])) for record in records if key in record]
    return [step for step, _ in rows], [value for _, value in rows]


def _matplotlib_figure():
    """matplotlib's ``Figure`` class (no pyplot: no GUI backend, no global state), or a clear install hint."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ModuleNotFoundError(
            'dpo-fast plot needs matplotlib: pip install matplotlib (or pip install "dpo-fast[plot]")',
            name="matplotlib",
        ) from error
    return Figure


def figure(records: list[dict], title: str = ""):
    """A matplotlib ``Figure`` of ``records``: one axes per ``PANELS`` entry, lines labelled ``train`` and ``eval``.

    Raises ``ValueError`` when the records log none of the panels' metrics, train or eval.
    """
    if not any(series(records, prefix + key)[0] for key, _ in PANELS for prefix in ("", EVAL_PREFIX)):
        names = ", ".join(key for key, _ in PANELS)
        raise ValueError(f"the records log none of {names} (train, or eval with the {EVAL_PREFIX} prefix)")
    Figure = _matplotlib_figure()
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, len(PANELS))
    for ax, (key, name) in zip(axes, PANELS):
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers
        ax.grid(True, alpha=0.3)
        drawn = False
        for prefix, label, style in (("", "train", {"color": "C0", "linewidth": 1.2}),
                                     (EVAL_PREFIX, "eval", {"color": "C1", "marker": "o", "linewidth": 1.6})):  # fmt: skip
            steps, values = series(records, prefix + key)
            if steps:
                last = values[-1]
                shown = f"{last:.3g}" if math.isfinite(last) else str(last)
                ax.plot(steps, values, label=f"{label} (last {shown})", **style)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, f"{key}\nnot logged by this run", ha="center", va="center", transform=ax.transAxes,
                    color="0.4")  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        if key == "rewards/accuracies":
            ax.set_ylim(-0.02, 1.02)
        if key == "rewards/margins":
            ax.axhline(0.0, color="0.5", linewidth=0.8)
        ax.legend(loc="best", fontsize="small")
    if title:
        fig.suptitle(title)
    return fig


def describe(records: list[dict], name: str) -> str:
    """The figure's title: the run's name, its last step and how many train and eval records it holds."""
    train = sum(1 for record in records if "loss" in record)
    evals = sum(1 for record in records if EVAL_PREFIX + "loss" in record)
    return f"{name}: {train} train logs, {evals} evaluations, to step {records[-1]['step']}"


def plot(run: str | Path, out: str | Path | None = None, dpi: int = 110) -> Path:
    """Draw the run folder (or metrics file) ``run`` to a PNG; gives its path (default ``<run>/metrics.png``)."""
    path = log_path(run)
    records = read_records(path)
    name = path.parent.name if path.name == LOG_NAME else path.name
    fig = figure(records, describe(records, name or str(path)))
    out = Path(out) if out is not None else path.parent / DEFAULT_PNG
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``plot`` subcommand's arguments (``cli.py`` builds the parser)."""
    parser.add_argument("run", metavar="RUN_DIR", help="a dpo-fast train output_dir, or its metrics.jsonl")
    parser.add_argument("--out", default=None, help=f"the PNG to write (default: RUN_DIR/{DEFAULT_PNG})")
    parser.add_argument("--dpi", type=int, default=110, help="the PNG's resolution (default: 110)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error, not one line")


def run_command(run: str, out: str | None = None, dpi: int = 110) -> None:
    """``dpo-fast plot``: draw the run and print where the PNG went."""
    print(plot(run, out, dpi))
