"""Record the measured output behind the docs' figures that no benchmark writes, each into benchmarks/results/.

Three figures of the docs come from a run or a test rather than from ``bench_loss.py``; each
command here runs it and writes ``<name>.json`` (the figures, the command, the machine, the
versions and the code: commit and uncommitted changes) and ``<name>.md`` (the figures as the
docs show them):

  default-run   ``dpo-fast train``, the bundled run (docs/training.md, "The default run"): wall time for
                everything, peak RSS of the process, and its ``metrics.jsonl`` (held-out metrics by
                step). A fresh reference cache, so the reference pass is timed too. About a minute
                on 2 quiet cores.
  memory-test   ``tests/kernels/test_memory.py``'s probe (docs/testing.md): the extra memory of one step of
                4 pairs x 512 tokens, H=256, V=32000, for the naive step and the torch and cpp
                backends, each in a fresh process. Under a minute.
  trl-parity    ``tests/integrations/test_trl.py`` and ``test_kto_trl.py`` under pytest (docs/trl.md,
                "Parity"): the largest relative differences each test prints between FastDPOTrainer and
                TRL's DPOTrainer (with and without prefix sharing) and between FastKTOTrainer and
                KTOTrainer, and whether every test passed. About ten minutes on 2 cores.

Examples:
  python benchmarks/record_figures.py default-run
  python benchmarks/record_figures.py default-run --name default-run-torch -- --backend torch
  python benchmarks/record_figures.py memory-test
  python benchmarks/record_figures.py trl-parity
  python benchmarks/record_figures.py trl-parity -k hinge --out /tmp/check     # one case, a quick check

Timings mean something only on a quiet machine: each file records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.etree import ElementTree

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stack import environment, report

ROOT = environment.ROOT
RESULTS = ROOT / environment.RESULTS
EVAL_METRICS = ("eval_rewards/accuracies", "eval_loss", "eval_rewards/margins")
# The drop-ins' parity tests, and what they print after each comparison, e.g. "hinge: max relative difference: logs
# 1.2e-06, eval 3.0e-06, weight updates 4.0e-07" or "prefix sharing, ipo precomputed: max relative difference: ..."
PARITY_TESTS = ("tests/integrations/test_trl.py", "tests/integrations/test_kto_trl.py")
PARITY_LINE = re.compile(r"^(?P<case>.+?): max relative difference: (?P<figures>.+)$")
LABELS = ("logs", "eval", "weight updates")


def _started() -> dict:
    """The machine, versions and code, with the load average, before a run (``environment.describe``)."""
    return environment.describe("cpu")


def _record(meta: dict, command: list[str], runs: list[str], figures: dict) -> dict:
    """The figures with what produced them: the command that records them, the one it ran, the machine (the
    load average after the run too), the versions and the code."""
    environment.finish(meta)
    return {"command": command, "runs": runs, "meta": meta, **figures}


def _write(out: Path, name: str, record: dict, table: list[str]) -> Path:
    """``<out>/<name>.json`` and ``<out>/<name>.md`` (``_stack.report``); returns the JSON's path."""
    header = [*report.header(f"{name}, {record['meta']['date']}", record["meta"]), f"`{shlex.join(record['command'])}`",
              ""]  # fmt: skip
    report.write(record, out / name, "\n".join(header + table))
    return out / f"{name}.json"


# ----------------------------------------------------------------------------------------------
# the default run


def eval_table(metrics: list[dict]) -> list[str]:
    """The held-out metrics by step, as docs/training.md's "The default run" shows them."""
    evals = [line for line in metrics if "eval_loss" in line]
    if not evals:
        return ["(no evaluation in this run)"]
    lines = ["| metric | " + " | ".join(f"step {line['step']}" for line in evals) + " |",
             "| --- |" + " --- |" * len(evals)]  # fmt: skip
    for key in EVAL_METRICS:
        lines.append(f"| `{key}` | " + " | ".join(f"{line[key]:.3g}" for line in evals) + " |")
    return lines


def default_run(out: Path, name: str, command_line: list[str], train_flags: list[str]) -> Path:
    """Run ``dpo-fast train`` (the bundled example, ``train_flags`` appended) in a child process and record it.

    The output folder and the reference cache are fresh temporary folders (a cached reference would
    leave its pass out of the wall time); wall time from start to exit; peak RSS from ``wait4``.
    """
    meta = _started()
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "dpo_fast.trainer.cli", "train", "--output-dir", f"{scratch}/run",
                   "--reference-cache-dir", f"{scratch}/reference", *train_flags]  # fmt: skip
        log_path = Path(scratch) / "log"
        with open(log_path, "w") as log:
            started = time.perf_counter()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            _, status, usage = os.wait4(process.pid, 0)
            wall_s = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            sys.exit(f"record_figures: dpo-fast train failed ({process.returncode}):\n{log_path.read_text()[-3000:]}")
        metrics = [json.loads(line) for line in (Path(scratch) / "run" / "metrics.jsonl").read_text().splitlines()]
    figures = {
        "wall_s": round(wall_s, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "dpo_fast_default": environment.dpo_fast_default(torch.device("cpu"), torch.float32),
        "metrics": metrics,
    }  # fmt: skip
    backend = figures["dpo_fast_default"]["backend"]
    table = [
        (f"**{wall_s:.0f} s wall** for everything, {figures['peak_rss_mib']:.0f} MiB peak RSS "
         f"(`backend=auto` is `{backend}` here unless the flags say otherwise)."), "",
        *eval_table(metrics),
    ]  # fmt: skip
    runs = ["dpo-fast", "train", "--output-dir", "TMP/run", "--reference-cache-dir", "TMP/reference", *train_flags]
    return _write(out, name, _record(meta, command_line, runs, figures), table)


# ----------------------------------------------------------------------------------------------
# the memory test


def memory_test(out: Path, name: str, command_line: list[str], backends: list[str]) -> Path:
    """tests/kernels/test_memory.py's probe (its own function, so the figure is the test's) for each backend."""
    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "tests" / "kernels"))
    from test_memory import _extra_memory

    meta = _started()
    steps = {backend: _extra_memory(backend) for backend in backends}
    naive = steps.get("reference")
    for step in steps.values():
        step["fraction_of_naive"] = round(step["extra_mib"] / naive["extra_mib"], 4) if naive else None
    table = ["| backend | extra MiB | of the naive step's |", "| --- | ---: | ---: |"]
    for backend, step in steps.items():
        fraction = "–" if step["fraction_of_naive"] is None else f"{100 * step['fraction_of_naive']:.1f}%"
        table.append(f"| {backend} | {step['extra_mib']:.0f} | {fraction} |")
    figures = {"shape": "4 pairs x 512 tokens (half prompt), H=256, V=32000, float32", "steps": steps}
    runs = ["tests/kernels/test_memory.py's PROBE, one process per backend:", *backends]
    return _write(out, name, _record(meta, command_line, runs, figures), table)


# ----------------------------------------------------------------------------------------------
# the TRL parity tests


def _group(test_file: str, case: str) -> str:
    """The docs' three parity figures: the DPO drop-in, its prefix sharing, the KTO drop-in."""
    if test_file == "test_kto_trl":
        return "kto"
    return "prefix sharing" if case.startswith("prefix sharing") else "dpo"


def parse_parity(junit_xml: str) -> list[dict]:
    """One entry per test of a pytest JUnit XML report: its file, name, outcome and each comparison it printed
    (``case: max relative difference: logs 1.2e-06, ...``; a case may hold spaces and commas)."""
    tests = []
    for case in ElementTree.fromstring(junit_xml).iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        test_file = case.get("classname", "").rpartition(".")[2]
        printed = []
        for line in (case.findtext("system-out") or "").splitlines():
            match = PARITY_LINE.match(line.strip())
            if match:
                figures = {}
                for part in match["figures"].split(", "):
                    label, _, value = part.rpartition(" ")
                    figures[label] = float(value)
                printed.append({"case": match["case"], "group": _group(test_file, match["case"]), **figures})
        largest = {label: max(p[label] for p in printed if label in p) for label in LABELS
                   if any(label in p for p in printed)}  # fmt: skip
        tests.append({"file": test_file, "test": case.get("name"), "outcome": outcome, "printed": printed,
                      "max_relative_difference": largest or None})  # fmt: skip
    return tests


def largest_by_group(tests: list[dict]) -> dict:
    """Per group, the largest difference of each kind over every printed comparison, and how many there were."""
    groups = {}
    for printed in (p for test in tests for p in test["printed"]):
        group = groups.setdefault(printed["group"], {"comparisons": 0})
        group["comparisons"] += 1
        for label in LABELS:
            if label in printed:
                group[label] = max(group.get(label, 0.0), printed[label])
    return groups


def trl_parity(out: Path, name: str, command_line: list[str], select: str | None) -> Path:
    """Run the drop-ins' parity tests (``PARITY_TESTS``, ``-k select``) and record each test's outcome and printed
    differences, the largest per group."""
    meta = _started()
    selected = ["-k", select] if select else []
    with tempfile.TemporaryDirectory() as scratch:
        junit = Path(scratch) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PARITY_TESTS,
                   f"--junitxml={junit}", "-o", "junit_logging=system-out", *selected]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
        if not junit.exists():
            sys.exit(f"record_figures: pytest wrote no report ({done.returncode}):\n{done.stdout[-3000:]}")
        tests = parse_parity(junit.read_text())
    groups = largest_by_group(tests)
    outcomes = {outcome: sum(t["outcome"] == outcome for t in tests) for outcome in ("passed", "failure", "error",
                                                                                      "skipped")}  # fmt: skip
    table = [f"{outcomes['passed']} passed, {outcomes['failure'] + outcomes['error']} failed, "
             f"{outcomes['skipped']} skipped.", "", "Largest relative differences:", "",
             "| group | comparisons | logs | eval | weight updates |", "| --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for group, figures in groups.items():
        cells = " | ".join(f"{figures[label]:.1e}" if label in figures else "–" for label in LABELS)
        table.append(f"| {group} | {figures['comparisons']} | {cells} |")
    table += ["", "| file | test | case | outcome | logs | eval | weight updates |",
              "| --- | --- | --- | --- | ---: | ---: | ---: |"]  # fmt: skip
    for test in tests:
        for printed in test["printed"] or [{"case": "–"}]:
            cells = " | ".join(f"{printed[label]:.1e}" if label in printed else "–" for label in LABELS)
            table.append(f"| {test['file']} | {test['test']} | {printed['case']} | {test['outcome']} | {cells} |")
    runs = ["python", "-m", "pytest", *PARITY_TESTS, *selected]
    figures = {"pytest_exit_code": done.returncode, "outcomes": outcomes, "largest": groups, "tests": tests}
    path = _write(out, name, _record(meta, command_line, runs, figures), table)
    if done.returncode != 0:
        sys.exit(f"record_figures: the parity tests did not pass (pytest exit {done.returncode}); recorded in {path}")
    return path


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    command_line = ["python", "benchmarks/record_figures.py", *argv]
    train_flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("figure", choices=("default-run", "memory-test", "trl-parity"))
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for <name>.json and .md (default "
                        "benchmarks/results)")  # fmt: skip
    parser.add_argument("--name", help="file name without suffix (default: the figure's)")
    parser.add_argument("--backends", default="reference,torch,cpp",
                        help="memory-test: backends to probe, comma-separated (default reference,torch,cpp)")  # fmt: skip
    parser.add_argument("-k", dest="select", help="trl-parity: pytest's -k expression (default: every test)")
    args = parser.parse_args(argv)
    if train_flags and args.figure != "default-run":
        parser.error("flags after -- go to `dpo-fast train`: default-run only")
    name = args.name or args.figure
    if args.figure == "default-run":
        path = default_run(args.out, name, command_line, train_flags)
    elif args.figure == "memory-test":
        path = memory_test(args.out, name, command_line, [b for b in args.backends.split(",") if b])
    else:
        path = trl_parity(args.out, name, command_line, args.select)
    print(f"record_figures: wrote {path} and {path.with_suffix('.md').name}")


if __name__ == "__main__":
    main()
