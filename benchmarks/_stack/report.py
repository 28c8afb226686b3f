"""The one report writer: a run's results as ``<stem>.json``, ``<stem>.md`` and its plots.

A benchmark builds its results (a dict whose ``meta`` is ``environment.describe()``) and the body
of its markdown; this module writes them, starts every report with the same header (device,
versions, code, load average) and draws the plots (where matplotlib is installed; without it the
plots are skipped with a message, and ``python benchmarks/<bench>.py report RESULTS.json`` draws
them later where it is).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from _stack import environment


def header(title: str, meta: dict) -> list[str]:
    """The lines every report starts with: title, device and versions, code, load average and threads."""
    device = meta["device"]
    load = (f"Load average (1 min): {device.get('load_average_1m', '–')} at the start, "
            f"{device.get('load_average_1m_end', '–')} at the end; {device.get('torch_threads', '–')} torch threads.")  # fmt: skip
    return [f"# {title}", "", f"Device: {environment.device_name(meta)}. Versions: {environment.versions_line(meta)}.",
            "", environment.code_summary(meta.get("code")), "", load, ""]  # fmt: skip


def table(columns: list[str], rows: list[list], right: set[int] | None = None) -> list[str]:
    """A markdown table; ``right``: the columns aligned right (default: all but the first)."""
    right = set(range(1, len(columns))) if right is None else right
    lines = ["| " + " | ".join(columns) + " |",
             "| " + " | ".join("---:" if i in right else "---" for i in range(len(columns))) + " |"]  # fmt: skip
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


@dataclass
class Panel:
    """One plot panel: lines (``label -> [(x, y), ...]``, each styled by ``styles[label]``, matplotlib's
    keywords) or bars (``[(label, value), ...]``), with horizontal lines ``[(y, label), ...]``."""

    title: str
    xlabel: str = ""
    ylabel: str = ""
    lines: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    styles: dict[str, dict] = field(default_factory=dict)
    bars: list[tuple[str, float]] = field(default_factory=list)
    hlines: list[tuple[float, str]] = field(default_factory=list)
    log_x: bool = False
    log_y: bool = False
    xticks: list[float] | None = None


def plot(path: Path, panels: list[Panel], width: float = 8, height: float = 5) -> Path | None:
    """Draw the panels one above the other into ``path`` (PNG); None where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print(f"report: matplotlib is not installed (pip install .[bench]): {path.name} not drawn", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(panels), 1, figsize=(width, height * len(panels)), squeeze=False)
    for axis, panel in zip(axes[:, 0], panels, strict=True):
        for label, points in panel.lines.items():
            if points:
                axis.plot(*zip(*sorted(points)), marker="o", markersize=3, label=label, **panel.styles.get(label, {}))
        if panel.bars:
            axis.bar(range(len(panel.bars)), [value for _, value in panel.bars], color=[f"C{i % 10}" for i in
                                                                                       range(len(panel.bars))])  # fmt: skip
            axis.set_xticks(range(len(panel.bars)), [label for label, _ in panel.bars], fontsize=7)
        for y, label in panel.hlines:
            axis.axhline(y, color="black", linestyle=":", linewidth=1.2, label=label)
        axis.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
        if panel.log_x:
            axis.set_xscale("log")
        if panel.log_y:
            axis.set_yscale("log")
        if panel.xticks:
            axis.set_xticks(panel.xticks, [f"{tick:,.0f}" for tick in panel.xticks], minor=False)
            axis.set_xticks([], minor=True)
        if panel.lines or panel.hlines:
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def write_json(results: dict, path: Path) -> None:
    """The results as JSON, written whole (a run rewrites it after every measurement)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.part")
    partial.write_text(json.dumps(results, indent=1) + "\n")
    partial.replace(path)


def write(results: dict, stem: Path, markdown: str, plots: dict[str, list[Panel]] | None = None) -> list[Path]:
    """``<stem>.json``, ``<stem>.md`` and ``<stem>-<name>.png`` for each plot (``<stem>.png`` for the name "");
    returns the paths written."""
    write_json(results, stem.with_name(stem.name + ".json"))
    markdown_path = stem.with_name(stem.name + ".md")
    markdown_path.write_text(markdown.rstrip("\n") + "\n")
    written = [stem.with_name(stem.name + ".json"), markdown_path]
    for name, panels in (plots or {}).items():
        drawn = plot(stem.with_name(f"{stem.name}{'-' if name else ''}{name}.png"), panels)
        written += [drawn] if drawn else []
    return written
