"""End-to-end DPO training benchmark: the step time, tokens/s and step memory of TRL, TRL + Liger, FastDPOTrainer and ``dpo-fast train``.

Llama-3.2-1B- and 3B-shaped models (random init, bf16 on a GPU, float32 on CPU, gradient
checkpointing), the same synthetic batches for every arm (``_train.models``, ``_train.arms``). Each
arm runs in its own worker process (``_stack.worker``), so one arm's memory or monkey-patching
never reaches another, and each of its optimizer steps is measured from outside the trainer
(``_train.steps``: the same for the lean trainer as for TRL's loop). How long a sequence or how
large a batch each arm fits is ``bench_memory.py``'s (one search, on CPU and GPU alike).

    python benchmarks/bench_train.py --out benchmarks/results            # on a GPU (about 4 minutes)
    python benchmarks/bench_train.py --cpu --out benchmarks/results      # CPU measurement (see CPU_PLAN)
    python benchmarks/bench_train.py --smoke --out /tmp/smoke            # CPU: tiny model, a few steps, in-process
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
prints the one command to run there, under its 10-minute limit: this benchmark's timing, then
``bench_memory.py``'s longest-sequence and largest-batch searches on the 1B shape until out of
memory; then copy ``bench_train.{json,md}`` and the ``*-memory.{json,md}`` from the results folder
into ``benchmarks/results/`` and draw the plots with ``report`` where matplotlib is installed.

Results are written after every worker, so a run cut short by ``--deadline-s`` keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stack import environment, report, worker
from _stack.memory import CPU_ENV
from _train.arms import ARMS
from _train.models import MODELS, Shape

HERE = Path(__file__).resolve().parent
GIB = 2**30
TRAIN_ARMS = ("trl", "trl-liger", "fast", "fast-nometrics", "fast-shared", "dpo-fast-cli", "dpo-fast-cli-shared")


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


# The GPU machine's command: the wheel kit's set-up (benchmarks/wheelhouse.py), then this benchmark and the memory search.
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
     '--no-build-isolation --no-deps -e . && python3 benchmarks/bench_train.py --models llama-1b --deadline-s 240 '
     '--out "$R" && python3 benchmarks/bench_memory.py --device cuda --model llama-1b --budget-gib 0 --parts '
     'length,batch --time-budget 240 --out "$R"; } 2>&1 | tee "$R/log"'),
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
    device = "cpu" if args.cpu or args.smoke else "cuda"
    report_ = {"meta": environment.describe(device), "settings": vars(args), "results": []}
    for question, model, arms, shape in _plan(args):
        if time.time() >= deadline:
            break
        if args.smoke:
            warmup, timed = 1, 1 if args.cpu else 2
        else:
            warmup, timed = (1, args.timed_steps or 3) if args.cpu else (2, args.timed_steps or 5)
        for arm in arms:
            entry = measure_arm(arm, model, shape, device, warmup, timed, isolate=not args.smoke,
                                timeout_s=max(30.0, deadline - time.time() + 60))  # fmt: skip
            if question:
                entry.update(question=question, shape=asdict(shape))
            report_["results"].append(entry)
            report.write_json(report_, out / "bench_train.json")
    environment.finish(report_["meta"])
    write_report(report_, out)
    print((out / "bench_train.md").read_text())
    return 0


def _plan(args: argparse.Namespace) -> list[tuple[str | None, str, list[str], Shape]]:
    """(question or None, model, arms, shape) in the order they run: ``CPU_PLAN`` with ``--cpu``, else the models."""
    if args.cpu:
        plan = []
        for group in CPU_PLAN:
            model, shape = ("tiny", replace(group.timing, pairs=2, length=32)) if args.smoke else (group.model,
                                                                                                 group.timing)  # fmt: skip
            plan.append((group.question, model, [a for a in group.arms if args.arms is None or a in args.arms], shape))
        return plan
    arms = args.arms or list(DEFAULT_ARMS)
    if args.smoke:
        return [(None, "tiny", arms, Shape(pairs=2, length=32))]
    return [(None, model, arms, Shape(args.pairs, args.length, args.prompt_fraction)) for model in args.models]


def measure_arm(arm: str, model: str, shape: Shape, device: str, warmup: int, timed: int, isolate: bool,
                timeout_s: float) -> dict:  # fmt: skip
    """Train ``warmup + timed`` steps of ``arm`` at ``shape`` in a worker (``_train.probe``); the entry of the arm.

    ``timing``: ``step_s`` (the median of the timed steps' seconds, each from its first module call to the end of
    its optimizer step), ``tokens_per_s`` (each pair's two sequences whole, as TRL counts them, over ``step_s``),
    ``peak_gib`` (the largest timed step's peak above the memory when it began: its activations, gradients and
    buffers; ``memory_kind`` says resident set or CUDA allocated) and ``total_peak_gib`` (that step's start
    memory, the weights and the optimizer state, plus its peak).
    """
    spec = {"arm": arm, "model": MODELS[model], "device": device, "gradient_checkpointing": True,
            "shapes": [asdict(shape)] * (warmup + timed), "measured": list(range(warmup + timed)),
            "budget_bytes": None}  # fmt: skip
    outcome = worker.run("_train.probe:measure", spec, isolate=isolate, timeout_s=timeout_s,
                         environ=CPU_ENV if device == "cpu" else None)  # fmt: skip
    result = outcome.result or {"status": "out of memory" if outcome.killed else "not measured"}
    entry = {"model": model, "arm": arm, "status": result["status"]}
    for key in ("reason", "error"):
        if result.get(key):
            entry[key] = result[key]
    if outcome.error:
        entry["worker"] = outcome.error[-500:]
    steps = result.get("steps") or []
    if result["status"] == "ok" and len(steps) == warmup + timed:
        times = [step["seconds"] for step in steps[warmup:]]
        peak = max(steps[warmup:], key=lambda step: step["peak_bytes"])
        entry["timing"] = {
            "pairs": shape.pairs, "length": shape.length, "steps": len(steps), "step_s": statistics.median(times),
            "step_s_all": [step["seconds"] for step in steps], "tokens_per_s": shape.tokens / statistics.median(times),
            "peak_gib": peak["peak_bytes"] / GIB, "total_peak_gib": (peak["baseline_bytes"] + peak["peak_bytes"]) / GIB,
            "memory_kind": result["memory_kind"],
        }  # fmt: skip
    return entry


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for bench_train.{json,md,png}")
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny model, a few steps, in this process")
    parser.add_argument("--cpu", action="store_true", help="the CPU measurement of prefix sharing and token metrics "
                        "(CPU_PLAN; with --smoke: on tiny shapes)")  # fmt: skip
    parser.add_argument("--models", type=_names(("llama-1b", "llama-3b")), default=["llama-1b", "llama-3b"])
    parser.add_argument("--arms", type=_names(TRAIN_ARMS),
                        help=f"among {', '.join(TRAIN_ARMS)} (default: {', '.join(DEFAULT_ARMS)}; --cpu: CPU_PLAN's)")  # fmt: skip
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


# ----------------------------------------------------------------------------------------------
# report


def write_report(results: dict, out: Path) -> None:
    """``bench_train.{json,md}`` and ``bench_train.png`` (where matplotlib is installed) in ``out``."""
    report.write(results, out / "bench_train", markdown(results), {"": panels(results)})


def _ratio_line(what: str, value: float | None, target: str, met: bool) -> list:
    if value is None:
        return [what, "not measured", target, "not judged"]
    return [what, f"{value:.2f}x", target, "met" if met else "missed"]


def cpu_goals(results: list[dict]) -> list[str]:
    """The CPU measurement's goals as a table: sharing's tokens/s and step memory, the token metrics' step time."""
    timed = {(e.get("question"), e["arm"]): e["timing"] for e in results if e.get("timing")}
    rows = []
    for shared, plain in (("fast-shared", "fast"), ("dpo-fast-cli-shared", "dpo-fast-cli")):
        with_sharing, without = timed.get(("prefix sharing", shared)), timed.get(("prefix sharing", plain))
        both = with_sharing is not None and without is not None
        speed = with_sharing["tokens_per_s"] / without["tokens_per_s"] if both else None
        name = ARMS[shared].description
        rows.append(_ratio_line(f"{name}: tokens/s vs without", speed, ">= 1.40x", both and speed >= 1.4))
        memory = with_sharing["peak_gib"] / without["peak_gib"] if both and without["peak_gib"] > 0 else None
        rows.append(
            _ratio_line(f"{name}: step memory vs without", memory, "< 1.00x", memory is not None and memory < 1)
        )
    on, off = timed.get(("token metrics", "fast")), timed.get(("token metrics", "fast-nometrics"))
    cost = on["step_s"] / off["step_s"] if on and off else None
    rows.append(_ratio_line("FastDPOTrainer step: token metrics on vs off", cost, "<= 1.05x",
                            cost is not None and cost <= 1.05))  # fmt: skip
    return report.table(["goal", "measured", "target", ""], rows, right={1, 2})


def _memory_words(results: dict) -> str:
    kind = "CUDA allocated" if results["meta"]["device"]["type"] == "cuda" else "resident set"
    return (
        f"Step memory ({kind}): the largest timed step's peak above the memory when it began (activations, "
        "gradients, buffers); total: that plus the start (weights, reference, optimizer state)."
    )


def _cells(entry: dict, base: dict | None = None) -> list:
    timing = entry["timing"]
    cells = [f"{timing['step_s']:.3f}", f"{timing['tokens_per_s']:,.0f}"]
    if base is not None:
        cells.append(f"{timing['tokens_per_s'] / base['timing']['tokens_per_s']:.2f}x" if base.get("timing") else "-")
    return [*cells, f"{timing['peak_gib']:.2f}", f"{timing['total_peak_gib']:.2f}"]


def _note(entry: dict) -> str:
    return entry.get("reason") or entry.get("error") or entry.get("worker") or entry["status"]


def markdown(results: dict) -> str:
    settings = results["settings"]
    smoke = ("Smoke run (a tiny model, float32 on CPU): checks the benchmark runs, measures nothing of interest."
             if settings["smoke"] else None)  # fmt: skip
    if settings.get("cpu"):
        lines = report.header("End-to-end DPO training on CPU: prefix sharing and the token metrics' cost",
                              results["meta"])  # fmt: skip
        lines += [smoke or ("float32, gradient checkpointing, a frozen copy as the reference; each arm in its own "
                            "process; median step time of the timed steps after one warm-up step. tokens/s counts "
                            "each pair's two sequences whole (the prompt twice, shared or not). "
                            + _memory_words(results)), ""]  # fmt: skip
        rows = []
        for entry in results["results"]:
            shape = entry.get("shape", {})
            prompt = int(shape.get("length", 0) * shape.get("prompt_fraction", 0.5))
            head = [entry.get("question"), entry["model"], ARMS[entry["arm"]].description,
                    f"{shape.get('pairs')} x {shape.get('length')} ({prompt})"]  # fmt: skip
            rows.append(head + (_cells(entry) if entry.get("timing") else [_note(entry), "", "", ""]))
        lines += report.table(["question", "model", "arm", "pairs x tokens (prompt)", "step (s)", "tokens/s",
                               "step memory (GiB)", "total (GiB)"], rows, right={4, 5, 6, 7})  # fmt: skip
        return "\n".join([*lines, "", *cpu_goals(results["results"])]) + "\n"
    lines = report.header("End-to-end DPO training: TRL vs dpo_fast", results["meta"])
    lines += [smoke or (f"Timing: {settings['pairs']} pairs x {settings['length']} tokens per sequence "
                        f"({settings['prompt_fraction']:.0%} prompt), bf16, gradient checkpointing, median of the "
                        "timed steps after 2 warm-up steps. " + _memory_words(results)), ""]  # fmt: skip
    baseline = {e["model"]: e for e in results["results"] if e["arm"] == "trl" and e.get("timing")}
    rows = [[entry["model"], ARMS[entry["arm"]].description,
             *(_cells(entry, baseline.get(entry["model"], {})) if entry.get("timing") else [_note(entry), "", "", "",
                                                                                             ""])]
            for entry in results["results"]]  # fmt: skip
    lines += report.table(["model", "arm", "step (s)", "tokens/s", "vs TRL", "step memory (GiB)", "total (GiB)"], rows,
                          right={2, 3, 4, 5, 6})  # fmt: skip
    return "\n".join(lines) + "\n"


def panels(results: dict) -> list[report.Panel]:
    """Bars per (model, arm): tokens/s, step memory."""
    entries = [e for e in results["results"] if e.get("timing")]
    labels = [f"{e['model']}\n{ARMS[e['arm']].description}" for e in entries]
    return [report.Panel(title="tokens / s", bars=[(label, e["timing"]["tokens_per_s"]) for label, e in
                                                   zip(labels, entries, strict=True)]),
            report.Panel(title="step memory (GiB)", bars=[(label, e["timing"]["peak_gib"]) for label, e in
                                                          zip(labels, entries, strict=True)])]  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
