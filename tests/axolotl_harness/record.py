"""Write a harness comparison to ``STEM.json`` and ``STEM.md`` with what it ran on: versions, commit, command.

``write(stem, summary, table)`` takes ``run_harness.py``'s summary (per run: the loss per step, the update's norm,
and per plugin the largest relative difference from plain axolotl) and its printed table; the JSON holds the summary,
the versions of Python and the packages the runs used, the code state (``benchmarks/environment.code_state``:
commit and uncommitted changes) and the command; the Markdown the same for reading.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import fixtures

sys.path.insert(0, str(fixtures.ROOT / "benchmarks"))

from _stack import environment  # noqa: E402

PACKAGES = ("axolotl", "trl", "transformers", "accelerate", "peft", "datasets", "torch", "dpo-fast")


def versions() -> dict:
    """Python's version and each of ``PACKAGES``' (or "not installed")."""
    found = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def markdown(record: dict) -> str:
    """The record as a page: what ran, the loss per step of each run, the updates, the differences."""
    summary, runs = record["summary"], record["summary"]["runs"]
    ok = [run for run in runs if run["returncode"] == 0]
    lines = [
        f"# axolotl `rl: {summary['rl']}` with and without `{', '.join(r['name'] for r in runs[1:])}`",
        "",
        f"{record['date']}; {environment.code_summary(record['code'])}",
        "",
        "Versions: " + ", ".join(f"{name} {version}" for name, version in record["versions"].items()) + ".",
        f"Machine: {record['machine']}, load average before {record['load_before']}, after {record['load_after']}.",
        "",
        f"Command: `{record['command']}`",
        "",
        f"A tiny Llama (`tests/axolotl_harness/fixtures.py`), {summary['rows']} local rows, {summary['steps']} SGD "
        "steps at lr 0.5 without clipping, float32 on CPU; each run is `python -m axolotl.cli.train` on the same "
        "config, the plugin's with `plugins:` added. The loss is TRL's logged `loss` per step (the checkpoint's "
        "`trainer_state.json`); the update is the trained weights minus the initial ones.",
        "",
        "| step | " + " | ".join(f"`{run['name']}` loss" for run in ok) + " |",
        "| --- | " + " | ".join("---" for _ in ok) + " |",
    ]
    for step in sorted(ok[0]["losses"], key=int) if ok else []:
        lines.append(f"| {step} | " + " | ".join(f"{run['losses'][step]:.8f}" for run in ok) + " |")
    lines += ["", "| run | exit | wall (s) | update norm | loss: max rel. diff vs plain | update: max rel. diff vs plain |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for run in runs:
        diff = run.get("vs_plain")
        cells = [f"`{run['name']}`", str(run["returncode"]), str(run["wall_s"]),
                 f"{run['update_norm']:.6e}" if "update_norm" in run else "-",
                 f"{diff['loss_max_rel']:.2e}" if diff else "-",
                 f"{diff['update_max_rel']:.2e} (`{diff['update_worst_param']}`)" if diff else "-"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Tolerance: {summary['tolerance']}; failures: {summary['failures'] or 'none'}.", ""]
    return "\n".join(lines)


def write(stem: Path, summary: dict, table: str) -> None:
    """Write ``stem``.json and ``stem``.md for ``summary`` (``run_harness.py``'s) and its printed ``table``."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    record = {
        "date": datetime.date.today().isoformat(),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "versions": versions(),
        "code": environment.code_state(),
        "machine": f"{os.cpu_count()} CPUs ({platform.machine()})",
        "load_before": summary.get("load_before", "not recorded"),
        "load_after": ", ".join(f"{value:.1f}" for value in load),
        "summary": summary,
        "table": table,
    }
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(record))
