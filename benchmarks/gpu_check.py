"""The one command for a session that has a GPU: install, build, test and benchmark in 7 minutes, keeping what it got.

On the lent GPU machine (one H100 or H200, no network: ``docs/gpu.md``), from the project
root, with ``.whl/`` (the wheel kit, made here by ``python benchmarks/wheelhouse.py``) carried along::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "${OUT:-gpu-results}" --commit SHA

``python benchmarks/gpu_check.py --command`` prints that line with this checkout's commit.

The steps run in this order, each in its own process group. Their limits (seconds on one H100) add
up to the whole run's 420 s (``--budget``): each step may run until the sum of its own and the
earlier steps' limits, so that time an earlier step did not use goes to the later ones.

===========  =====  ==========================================================================================
step         limit  what
===========  =====  ==========================================================================================
wheels          30  the kit's wheels (trl, liger-kernel, cut-cross-entropy, datasets, ...) into /tmp/site,
                    put on PYTHONPATH; ``.whl/check_wheels.py`` checks their needs and imports each one
environment     15  nvidia-smi, and ``_stack/environment.py --describe`` (the GPU, the versions, the code: the
                    record every results file holds), and where it differs from ``.ci/gpu-stack.txt``
build           90  ``pip install --no-index --no-build-isolation --no-deps -e .``: the C++ and CUDA
                    extensions, for the GPU's architecture (``CUDA_HOME=/usr/local/cuda`` when unset
                    and the headers are there); which of them were built
tests          140  the whole suite with Triton compiled (``TRITON_INTERPRET`` unset): the GPU path's files
                    first (test_gpu.py, the backend-parametrized files), CPU-only packaging tests last
bench_loss      85  ``bench_loss.py --suite gpu --case headline``: H=4096, V=128256, 8 pairs x 1024 tokens,
                    bf16, the four modes, every peer (``--time-budget``: rows not started in time say so)
bench_train     60  ``bench_train.py``: TRL's DPOTrainer and FastDPOTrainer on a Llama-3.2-1B shape, timing
===========  =====  ==========================================================================================

A step past its limit gets SIGINT (pytest still writes its report; the benchmarks rewrite their
JSON after each row), then SIGKILL 15 s later, and the next step runs. After every step the results
so far are in ``--out`` (``$OUT`` on the device machine): ``gpu_check.json`` (every step, the tests
by backend, the failures, the headline figures), ``gpu_check.md``, ``gpu_check.log`` (each command
and its output), ``junit.xml``, and the benchmarks' ``<date>-<gpu>.{json,md}`` and
``bench_train.{json,md}``: the 8 files the device tool brings back. The last thing printed is a
one-screen summary. Exit status 0 when every step passed (or was skipped, with the reason), else 1.

``--dry-run`` runs the same steps on CPU at tiny shapes (Triton in its interpreter, a few test
files, ``bench_loss.py --suite smoke``, ``bench_train.py --smoke``) in a few minutes; CI runs it, so
the command cannot rot between GPU sessions. This script imports only the standard library: each
step runs in the interpreter that runs it (``sys.executable``), the environment record too.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[1]
ENVIRONMENT = ROOT / "benchmarks" / "_stack" / "environment.py"  # the environment record every results file holds
GPU_STACK = ROOT / ".ci" / "gpu-stack.txt"
KIT = ROOT / ".whl"
CUDA_TOOLKIT = "/usr/local/cuda"
SUMMARY_RESERVE_S = 10  # kept back from the last step for writing the results
GRACE_S = 15  # between SIGINT and SIGKILL
MIN_STEP_S = 5  # a step with less time left is not started
LOG_LIMIT_CHARS = 15 * 2**20  # the device tool brings back files of at most 16 MiB
COMMAND_LIMIT_CHARS = 2000  # the device tool's command line
MAX_FILES = 8  # the device tool brings back at most 8 files
MODES = ("dpo", "frozen", "forward", "token")

# Test files in the order they run: the GPU path first, then the others (sorted), then the CPU-only ones.
TESTS_FIRST = ("test_gpu.py", "test_backends.py", "test_contract.py", "test_csrc.py", "test_autograd.py",
               "test_validation.py", "test_compile.py", "test_memory.py")  # fmt: skip
TESTS_LAST = ("test_bench_smoke.py", "test_trl_bench.py", "test_build.py", "test_packaging.py")
DRY_RUN_TESTS = ("test_gpu.py", "test_validation.py")
BACKEND_NAMES = ("torch", "triton", "cuda", "cpp", "reference")
# the versions the summary shows (the record holds every one of _stack.environment.PACKAGES)
VERSIONED = ("torch", "triton", "transformers", "accelerate", "datasets", "trl", "peft", "liger-kernel",
             "cut-cross-entropy", "numpy", "huggingface-hub")  # fmt: skip
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}  # fmt: skip

EXTENSIONS_PROBE = r"""
import json
from dpo_fast import _build
print(json.dumps({name: _build.is_built(name) for name in ("cpp", "cuda")}))
"""


@dataclasses.dataclass(frozen=True)
class Step:
    """One step: its name, its time limits in seconds (GPU run, dry run) and what it does."""

    name: str
    limit_s: float
    dry_run_limit_s: float
    does: str


STEPS = (
    Step("wheels", 30, 60, "the wheel kit installed and imported"),
    Step("environment", 15, 60, "device and versions"),
    Step("build", 90, 300, "pip install -e . (C++ and CUDA extensions)"),
    Step("tests", 140, 300, "the test suite, Triton compiled"),
    Step("bench_loss", 85, 240, "bench_loss.py, headline shape, four modes, the peers"),
    Step("bench_train", 60, 300, "bench_train.py, TRL vs FastDPOTrainer, timing"),
)
STEP_NAMES = tuple(step.name for step in STEPS)


def command_line(commit: str) -> str:
    """The device tool's command for the GPU session (run in the project root, with ``.whl`` carried)."""
    return f'PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out "${{OUT:-gpu-results}}" --commit {commit}'


def checkout_commit() -> str:
    """This checkout's commit, with ``-dirty`` when tracked files changed; ``unknown`` without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def gpu_stack(path: Path = GPU_STACK) -> dict[str, str]:
    """``{package: version}`` pinned by ``.ci/gpu-stack.txt``: the GPU machine's stack, CI's second job."""
    pins = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            name, _, version = line.split("#", 1)[0].partition("==")
            if version.strip():
                pins[_normalized(name.strip())] = version.strip()
    return pins


def ordered_test_files(tests: Path, dry_run: bool) -> list[Path]:
    """The test files in the order they run (``TESTS_FIRST``, the others, ``TESTS_LAST``); a few in a dry run."""
    found = {path.name: path for path in sorted(tests.rglob("test_*.py"))}
    if dry_run:
        return [found[name] for name in DRY_RUN_TESTS if name in found]
    middle = [name for name in found if name not in TESTS_FIRST + TESTS_LAST]
    order = [name for name in TESTS_FIRST if name in found] + middle + [name for name in TESTS_LAST if name in found]
    return [found[name] for name in order]


def read_junit(path: Path) -> dict:
    """Counts, failures (id and first line of the message), skip reasons, and outcomes by backend and of test_gpu.py.

    A test's backend is a word of ``BACKEND_NAMES`` among its parameters (``test_x[triton-bf16]``).
    """
    summary = {"tests": 0, "passed": 0, "failed": 0, "skipped": 0, "failures": [], "skip_reasons": {},
               "by_backend": {}, "test_gpu": {"passed": 0, "failed": 0, "skipped": 0}}  # fmt: skip
    if not path.is_file():
        return summary
    reasons: Counter = Counter()
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                message = (child.get("message") or child.text or child.tag).strip().splitlines() or [child.tag]
                summary["failures"].append(f"{name} - {message[0][:160]}")
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
                reasons[(child.get("message") or "").strip()[:160]] += 1
        summary["tests"] += 1
        summary[outcome] += 1
        params = re.search(r"\[(.*)\]$", case.get("name", ""))
        words = set(re.split(r"[-_,\s]", params.group(1))) if params else set()
        for backend in BACKEND_NAMES:
            if backend in words:
                summary["by_backend"].setdefault(backend, {"passed": 0, "failed": 0, "skipped": 0})[outcome] += 1
        if case.get("classname", "").endswith("test_gpu"):
            summary["test_gpu"][outcome] += 1
    summary["skip_reasons"] = dict(reasons.most_common())
    return summary


def headline_rows(results: dict) -> list[dict]:
    """One row per implementation of a bench_loss results file, fastest full step first.

    Each mode's cell: ``{"ms", "gemm_ratio", "peak_mem_mb", "max_rel_err"}`` (ms of forward+backward,
    of the forward in the forward mode), or ``"OOM"``, ``"error"``, ``"not run"``.
    """
    table: dict[str, dict] = {}
    for row in results.get("results", []):
        cells = table.setdefault(row["implementation"], {"implementation": row["implementation"]})
        if row.get("oom"):
            cells[row["mode"]] = "OOM"
        elif row.get("error"):
            cells[row["mode"]] = "not run" if row["error"].startswith("not run") else "error"
        else:
            cells[row["mode"]] = {
                "ms": row["fwd_ms"] if row["mode"] == "forward" else row["fwd_bwd_ms"],
                "gemm_ratio": row.get("gemm_ratio"), "peak_mem_mb": row.get("peak_mem_mb"),
                "max_rel_err": row.get("max_rel_err"),
            }  # fmt: skip

    def full_step_ms(cells: dict) -> float:
        dpo = cells.get("dpo")
        return dpo["ms"] if isinstance(dpo, dict) and dpo["ms"] is not None else float("inf")

    return sorted(table.values(), key=full_step_ms)


def train_rows(report: dict) -> list[dict]:
    """One row per (model, arm) of a bench_train results file: step time, tokens/s, peak memory, or why not."""
    rows = []
    for entry in report.get("results", []):
        timing = entry.get("timing") or {}
        rows.append({
            "model": entry.get("model"), "arm": entry.get("arm"), "status": entry.get("status"),
            "step_s": timing.get("step_s"), "tokens_per_s": timing.get("tokens_per_s"),
            "peak_gib": timing.get("total_peak_gib"),
            "note": entry.get("reason") or entry.get("worker"),
        })  # fmt: skip
    return rows


class Check:
    """One run: the steps, their processes and time limits, and the results written after each step."""

    def __init__(self, out: Path, dry_run: bool, commit: str, steps: tuple[str, ...], budget_s: float | None = None):
        self.out, self.dry_run, self.commit, self.steps = out, dry_run, commit, steps
        # A process started in the background by a shell without job control ignores SIGINT, and so would
        # its children: pytest could not be interrupted into writing its report. A handler is not inherited.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        limits = [step.dry_run_limit_s if dry_run else step.limit_s for step in STEPS]
        self.started = time.monotonic()
        self.deadline = self.started + (budget_s or sum(limits))
        # each step may run until the sum of its own and the earlier steps' limits
        self.step_ends = [self.started + end for end in itertools.accumulate(limits)]
        self.step_end = self.started
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.site = self.scratch / "site" if dry_run else Path("/tmp/site")
        self.env = {**os.environ, **OFFLINE}
        self.env.pop("TRITON_INTERPRET", None)
        if dry_run:
            self.env["TRITON_INTERPRET"] = "1"  # Triton runs on CPU only in its interpreter
        else:  # the kit's folder, also for a rerun of later steps (--steps) on a machine that has it
            self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.site), os.environ.get("PYTHONPATH")]))
            if "CUDA_HOME" not in self.env and Path(CUDA_TOOLKIT, "include", "cuda_runtime_api.h").is_file():
                # torch takes CUDA_HOME from nvcc's folder, which a wrapper script can make one without headers
                self.env["CUDA_HOME"] = CUDA_TOOLKIT
        out.mkdir(parents=True, exist_ok=True)
        self.log = (out / "gpu_check.log").open("w", encoding="utf-8")
        self.log_chars = 0
        self.results = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit, "dry_run": dry_run, "budget_s": round(self.deadline - self.started),
            "steps": [], "environment": {}, "extensions": {}, "tests": {}, "headline_case": {}, "headline": [],
            "train": [], "files": [],
        }  # fmt: skip

    # ---- running commands

    def write_log(self, text: str) -> None:
        room = LOG_LIMIT_CHARS - self.log_chars
        if room <= 0:
            return
        self.log.write(text[:room] if len(text) < room else text[:room] + "\n[gpu_check: log cut at 15 MiB]\n")
        self.log_chars += len(text)
        self.log.flush()

    def run(self, command: list[str], env: dict | None = None, limit_s: float | None = None) -> dict:
        """``command`` in its own process group, its output to the log, until the step's end (or ``limit_s``).

        Past it: SIGINT to the group, SIGKILL ``GRACE_S`` later. Returns the exit code, whether it was
        stopped, its seconds and the last 40 lines of its output.
        """
        limit = self.step_end - time.monotonic() if limit_s is None else limit_s
        self.write_log(f"\n$ {shlex.join(command)}   (limit {limit:.0f} s)\n")
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=ROOT, env=env or self.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, errors="replace",
                                   start_new_session=True)  # fmt: skip
        tail: list[str] = []

        def copy_output() -> None:
            for line in process.stdout:
                self.write_log(line)
                tail.append(line)
                del tail[:-40]

        reader = threading.Thread(target=copy_output, daemon=True)
        reader.start()
        timed_out = False
        try:
            process.wait(timeout=max(limit, 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            _signal_group(process, signal.SIGINT)
            try:
                process.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()
        reader.join(timeout=5)
        seconds = time.monotonic() - started
        self.write_log(
            f"[exit {process.returncode} after {seconds:.1f} s{', stopped at its limit' if timed_out else ''}]\n"
        )
        return {"returncode": process.returncode, "timed_out": timed_out, "seconds": seconds, "tail": "".join(tail)}

    def python(self, *args: str, env: dict | None = None, limit_s: float | None = None) -> dict:
        return self.run([sys.executable, *args], env, limit_s)

    @staticmethod
    def json_of(done: dict) -> dict:
        """The JSON object a command printed last, or ``{"error": its output's end}``."""
        for line in reversed(done["tail"].splitlines()):
            if line.startswith("{"):
                return json.loads(line)
        return {"error": done["tail"][-500:] or f"exit {done['returncode']}"}

    def probe(self, code: str, *args: str) -> dict:
        """The JSON object a ``python -c code`` prints last, or ``{"error": its output's end}``."""
        return self.json_of(self.python("-c", code, *args, limit_s=max(self.step_end - time.monotonic(), 30)))

    # ---- the steps: each returns {"status", "detail"}

    def step_wheels(self) -> dict:
        wheels = sorted(KIT.glob("*.whl"))
        if not wheels:
            reason = "no .whl/ here: make it with python benchmarks/wheelhouse.py and carry it (carry: ['.whl'])"
            return {"status": "skipped" if self.dry_run else "failed", "detail": reason}
        install = ["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                   "--upgrade", "--target", str(self.site)]  # fmt: skip
        if self.dry_run:  # the kit is for the GPU machine's Python 3.12: check that it installs there, import nothing
            install += ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
                        "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64"]  # fmt: skip
        done = self.python(*install, *map(str, wheels))
        if done["returncode"] != 0 or self.dry_run:
            return _outcome(done, f"{len(wheels)} wheels into {self.site}")
        checker = KIT / "check_wheels.py"
        if not checker.is_file():
            return {"status": "passed", "detail": f"{len(wheels)} wheels installed (no .whl/check_wheels.py)"}
        return _outcome(self.python(str(checker), "--installed", "--import", str(KIT)),
                        f"{len(wheels)} wheels installed and imported")  # fmt: skip

    def step_environment(self) -> dict:
        environment = self.json_of(self.python(str(ENVIRONMENT), "--describe",
                                               limit_s=max(self.step_end - time.monotonic(), 30)))  # fmt: skip
        if shutil.which("nvidia-smi"):
            query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
            environment["nvidia_smi"] = self.run(query, limit_s=20)["tail"].strip()
        versions = {_normalized(name): version for name, version in environment.get("versions", {}).items()}
        environment["differs_from_gpu_stack"] = {
            name: {"here": versions.get(name), "gpu_stack": pin}
            for name, pin in gpu_stack().items()
            if versions.get(name) and versions[name].split("+")[0] != pin
        }  # fmt: skip
        self.results["environment"] = environment
        if "error" in environment:
            return {"status": "failed", "detail": environment["error"]}
        if not self.dry_run and not environment["device"].get("cuda_available"):
            return {"status": "failed", "detail": "torch sees no CUDA device (on a CPU machine: --dry-run)"}
        return {"status": "passed", "detail": environment["device"].get("gpu", "CPU")}

    def step_build(self) -> dict:
        env = {**self.env, "MAX_JOBS": str(os.cpu_count() or 2)}
        done = self.python("-m", "pip", "install", "-v", "--no-index", "--no-build-isolation", "--no-deps", "-e",
                           str(ROOT), env=env)  # fmt: skip
        if done["returncode"] != 0 or done["timed_out"]:
            return _outcome(done, "pip install -e .")
        built = self.probe(EXTENSIONS_PROBE)
        self.results["extensions"] = built
        if "error" in built:
            return {"status": "failed", "detail": f"dpo_fast does not import: {built['error'][-300:]}"}
        wanted = ("cpp",) if self.dry_run else ("cpp", "cuda")
        detail = "extensions: " + ", ".join(f"{name} {'built' if ok else 'not built'}" for name, ok in built.items())
        return {"status": "passed" if all(built.get(name) for name in wanted) else "failed", "detail": detail}

    def step_tests(self) -> dict:
        junit = self.out / "junit.xml"
        files = [str(path.relative_to(ROOT)) for path in ordered_test_files(ROOT / "tests", self.dry_run)]
        done = self.python("-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={junit}", *files)
        tests = read_junit(junit)
        self.results["tests"] = tests
        counts = f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped"
        if done["timed_out"]:
            return {"status": "timed_out", "detail": f"{counts} before its limit (files in junit.xml's order)"}
        if done["returncode"] not in (0, 1):  # 1: tests failed; anything else: pytest could not run them
            return _outcome(done, counts)
        return {"status": "passed" if done["returncode"] == 0 else "failed", "detail": counts}

    def step_bench_loss(self) -> dict:
        folder = self.scratch / "bench_loss"
        suite = ["--suite", "smoke", "--case", "smoke"] if self.dry_run else ["--suite", "gpu", "--case", "headline"]
        limit = self.step_end - time.monotonic()
        budget = max(limit - 30, limit / 2)  # rows not started by then are recorded as not run
        done = self.python("benchmarks/bench_loss.py", *suite, "--out", str(folder), "--time-budget", f"{budget:.0f}")
        found = sorted(folder.glob("*.json"))
        if not found:
            return _outcome(done, "no results file")
        results = json.loads(found[0].read_text())
        if not found[0].with_suffix(".md").is_file():  # written at the end of a run: draw it from the JSON
            self.python("benchmarks/bench_loss.py", "report", str(found[0]), limit_s=30)
        self._keep(found[0], found[0].with_suffix(".md"))
        rows = results.get("results", [])
        self.results["headline_case"] = {key: rows[0][key] for key in ("H", "V", "tokens", "dtype")} if rows else {}
        self.results["headline"] = headline_rows(results)
        failed = sum(1 for row in rows if row.get("error") and not row["error"].startswith("not run"))
        not_run = sum(1 for row in rows if (row.get("error") or "").startswith("not run"))
        return _outcome(done, f"{len(rows)} rows: {failed} failed, {not_run} not run (time budget)")

    def step_bench_train(self) -> dict:
        folder = self.scratch / "bench_train"
        if self.dry_run:
            arguments = ["--smoke", "--arms", "trl,fast"]
        else:
            limit = self.step_end - time.monotonic()
            arguments = ["--models", "llama-1b", "--arms", "trl,fast", "--timed-steps", "3",
                         "--deadline-s", f"{max(limit - 20, limit / 2):.0f}"]  # fmt: skip
        done = self.python("benchmarks/bench_train.py", *arguments, "--out", str(folder))
        results = folder / "bench_train.json"
        if not results.is_file():
            return _outcome(done, "no results file")
        if not (folder / "bench_train.md").is_file():  # written at the end of a run: draw it from the JSON
            self.python("benchmarks/bench_train.py", "report", str(results), limit_s=30)
        (folder / "bench_train.png").unlink(missing_ok=True)  # one file too many: `bench_train.py report` redraws it
        self._keep(results, folder / "bench_train.md")
        self.results["train"] = train_rows(json.loads(results.read_text()))
        measured = sum(1 for row in self.results["train"] if row["tokens_per_s"])
        outcome = _outcome(done, f"{measured} of {len(self.results['train'])} arms measured")
        if outcome["status"] == "passed" and not measured:
            outcome["status"] = "failed"
        return outcome

    # ---- the run

    def _keep(self, *files: Path) -> None:
        for path in files:
            if path.is_file():
                shutil.copy2(path, self.out / path.name)

    def run_all(self) -> int:
        for step, step_end in zip(STEPS, self.step_ends, strict=True):
            self.step_end = min(step_end, self.deadline - SUMMARY_RESERVE_S)
            limit = self.step_end - time.monotonic()
            record = {"step": step.name, "limit_s": round(max(limit, 0)), "does": step.does, "seconds": 0.0}
            if step.name not in self.steps:
                record.update(status="skipped", detail="not asked for (--steps)")
            elif limit < MIN_STEP_S:
                record.update(status="not_run", detail=f"the run's {self.results['budget_s']} s were spent")
            else:
                print(f"gpu_check: {step.name} (until {limit:.0f} s from now): {step.does}", flush=True)
                started = time.monotonic()
                try:
                    record.update(getattr(self, f"step_{step.name}")())
                except Exception as error:  # noqa: BLE001 (a broken step is reported, and the next one runs)
                    record.update(status="failed", detail=f"gpu_check: {error!r}")
                record["seconds"] = round(time.monotonic() - started, 1)
                print(f"gpu_check: {step.name} {record['status']} in {record['seconds']:.0f} s: {record['detail']}",
                      flush=True)  # fmt: skip
            self.results["steps"].append(record)
            self.write_results()
        self.results["total_s"] = round(time.monotonic() - self.started, 1)
        self.write_results()
        self.log.close()
        shutil.rmtree(self.scratch, ignore_errors=True)
        print(summary(self.results), end="", flush=True)
        return 0 if all(record["status"] in ("passed", "skipped") for record in self.results["steps"]) else 1

    def write_results(self) -> None:
        names = {path.name for path in self.out.iterdir() if path.is_file()} | {"gpu_check.json", "gpu_check.md"}
        self.results["files"] = sorted(names)
        if len(names) > MAX_FILES:
            self.results["files_warning"] = f"{len(names)} files in {self.out}: the device tool brings back {MAX_FILES}"
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1))
        (self.out / "gpu_check.md").write_text(summary(self.results))


def _signal_group(process: subprocess.Popen, which: signal.Signals) -> None:
    try:
        os.killpg(process.pid, which)
    except ProcessLookupError:
        pass


def _outcome(done: dict, detail: str) -> dict:
    """A step's status from its command's: passed, timed_out, or failed with the end of its output."""
    if done["timed_out"]:
        return {"status": "timed_out", "detail": detail}
    if done["returncode"] == 0:
        return {"status": "passed", "detail": detail}
    last = [line.strip() for line in done["tail"].splitlines() if line.strip()][-3:]
    return {"status": "failed", "detail": f"{detail}; exit {done['returncode']}: {' | '.join(last)[-300:]}"}


def _mode_cell(cell: object) -> str:
    if isinstance(cell, dict):
        if cell["ms"] is None:
            return "-"
        return f"{cell['ms']:.1f}" + (f" ({cell['gemm_ratio']:.2f}x)" if cell.get("gemm_ratio") else "")
    return str(cell) if cell else "-"


def _headline_lines(results: dict) -> list[str]:
    case = results["headline_case"]
    title = (
        f"bench_loss (H={case.get('H')}, V={case.get('V')}, {case.get('tokens')} tokens, {case.get('dtype')}): ms of "
        "forward+backward (forward in the forward mode), x GEMM line; the full step's peak MiB and max rel err"
    )
    lines = [
        title,
        "| implementation | dpo | frozen | forward | token | dpo MiB | dpo err |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["headline"]:
        dpo = row.get("dpo") if isinstance(row.get("dpo"), dict) else {}
        memory = f"{dpo['peak_mem_mb']:.0f}" if dpo.get("peak_mem_mb") is not None else "-"
        error = f"{dpo['max_rel_err']:.1e}" if dpo.get("max_rel_err") is not None else "-"
        modes = " | ".join(_mode_cell(row.get(mode)) for mode in MODES)
        lines.append(f"| {row['implementation']} | {modes} | {memory} | {error} |")
    return lines


def summary(results: dict) -> str:
    """The one-screen summary: printed last, and ``gpu_check.md``."""
    environment = results["environment"]
    found, versions = environment.get("device", {}), environment.get("versions", {})
    title = "gpu_check --dry-run (CPU, tiny shapes)" if results["dry_run"] else "gpu_check"
    device = "CPU"
    if found.get("gpu"):
        architecture = "sm_" + found["capability"].replace(".", "")
        device = f"{found['gpu']} ({architecture}, {found['sm_count']} SMs, {found['gpu_memory_gib']} GiB)"
    lines = [f"# {title}: {results['date']}, commit {results['commit']}", "", f"device: {device}"]
    if environment.get("nvidia_smi"):
        lines[-1] += f"; nvidia-smi: {environment['nvidia_smi']}"
    if versions:
        others = ", ".join(f"{name} {versions[name]}" for name in VERSIONED[1:] if versions.get(name))
        lines.append(f"python {versions.get('python')}, torch {versions.get('torch')} "
                     f"(CUDA {environment.get('torch_build', {}).get('cuda')}), {others}")  # fmt: skip
    differs = environment.get("differs_from_gpu_stack")
    if differs:
        pairs = ", ".join(f"{name} {pair['here']} (CI {pair['gpu_stack']})" for name, pair in differs.items())
        lines.append(f"differs from .ci/gpu-stack.txt, the stack CI tests: {pairs}")
    lines += ["", "| step | status | seconds | limit | detail |", "| --- | --- | ---: | ---: | --- |"]
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']:.0f} | {r['limit_s']} | {r['detail']} |"
              for r in results["steps"]]  # fmt: skip
    tests = results["tests"]
    if tests.get("tests"):
        by_backend = "; ".join(f"{name} {tally['passed']} passed, {tally['failed']} failed, {tally['skipped']} skipped"
                               for name, tally in tests["by_backend"].items())  # fmt: skip
        gpu_file = tests["test_gpu"]
        outcomes = f"{gpu_file['passed']} passed, {gpu_file['failed']} failed, {gpu_file['skipped']} skipped"
        lines += ["", f"tests by backend: {by_backend or '-'}; test_gpu.py: {outcomes}"]
        lines += [f"  FAILED {failure}" for failure in tests["failures"][:8]]
        if len(tests["failures"]) > 8:
            lines.append(f"  ... {len(tests['failures']) - 8} more in junit.xml")
    if results["headline"]:
        lines += ["", *_headline_lines(results)]
    if results["train"]:
        lines += [
            "",
            "bench_train:",
            "| model | arm | step s | tokens/s | peak GiB |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for row in results["train"]:
            peak = f"{row['peak_gib']:.1f}" if row["peak_gib"] else "-"
            figures = (f"{row['step_s']:.3f} | {row['tokens_per_s']:,.0f} | {peak}" if row["tokens_per_s"]
                       else f"{row['status']}: {row['note'] or ''} | | ")  # fmt: skip
            lines.append(f"| {row['model']} | {row['arm']} | {figures} |")
    total = f"; {results['total_s']:.0f} s in all" if "total_s" in results else ""
    lines += ["", f"files: {', '.join(results['files'])}{total}"]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-results"),
                        help="folder for the results (default: $OUT when set, else gpu-results)")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="the same steps on CPU at tiny shapes (CI runs it)")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default: the sum of the step limits)")
    parser.add_argument("--steps", default=",".join(STEP_NAMES), help="comma-separated steps to run (default: all)")
    parser.add_argument("--commit", help="the commit measured (default: git's, where the checkout has .git)")
    parser.add_argument("--command", action="store_true", help="print the GPU session's command line and exit")
    args = parser.parse_args(argv)
    unknown = set(args.steps.split(",")) - set(STEP_NAMES)
    if unknown:
        parser.error(f"--steps: unknown {sorted(unknown)}; choose from {','.join(STEP_NAMES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    commit = args.commit or checkout_commit()
    if args.command:
        if commit.endswith("-dirty") or commit == "unknown":
            print(f"gpu_check: the checkout is at {commit}: commit first, so that the results name what they measured",
                  file=sys.stderr)  # fmt: skip
        print(command_line(commit))
        return 0
    return Check(args.out, args.dry_run, commit, tuple(args.steps.split(",")), args.budget).run_all()


if __name__ == "__main__":
    sys.exit(main())
