"""End-to-end DPO training benchmark: TRL, TRL + Liger, FastDPOTrainer and ``dpo-fast train``.

Llama-3.2-1B- and 3B-shaped models (random init, bf16, gradient checkpointing), the same synthetic
batches for every arm (see ``train_arms.py`` for the arms and how each number is taken). Each arm
runs in its own worker process, so one arm's memory or monkey-patching never reaches another.

    python benchmarks/bench_train.py --out benchmarks/results            # on a GPU (about 9 minutes)
    python benchmarks/bench_train.py --cpu --out benchmarks/results      # CPU measurement (see CPU_PLAN)
    python benchmarks/bench_train.py --smoke --out /tmp/smoke            # CPU: tiny model, a few steps
    python benchmarks/bench_train.py --cpu --smoke --out /tmp/smoke      # the CPU measurement on smoke shapes
    python benchmarks/bench_train.py report benchmarks/results/bench_train.json   # table and plot again

The CPU measurement (``--cpu``, on a quiet machine) answers two questions, each arm in its own
process: what prefix sharing gains (FastDPOTrainer and ``dpo-fast train`` with and without it, on
a 41.6M-parameter Llama, pairs whose prompt is 3x the completion: tokens/s, goal >= 1.4x, and peak
memory, goal less), and what TRL's token metrics cost FastDPOTrainer now that they come from the
fused pass (with and without them, on a tiny Llama with a 32000-token head, where the head is most
of the step: goal <= 1.05x the step time).

On the lent GPU machine (``docs/gpu.md``: run ``python benchmarks/wheelhouse.py`` here first,
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
from dataclasses import dataclass, replace
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
    "fast-shared": "FastDPOTrainer, prefix_sharing=True",
    "dpo-fast-cli": "dpo-fast train",
    "dpo-fast-cli-shared": "dpo-fast train, prefix_sharing: true",
}


@dataclass(frozen=True)
class Group:
    """Arms measured on one model at one shape, and the question they answer (``--cpu``)."""

    question: str
    model: str
    arms: tuple[str, ...]
    timing: Shape


# The arms of a GPU run unless --arms says otherwise; the sharing arms run on request, with a long prompt
# (docs/benchmarks.md)
DEFAULT_ARMS = ("trl", "trl-liger", "fast", "fast-nometrics", "dpo-fast-cli")
# The CPU measurement: (question, model, arms, shape); --smoke swaps in the tiny model and short sequences
CPU_PLAN = (
    Group("token metrics", "tiny-32k", ("fast", "fast-nometrics"), Shape(pairs=8, length=512)),
    Group("prefix sharing", "llama-40m", ("fast", "fast-shared", "dpo-fast-cli", "dpo-fast-cli-shared"),
          Shape(pairs=2, length=512, prompt_fraction=0.75)),
)  # fmt: skip


# The GPU machine's command: the wheel kit's set-up (benchmarks/wheelhouse.py), then this benchmark.
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
    deadline = time.time() + (args.deadline_s or (1800 if args.cpu else 480))
    if args.cpu:
        return _cpu_measurement(args, out, deadline)
    args.arms = args.arms or list(DEFAULT_ARMS)
    if args.smoke:
        models, search_models, device = ["tiny"], ["tiny"], "cpu"
        timing, warmup, timed = Shape(pairs=2, length=32), 1, 2
        lengths, pairs = (32, 64), (1, 2)
    else:
        models, search_models, device = args.models, args.search_models, "cuda"
        timing, warmup, timed = Shape(args.pairs, args.length, args.prompt_fraction), 2, args.timed_steps or 5
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
    parser.add_argument("--cpu", action="store_true", help="the CPU measurement of prefix sharing and token metrics "
                        "(CPU_PLAN; with --smoke: on tiny shapes)")  # fmt: skip
    parser.add_argument("--models", type=_names(("llama-1b", "llama-3b")), default=["llama-1b", "llama-3b"])
    parser.add_argument("--search-models", type=_names(("llama-1b", "llama-3b")), default=["llama-1b"])
    parser.add_argument(
        "--arms",
        type=_names(ARMS),
        help=f"among {', '.join(ARMS)} (default: {', '.join(DEFAULT_ARMS)}; --cpu: those of CPU_PLAN)",
    )
    parser.add_argument("--pairs", type=int, default=4, help="pairs per step for the timing")
    parser.add_argument("--length", type=int, default=1024, help="tokens per sequence for the timing")
    parser.add_argument("--prompt-fraction", type=float, default=0.5, help="the prompt's share of each sequence "
                        "(0.75: prompt 3x the completion, for the sharing arms)")  # fmt: skip
    parser.add_argument("--timed-steps", type=int, help="steps timed after the warm-up (default: 5 after 2 on a GPU, "
                        "3 after 1 with --cpu)")  # fmt: skip
    parser.add_argument("--deadline-s", type=float, help="stop starting work after this many seconds (default: 480; "
                        "--cpu: 1800)")  # fmt: skip
    return parser


def _names(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [name for name in text.split(",") if name]
        unknown = sorted(set(names) - set(allowed))
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {', '.join(allowed)}")
        return names

    return parse


def _cpu_measurement(args: argparse.Namespace, out: Path, deadline: float) -> int:
    """``--cpu``: each group of ``CPU_PLAN`` (its arms among ``--arms``), each arm in its own worker, no searches.

    With ``--smoke`` a group's in-process arms share one worker (start-up is most of the time there).
    """
    warmup, timed = (1, 1) if args.smoke else (1, args.timed_steps or 3)
    report = {"environment": _environment("cpu"), "settings": vars(args), "results": []}
    for group in CPU_PLAN:
        model, shape = group.model, group.timing
        if args.smoke:
            model, shape = "tiny", replace(shape, pairs=2, length=32)
        arms = [arm for arm in group.arms if args.arms is None or arm in args.arms]
        workers = [(arm,) for arm in arms]
        if args.smoke:
            shared = tuple(arm for arm in arms if arm in train_arms.IN_PROCESS_ARMS)
            workers = [shared, *[(arm,) for arm in arms if arm not in shared]] if shared else workers
        for worker_arms in workers:
            if time.time() >= deadline:
                break
            plan = Plan(
                model=model, arms=worker_arms, timing=shape, warmup_steps=warmup, timed_steps=timed,
                search_lengths=(), search_pairs=(), deadline=deadline, device="cpu",
                result_path=str(out / f"worker-{model}-{worker_arms[0]}.json"),
            )  # fmt: skip
            for entry in _run_worker(plan):
                report["results"].append({**entry, "question": group.question, "shape": vars(shape)})
            (out / "bench_train.json").write_text(json.dumps(report, indent=1))
    write_report(report, out)
    print((out / "bench_train.md").read_text())
    return 0


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


def _ratio_line(what: str, value: float | None, target: str, met: bool) -> str:
    if value is None:
        return f"| {what} | not measured | {target} | not judged |"
    return f"| {what} | {value:.2f}x | {target} | {'met' if met else 'missed'} |"


def cpu_goals(results: list[dict]) -> list[str]:
    """The CPU measurement's goals as a table: sharing's tokens/s and memory, the token metrics' step time."""
    timed = {(e.get("question"), e["arm"]): e["timing"] for e in results if e.get("timing")}
    lines = ["| goal | measured | target | |", "| --- | ---: | ---: | --- |"]
    for shared, plain in (("fast-shared", "fast"), ("dpo-fast-cli-shared", "dpo-fast-cli")):
        with_sharing, without = timed.get(("prefix sharing", shared)), timed.get(("prefix sharing", plain))
        both = with_sharing is not None and without is not None
        speed = with_sharing["tokens_per_s"] / without["tokens_per_s"] if both else None
        lines.append(_ratio_line(f"{NAMES[shared]}: tokens/s vs without", speed, ">= 1.40x", both and speed >= 1.4))
        for key, label in (("peak_rss_growth_gib", "peak RSS growth"), ("peak_process_gib", "peak RSS")):
            if both and with_sharing.get(key) and without.get(key):
                memory = with_sharing[key] / without[key]
                lines.append(_ratio_line(f"{NAMES[shared]}: {label} vs without", memory, "< 1.00x", memory < 1))
    on, off = timed.get(("token metrics", "fast")), timed.get(("token metrics", "fast-nometrics"))
    cost = on["step_s"] / off["step_s"] if on and off else None
    lines.append(_ratio_line("FastDPOTrainer step: token metrics on vs off", cost, "<= 1.05x",
                             cost is not None and cost <= 1.05))  # fmt: skip
    return lines


def markdown_cpu(report: dict) -> str:
    """The CPU measurement's table (one row per question and arm) and its goals."""
    env, settings = report["environment"], report["settings"]
    lines = [
        "# End-to-end DPO training on CPU: prefix sharing and the token metrics' cost",
        "",
        f"{env['date']}, {env['device']}; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v),
        "",
        environment.code_summary(env.get("code")),
        "",
        ("CPU smoke run (tiny model, short sequences): checks the measurement runs, measures nothing of interest."
         if settings["smoke"] else
         "float32, gradient checkpointing, a frozen copy as the reference; each arm in its own process; median "
         "step time of the timed steps after one warm-up step. tokens/s counts each pair's two sequences whole (the "
         "prompt twice, shared or not). Peak RSS: the process's peak resident set while training (VmHWM); growth: "
         "over the resident set when training started (in-process arms)."),
        "",
        "| question | model | arm | pairs x tokens (prompt) | step (s) | tokens/s | peak RSS (GiB) | RSS growth (GiB) |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for entry in report["results"]:
        shape = entry.get("shape", {})
        prompt = int(shape.get("length", 0) * shape.get("prompt_fraction", 0.5))
        head = f"| {entry.get('question')} | {entry['model']} | {NAMES[entry['arm']]} | " + (
            f"{shape.get('pairs')} x {shape.get('length')} ({prompt}) |"
        )
        timing = entry.get("timing")
        if not timing:
            note = entry.get("reason") or entry.get("worker") or entry.get("status", "")
            lines.append(f"{head} {note} | | | |")
            continue
        memory = [
            f"{timing[key]:.2f}" if timing.get(key) else "-" for key in ("peak_process_gib", "peak_rss_growth_gib")
        ]
        lines.append(f"{head} {timing['step_s']:.3f} | {timing['tokens_per_s']:,.0f} | {memory[0]} | {memory[1]} |")
    return "\n".join([*lines, "", *cpu_goals(report["results"])]) + "\n"


def markdown(report: dict) -> str:
    env, settings = report["environment"], report["settings"]
    if settings.get("cpu"):
        return markdown_cpu(report)
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
