"""End-to-end DPO training benchmark: TRL, TRL + Liger, FastDPOTrainer and ``dpo-fast train``.

Llama-3.2-1B- and 3B-shaped models (random init, bf16, gradient checkpointing), the same synthetic
batches for every arm (see ``train_arms.py`` for the arms and how each number is taken). Each arm
runs in its own worker process, so one arm's memory or monkey-patching never reaches another.

    python benchmarks/bench_train.py --out benchmarks/results            # on a GPU (about 9 minutes)
    python benchmarks/bench_train.py --smoke --out /tmp/smoke            # CPU: tiny model, a few steps
    python benchmarks/bench_train.py report benchmarks/results/bench_train.json   # table and plot again

On the lent GPU machine (``shared/gpu/README.md``: run ``../shared/gpu/fetch-wheels.sh`` here first,
so that ``.whl/`` holds TRL, Liger and datasets), ``python benchmarks/bench_train.py gpu-command``
prints the one command to run there, under its 10-minute limit; then copy ``bench_train.json`` and
``bench_train.md`` from the results folder into ``benchmarks/results/`` and draw the plot with
``bench_train.py report`` where matplotlib is installed.

Work is done in two phases under one deadline (``--deadline-s``): first the step time and peak
memory of every arm on every model, then the longest-sequence and largest-batch searches for the
``--search-models``. Results are written after every worker, so a run cut short keeps what it
measured; a search the deadline cut short is marked incomplete.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import environment
import train_arms
from train_arms import ARMS, Plan, Shape

HERE = Path(__file__).resolve().parent
NAMES = {
    "trl": "TRL DPOTrainer (fused LM head)",
    "trl-liger": "TRL + use_liger_kernel",
    "fast": "FastDPOTrainer",
    "fast-nometrics": "FastDPOTrainer, token_metrics=False",
    "dpo-fast-cli": "dpo-fast train",
}


# The GPU machine's command: the wheel kit's set-up (shared/gpu/README.md), then this benchmark.
GPU_COMMAND = "; ".join([  # noqa: FLY002 (one command, a part a line)
    'R=${R:-gpu-results}',
    'mkdir -p "$R"',
    ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "
     ".whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit"),
    "unset TRITON_INTERPRET",
    ("export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "
     "TOKENIZERS_PARALLELISM=false"),
    "set -o pipefail",
    ('{ nvidia-smi -L; python3 .whl/check_wheels.py --installed --import .whl; python3 -m pip install -q --no-index '
     '--no-build-isolation --no-deps -e . && python3 benchmarks/bench_train.py --out "$R"; } 2>&1 | tee "$R/log"'),
])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gpu-command"]:
        print(GPU_COMMAND)
        return 0
    if argv[:1] == ["report"]:
        results_path = Path(argv[1])
        write_report(json.loads(results_path.read_text()), results_path.parent)
        return 0
    args = _parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.deadline_s
    if args.smoke:
        models, search_models, device = ["tiny"], ["tiny"], "cpu"
        timing, warmup, timed = Shape(pairs=2, length=32), 1, 2
        lengths, pairs = (32, 64), (1, 2)
    else:
        models, search_models, device = args.models, args.search_models, "cuda"
        timing, warmup, timed = Shape(pairs=args.pairs, length=args.length), 2, args.timed_steps
        lengths = tuple(2**k for k in range(11, 18))  # 2,048 ... 131,072 tokens, one pair
        pairs = tuple(2**k for k in range(8))  # 1 ... 128 pairs at the timing length
    report = {"environment": _environment(device), "settings": vars(args), "results": []}

    def run(model: str, arms: tuple[str, ...], search: bool, worker_deadline: float) -> None:
        plan = Plan(
            model=model, arms=arms, timing=timing, warmup_steps=warmup, timed_steps=timed,
            search_lengths=lengths if search else (), search_pairs=pairs if search else (),
            deadline=worker_deadline, device=device, result_path=str(out / f"worker-{model}-{arms[0]}.json"),
        )  # fmt: skip
        entries = _run_worker(plan)
        report["results"] = [e for e in report["results"] if (e["model"], e["arm"]) not in {(model, a) for a in arms}]
        report["results"] += entries
        (out / "bench_train.json").write_text(json.dumps(report, indent=1))

    # One worker per arm on a GPU (isolation). The smoke run, where start-up is most of the time, puts
    # the in-process arms in one worker with their searches, and only times the CLI (each of its
    # probes would be a new process).
    groups = [(arm,) for arm in args.arms]
    if args.smoke:
        shared = tuple(arm for arm in args.arms if arm in train_arms.IN_PROCESS_ARMS)
        groups = [group for group in (shared, tuple(set(args.arms) - set(shared))) if group]
    for model in models:  # phase 1: step time and peak memory (and the smoke run's searches)
        for arms in groups:
            if time.time() < deadline:
                search = args.smoke and set(arms) <= set(train_arms.IN_PROCESS_ARMS)
                run(model, arms, search=search, worker_deadline=deadline)
    if not args.smoke:  # phase 2: the searches, the remaining time split evenly
        todo = [(model, arms) for model in search_models for arms in groups]
        for index, (model, arms) in enumerate(todo):
            share = (deadline - time.time()) / (len(todo) - index)
            if share > 10:
                run(model, arms, search=True, worker_deadline=time.time() + share)
    write_report(report, out)
    print((out / "bench_train.md").read_text())
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for bench_train.{json,md,png}")
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny model, a few steps, small searches")
    parser.add_argument("--models", type=_names(("llama-1b", "llama-3b")), default=["llama-1b", "llama-3b"])
    parser.add_argument("--search-models", type=_names(("llama-1b", "llama-3b")), default=["llama-1b"])
    parser.add_argument("--arms", type=_names(ARMS), default=list(ARMS))
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step for the timing")
    parser.add_argument("--length", type=int, default=1024, help="tokens per sequence for the timing (half prompt)")
    parser.add_argument("--timed-steps", type=int, default=5, help="steps timed after 2 warm-up steps")
    parser.add_argument("--deadline-s", type=float, default=480, help="stop starting work after this many seconds")
    return parser


def _names(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [name for name in text.split(",") if name]
        unknown = sorted(set(names) - set(allowed))
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(allowed)}")
        return names

    return parse


def _run_worker(plan: Plan) -> list[dict]:
    """Run ``train_arms.py`` on the plan in a fresh process; its results, partial if it was cut short."""
    command = [sys.executable, str(HERE / "train_arms.py"), train_arms.plan_to_json(plan)]
    timeout = max(30.0, plan.deadline - time.time() + 60)
    try:
        finished = subprocess.run(command, timeout=timeout, check=False)
        failure = None if finished.returncode == 0 else f"worker exited with {finished.returncode}"
    except subprocess.TimeoutExpired:
        failure = f"worker stopped after {timeout:.0f} s (deadline)"
    path = Path(plan.result_path)
    entries = json.loads(path.read_text()) if path.exists() else {}
    path.unlink(missing_ok=True)
    results = []
    for arm in plan.arms:
        entry = entries.get(arm, {"model": plan.model, "arm": arm, "status": "not measured"})
        if failure and entry.get("status") != "skipped":
            entry["worker"] = failure
        results.append(entry)
    return results


def _environment(device: str) -> dict:
    versions = {}
    for package in ("torch", "triton", "transformers", "trl", "accelerate", "datasets", "liger-kernel", "dpo-fast"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    gpu = None
    if device == "cuda":
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
    code = environment.code_state()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device, "gpu": gpu, "python": platform.python_version(), "versions": versions,
        "commit": code["commit"], "code": code,
    }  # fmt: skip


# ----------------------------------------------------------------------------------------------
# report


def write_report(report: dict, out: Path) -> None:
    """``bench_train.md`` (always) and ``bench_train.png`` (where matplotlib is installed) in ``out``."""
    (out / "bench_train.md").write_text(markdown(report))
    try:
        import matplotlib
    except ImportError:
        print("bench_train.png not drawn: matplotlib is not installed (run `bench_train.py report` where it is)")
        return
    matplotlib.use("Agg")
    plot(report, out / "bench_train.png")


def _memory(entry: dict, key: str) -> float | None:
    return (entry.get("timing") or {}).get(key)


def _memory_cells(entry: dict, base: dict | None) -> str:
    """Peak allocated and process peak, and the ratio to TRL's on the first number both have."""
    allocated, process = _memory(entry, "peak_allocated_gib"), _memory(entry, "peak_process_gib")
    ratio = "-"
    for key in ("peak_allocated_gib", "peak_process_gib"):
        mine, theirs = _memory(entry, key), _memory(base, key) if base else None
        if mine and theirs:
            ratio = f"{mine / theirs:.2f}x"
            break
    cells = [f"{value:.1f}" if value else "-" for value in (allocated, process)]
    return f"{cells[0]} | {cells[1]} | {ratio}"


def _search(entry: dict, key: str) -> str:
    found = entry.get(key)
    if not found:
        return "-"
    text = "none" if found["fits"] is None else f"{found['fits']:,}"
    if found["fails"] is not None:
        text += f" (OOM at {found['fails']:,})"
    elif found["fits"] is not None:
        text = f">= {text}"
    return text + ("" if found["complete"] else ", cut short")


def markdown(report: dict) -> str:
    env, settings = report["environment"], report["settings"]
    lines = [
        "# End-to-end DPO training: TRL vs dpo_fast",
        "",
        f"{env['date']}, {env['gpu'] or env['device']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
        "",
        environment.code_summary(env.get("code")),
        "",
        f"Timing: {settings['pairs']} pairs x {settings['length']} tokens per sequence (half prompt), bf16, "
        "gradient checkpointing, median of the timed steps after 2 warm-up steps. Peak allocated: "
        "`torch.cuda.max_memory_allocated` (in-process arms); process peak: the process's total in "
        "nvidia-smi, sampled every 0.2 s (every arm). vs TRL: on peak allocated where both have it. "
        "Longest sequence: one pair. Largest batch: pairs at the timing length."
        if not settings["smoke"]
        else "CPU smoke run (tiny model, float32): checks the benchmark runs, measures nothing of interest.",
        "",
        (
            "| model | arm | step (s) | tokens/s | vs TRL | peak allocated (GiB) | process peak (GiB) | vs TRL "
            "| longest sequence | largest batch |"
        ),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    baseline = {e["model"]: e for e in report["results"] if e["arm"] == "trl" and e.get("timing")}
    for entry in report["results"]:
        timing = entry.get("timing")
        if not timing:
            note = entry.get("reason") or entry.get("worker") or entry.get("status", "")
            lines.append(f"| {entry['model']} | {NAMES[entry['arm']]} | {note} | | | | | | | |")
            continue
        base = baseline.get(entry["model"])
        speed = f"{timing['tokens_per_s'] / base['timing']['tokens_per_s']:.2f}x" if base else "-"
        lines.append(
            f"| {entry['model']} | {NAMES[entry['arm']]} | {timing['step_s']:.3f} | {timing['tokens_per_s']:,.0f} | "
            f"{speed} | {_memory_cells(entry, base)} | {_search(entry, 'longest_sequence')} | "
            f"{_search(entry, 'largest_batch')} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    entries = [e for e in report["results"] if e.get("timing")]
    labels = [f"{e['model']}\n{NAMES[e['arm']]}" for e in entries]
    panels = [
        ("tokens / s", [e["timing"]["tokens_per_s"] for e in entries]),
        (
            "peak memory (GiB; allocated, else process)",
            [_memory(e, "peak_allocated_gib") or _memory(e, "peak_process_gib") or 0 for e in entries],
        ),
        ("longest sequence (tokens, 1 pair)", [(e.get("longest_sequence") or {}).get("fits") or 0 for e in entries]),
        ("largest batch (pairs)", [(e.get("largest_batch") or {}).get("fits") or 0 for e in entries]),
    ]
    figure, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.3 * len(entries)), 3.2 * len(panels)))
    for axis, (title, values) in zip(axes, panels, strict=True):
        axis.bar(range(len(values)), values, color=[f"C{ARMS.index(e['arm'])}" for e in entries])
        axis.set_title(title)
        axis.set_xticks(range(len(values)), labels, fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
