"""Benchmark one DPO loss step straight from the LM hidden states: dpo_fast against every peer.

For each case (shape) and mode, every implementation that can run here is measured on the same
inputs: forward ms and forward+backward ms (medians after warm-up), effective TFLOP/s and the
ratio to the GEMM line measured in the same run, peak memory, and the relative error of its loss,
log-probs and gradients against a float64 reference, so that only equals are compared.
Out-of-memory and failures are recorded, and the run goes on; a peer that cannot run here is
listed with the reason.

Suites (``--suite``):
  gpu    on CUDA: headline (H=4096, V=128256, 8 pairs x 1024 tokens, half prompt, bf16) in every
         mode; cce_paper (H=2304, V=256000, 8192 tokens all valid);
         qwen2 (H=3584, V=152064); a sweep of 1k..64k tokens at the headline head.
  cpu    on CPU: 4 pairs x 512 tokens, H=512, V=32000, half prompt, float32, modes dpo, simpo and kto;
         each implementation in its own process (time, and peak RSS growth; glibc's mmap threshold fixed), three rounds
         round-robin, each row the median round.
  cpu-sweep  on CPU: the cpu case's head at 256, 512, 1024, 2048 and 4096 tokens, run as the cpu suite
         (one timed step per round after the memory step), for the plots of time and memory against
         tokens; a point whose memory would exceed --memory-cap-mib is not run.
  smoke  tiny shapes for CI, every mode (implementations that need torch.compile are left out on CPU).

Modes: dpo (the full step), frozen (lm_head weight frozen), forward (no_grad: sequence log-probs
only), token (per-token log-probs, backward with a random per-token upstream gradient), simpo and kto
(the full step of those objectives: dpo_fast's fused_linear_cpo_loss / fused_linear_kto_loss beside
Liger's LigerFusedLinearSimPOLoss / LigerFusedLinearKTOLoss and the naive step).

Writes ``<out>/<date>-<device>[-sweep|-smoke].json``, ``.md`` and, for a sweep, ``-time.png`` and
``-memory.png``; the JSON is rewritten after every measurement, so a run cut short keeps what it did
(``bench_loss.py report RESULTS.json`` draws its tables and plots). An isolated measurement runs in
``_stack.worker``'s fresh process, its memory taken by ``_stack.memory``.
Each file records the code it measured (commit, uncommitted changes, source fingerprint) and what
dpo_fast's default runs on the machine. The schema is in ``benchmarks/README.md``.

Examples:
  python benchmarks/bench_loss.py --suite cpu
  python benchmarks/bench_loss.py --suite cpu-sweep     # the CPU plots, about 20 minutes on 2 quiet cores
  python benchmarks/bench_loss.py --suite gpu --out gpu-results --time-budget 540
  python benchmarks/bench_loss.py --suite gpu --resume benchmarks/results/DATE-GPU.json   # finish a cut-short run
  python benchmarks/bench_loss.py report benchmarks/results/DATE-GPU.json                # its tables and plots again
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _loss import tables
from _loss.cases import SUITES, Case, make_batch, reference
from _loss.implementations import Implementation, all_implementations
from _loss.measure import Settings, measure, record_for, release
from _stack import environment, worker
from _stack.memory import CPU_ENV

DEFAULT_SETTINGS = {"gpu": Settings(warmup=3, repeats=10), "cpu": Settings(warmup=1, repeats=5),
                    "cpu-sweep": Settings(warmup=1, repeats=1), "smoke": Settings(warmup=0, repeats=1)}  # fmt: skip
# The measured CPU suites: each measurement in its own process, three rounds, sweep points capped in memory
CPU_SUITES = ("cpu", "cpu-sweep")
CPU_ROUNDS = 3
CPU_MEMORY_CAP_MIB = 4096.0
SMOKE_COMPILE_REASON = "uses torch.compile, which takes about a minute on a 2-core CPU: run by the cpu suite, not smoke"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="cpu", help="which shapes and device (default cpu)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder for the results (default benchmarks/results)")  # fmt: skip
    parser.add_argument("--impl", nargs="*", default=["*"], help="implementations to run (shell patterns)")
    parser.add_argument("--case", nargs="*", default=["*"], help="case names to run (shell patterns)")
    parser.add_argument("--warmup", type=int, help="warm-up steps; in a fresh CPU process the memory step is the "
                        "first (default: gpu 3, cpu and cpu-sweep 1, smoke 0)")  # fmt: skip
    parser.add_argument("--repeats", type=int, help="timed steps, median taken (default: gpu 10, cpu 5, "
                        "cpu-sweep 1, smoke 1)")  # fmt: skip
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="each measurement in a fresh process (default: on for the cpu suites, where the "
                             "peak RSS growth is the memory figure)")  # fmt: skip
    parser.add_argument("--rounds", type=int, help="measure every implementation this many times, round-robin, "
                        "and keep the median round (default: cpu suites 3, else 1)")  # fmt: skip
    parser.add_argument("--memory-cap-mib", type=float, help="sweeps: a point is not run when the implementation's "
                        "peak memory at the largest point measured, scaled linearly in tokens, would exceed this "
                        f"(default: {CPU_MEMORY_CAP_MIB:.0f} for the cpu suites, else none; 0: none)")  # fmt: skip
    parser.add_argument("--time-budget", type=float, help="seconds; measurements after it are recorded as not run")
    parser.add_argument("--resume", type=Path, metavar="RESULTS_JSON",
                        help="keep the rows of an earlier results file and measure only what it lacks")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="list the implementations and whether they run here")
    args = parser.parse_args(argv)
    for name in ("repeats", "rounds"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def _device(suite: str) -> torch.device:
    if suite == "gpu":
        if not torch.cuda.is_available():
            sys.exit("bench_loss: the gpu suite needs a CUDA device; try --suite cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def suite_defaults(suite: str) -> dict:
    """isolate, rounds and memory_cap_mib of a suite when its options are not given."""
    measured_on_cpu = suite in CPU_SUITES
    return {"isolate": measured_on_cpu, "rounds": CPU_ROUNDS if measured_on_cpu else 1,
            "memory_cap_mib": CPU_MEMORY_CAP_MIB if measured_on_cpu else None}  # fmt: skip


def results_stem(out: Path, meta: dict, suite: str) -> Path:
    """``<out>/<date>-<device>``, with ``-sweep`` or ``-smoke`` for those suites (``...-cpu-sweep``, ``...-cpu-smoke``)."""
    suffix = "" if suite in ("gpu", "cpu") else "-" + suite.removeprefix("cpu-")
    return out / f"{meta['date']}-{environment.slug(meta)}{suffix}"


def dpo_fast_defaults(device: torch.device, cases: list[Case]) -> dict:
    """What dpo_fast's defaults run here, for each dtype of the cases (``environment.dpo_fast_default``)."""
    dtypes = sorted({case.dtype for case in cases})
    return {dtype: environment.dpo_fast_default(device, getattr(torch, dtype)) for dtype in dtypes}


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def available(impls: list[Implementation], suite: str, device: torch.device, dtype: torch.dtype):
    """(implementations that run here, [{implementation, reason}] for those that do not)."""
    runnable, missing = [], []
    for impl in impls:
        reason = impl.unavailable(device, dtype)
        if reason is None and suite == "smoke" and impl.compiles and device.type == "cpu":
            reason = SMOKE_COMPILE_REASON
        if reason is None:
            runnable.append(impl)
        else:
            missing.append({"implementation": impl.name, "reason": reason})
    return runnable, missing


def run_one(spec: dict, save) -> dict:
    """``_stack.worker``'s target: one measurement. ``spec``: ``impl``, ``case`` (a ``Case`` as a dict), ``mode``,
    ``device``, ``settings`` (a ``Settings`` as a dict), ``expected`` (the reference's outputs, a file of them, or
    None) and ``fresh_process`` (whether this process measures nothing else: then its peak RSS is the step's)."""
    case = Case(**{**spec["case"], "modes": tuple(spec["case"]["modes"])})
    impl = next(impl for impl in all_implementations() if impl.name == spec["impl"])
    expected = torch.load(spec["expected"]) if isinstance(spec["expected"], str) else spec["expected"]
    return measure(impl, case, spec["mode"], torch.device(spec["device"]), Settings(**spec["settings"]), expected,
                   fresh_process=spec["fresh_process"])  # fmt: skip


def measure_in_worker(impl: Implementation, case: Case, mode: str, device: torch.device, settings: Settings,
                      expected: dict | Path | None, isolate: bool) -> dict:  # fmt: skip
    """One measurement: in a fresh process (``isolate``: on CPU its peak RSS is then the step's alone) or here."""
    spec = {"impl": impl.name, "case": dataclasses.asdict(case), "mode": mode, "device": str(device),
            "settings": dataclasses.asdict(settings), "fresh_process": isolate,
            "expected": str(expected) if isinstance(expected, Path) else expected}  # fmt: skip
    outcome = worker.run("bench_loss:run_one", spec, isolate=isolate,
                         environ=CPU_ENV if device.type == "cpu" else None)  # fmt: skip
    if outcome.result is not None:
        return outcome.result
    record = record_for(case, impl.name, mode)
    record["oom"] = outcome.killed or "MemoryError" in (outcome.error or "")
    record["error"] = (outcome.error or "worker returned nothing")[-500:]
    return record


def _key(row: dict) -> tuple:
    return row["case"], row["tokens"], row["implementation"], row["mode"]


ROUND_FIGURES = ("fwd_ms", "fwd_bwd_ms", "peak_mem_mb", "max_rel_err", "errors", "oom", "error")


def combine_rounds(rows: list[dict]) -> dict:
    """One row from an implementation's rounds (in the order they ran).

    Its times and memory are one round's, measured together: the median round by step time
    (forward+backward; the forward in the forward mode), the lower middle one for an even count;
    its index is ``median_round``. Its errors are the largest of every round's (each round is
    checked against the reference). Each round's figures are kept in ``rounds``; rounds "not run"
    (a time budget spent between rounds) are kept there but take no part. If a round failed, the
    row is the first failed round's, with every round kept; rounds all "not run" give one such row.
    """
    ran = [index for index, row in enumerate(rows) if not (row["error"] or "").startswith("not run")]
    if len(rows) == 1 or not ran:
        return rows[0]
    kept = [{key: row[key] for key in ROUND_FIGURES} for row in rows]
    failed = [rows[index] for index in ran if rows[index]["oom"] or rows[index]["error"]]
    if failed:
        return {**failed[0], "rounds": kept}
    order = sorted(ran, key=lambda index: tables.step_ms(rows[index]))
    median = order[(len(order) - 1) // 2]
    row = {**rows[median], "rounds": kept, "median_round": median}
    checked = [rows[index]["errors"] for index in ran if rows[index]["errors"]]
    if checked:
        row["errors"] = {key: max(errors[key] for errors in checked) for key in checked[0]}
        row["max_rel_err"] = max(row["errors"].values())
    return row


def memory_cap_reason(measured: tuple[int, float] | None, tokens: int, cap_mib: float | None) -> str | None:
    """Why a sweep point is not run, or None: the implementation's peak memory at the largest point
    measured, ``measured = (tokens, MiB)``, scaled linearly to ``tokens``, would exceed ``cap_mib``."""
    if not cap_mib or measured is None:
        return None
    smaller, peak = measured
    expected = peak * tokens / smaller
    if expected <= cap_mib:
        return None
    return (f"{tables.MEMORY_CAP_NOTE} of {cap_mib:.0f} MiB ({peak:.0f} MiB at {smaller} tokens, "
            f"{expected:.0f} MiB scaled to {tokens})")  # fmt: skip


@dataclasses.dataclass
class Runner:
    """Runs the implementations of one suite case by case and mode by mode, and keeps the run's state.

    done: rows kept from an earlier run (``--resume``); scratch: a folder for the reference that
    isolated workers load; memory_cap_mib: see ``memory_cap_reason``; out_of_memory: the smallest
    token count at which each (implementation, mode, case name) ran out of memory, so that larger
    sweep points are recorded as out of memory without being run; measured_memory: (tokens, peak
    MiB) of the largest point each measured.
    """

    device: torch.device
    runnable: list[Implementation]
    settings: Settings
    isolate: bool
    budget: float | None
    done: dict
    scratch: Path
    rounds: int = 1
    memory_cap_mib: float | None = None
    started: float = dataclasses.field(default_factory=time.monotonic)
    out_of_memory: dict = dataclasses.field(default_factory=dict)
    measured_memory: dict = dataclasses.field(default_factory=dict)

    def over_budget(self) -> bool:
        return self.budget is not None and time.monotonic() - self.started > self.budget

    def rows(self, case: Case, mode: str):
        """Yield one row per implementation that runs ``mode``: measured, kept, or saying why it was not run.

        With several rounds, every implementation is measured once per round, round-robin, so that
        a change in the machine's load falls on all of them alike (``combine_rounds``); rows come
        out during the last round.
        """
        todo = [impl for impl in self.runnable if mode in impl.modes]
        expected = self._reference(case, mode, todo)
        measured = {impl.name: [] for impl in todo}
        for round_index in range(self.rounds):
            last = round_index == self.rounds - 1
            for impl in todo:
                kept = self.done.get(_key(record_for(case, impl.name, mode)))
                if kept is not None:
                    if last:
                        yield kept
                    continue
                measured[impl.name].append(self._row(impl, case, mode, None if impl.name == "gemm" else expected))
                if last:
                    row = combine_rounds(measured[impl.name])
                    if row["oom"] and not row["error"]:
                        self.out_of_memory[(impl.name, mode, case.name)] = case.tokens
                    if row["peak_mem_mb"] is not None and not (row["oom"] or row["error"]):
                        self.measured_memory[(impl.name, mode, case.name)] = (case.tokens, row["peak_mem_mb"])
                    yield row
        release(self.device)

    def _reference(self, case: Case, mode: str, todo: list[Implementation]) -> dict | Path | None:
        """The float64 reference (a file for isolated workers), if any implementation will be checked against it."""
        needed = any(impl.name != "gemm" and _key(record_for(case, impl.name, mode)) not in self.done for impl in todo)
        if not needed or self.over_budget():
            return None
        try:
            expected = reference(make_batch(case, self.device, mode), mode)
        except torch.OutOfMemoryError:
            print(
                f"bench_loss: the reference of {case.name} {case.tokens} {mode} ran out of memory: errors not checked"
            )
            return None
        finally:
            release(self.device)
        if not self.isolate:
            return expected
        path = self.scratch / "expected.pt"
        torch.save(expected, path)
        return path

    def _row(self, impl: Implementation, case: Case, mode: str, expected: dict | Path | None) -> dict:
        row = record_for(case, impl.name, mode)
        smaller = self.out_of_memory.get((impl.name, mode, case.name))
        capped = memory_cap_reason(self.measured_memory.get((impl.name, mode, case.name)), case.tokens,
                                   self.memory_cap_mib)  # fmt: skip
        if smaller is not None and case.tokens > smaller:
            row.update(oom=True, error=f"not run: out of memory at {smaller} tokens")
        elif capped:
            row["error"] = capped
        elif self.over_budget():
            row["error"] = f"not run: time budget of {self.budget:.0f} s spent"
        else:
            row = measure_in_worker(impl, case, mode, self.device, self.settings, expected, self.isolate)
        return row


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        path = Path(argv[1])
        return tables.write(json.loads(path.read_text()), path.with_name(path.stem))
    args = parse_args(argv)
    device = _device(args.suite)
    cases = [case for case in SUITES[args.suite] if _matches(case.name, args.case)]
    dtype = cases[0].torch_dtype if cases else torch.float32
    impls = [impl for impl in all_implementations() if _matches(impl.name, args.impl)]
    runnable, missing = available(impls, args.suite, device, dtype)
    if args.list:
        for impl in impls:
            reason = next((m["reason"] for m in missing if m["implementation"] == impl.name), "runs here")
            print(f"{impl.name:28s} {reason}\n{'':28s} {impl.description}")
        return

    default = DEFAULT_SETTINGS[args.suite]
    settings = Settings(args.warmup if args.warmup is not None else default.warmup,
                        args.repeats if args.repeats is not None else default.repeats)  # fmt: skip
    defaults = suite_defaults(args.suite)
    isolate = defaults["isolate"] if args.isolate is None else args.isolate
    rounds = args.rounds or defaults["rounds"]
    memory_cap = defaults["memory_cap_mib"] if args.memory_cap_mib is None else (args.memory_cap_mib or None)
    meta = environment.describe(device)
    meta["dpo_fast_default"] = dpo_fast_defaults(device, cases)
    stem = results_stem(args.out, meta, args.suite)
    args.out.mkdir(parents=True, exist_ok=True)
    done = {}
    if args.resume:
        kept = json.loads(args.resume.read_text())["results"]
        done = {_key(row): row for row in kept if not (row["error"] or "").startswith("not run: time")}
    results = {"meta": meta, "suite": args.suite, "missing": missing, "results": [],
               "settings": {**dataclasses.asdict(settings), "isolate": isolate, "rounds": rounds,
                            "memory_cap_mib": memory_cap}}  # fmt: skip

    with tempfile.TemporaryDirectory() as scratch:
        runner = Runner(device, runnable, settings, isolate, args.time_budget, done, Path(scratch), rounds,
                        memory_cap)  # fmt: skip
        for case in cases:
            for mode in case.modes:
                for row in runner.rows(case, mode):
                    results["results"].append(row)
                    print(_progress(row), flush=True)
                    tables.write(results, stem, tables=False)
    environment.finish(results["meta"])
    at_end = dpo_fast_defaults(device, cases)
    if at_end != meta["dpo_fast_default"]:  # e.g. the cpp extension was built during the run
        meta["dpo_fast_default_at_start"], meta["dpo_fast_default"] = meta["dpo_fast_default"], at_end
    tables.write(results, stem)
    print(f"bench_loss: wrote {stem}.json and .md", flush=True)


def _progress(row: dict) -> str:
    figures = (
        f"fwd {row['fwd_ms']} ms, fwd+bwd {row['fwd_bwd_ms']} ms, mem {row['peak_mem_mb']}, err {row['max_rel_err']}"
    )
    status = "OOM" if row["oom"] else (row["error"] or figures)
    return f"{row['case']:10s} {row['tokens']:6d} {row['mode']:8s} {row['implementation']:28s} {status}"


if __name__ == "__main__":
    main()
