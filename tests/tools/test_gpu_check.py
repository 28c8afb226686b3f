"""benchmarks/gpu_check.py, the GPU session's one command: its command line, order, time guards and results.

The whole command runs in CI as ``gpu_check.py --dry-run`` (``.ci/run``, on the GPU machine's stack);
these tests check the parts a dry run on CPU cannot: the device tool's limits, the time guard that
must leave partial results, and the reading of pytest's and the benchmarks' reports.
"""

import json
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_check

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="6">
<testcase classname="tests.test_gpu" name="test_headline_bf16_against_float64_reference[triton]" time="1.0"/>
<testcase classname="tests.test_gpu" name="test_headline_bf16_against_float64_reference[cuda]" time="1.0">
  <failure message="AssertionError: rel err 0.5&#10;second line">trace</failure></testcase>
<testcase classname="tests.test_backends" name="test_matches_reference[torch-bf16]" time="0.1"/>
<testcase classname="tests.test_backends" name="test_matches_reference[triton-bf16]" time="0.1">
  <skipped type="pytest.skip" message="needs a CUDA GPU">skip</skipped></testcase>
<testcase classname="tests.test_build" name="test_stale_build" time="0.1">
  <error message="fixture broke">trace</error></testcase>
<testcase classname="tests.test_validation" name="test_bad_beta" time="0.1"/>
</testsuite></testsuites>
"""

BENCH_ROW = {"case": "headline", "H": 4096, "V": 128256, "tokens": 16384, "dtype": "bfloat16", "oom": False,
             "error": None, "peak_mem_mb": 900.0, "max_rel_err": 2e-3, "gemm_ratio": 1.2}  # fmt: skip


def test_the_command_fits_the_device_tool_and_names_the_commit():
    line = gpu_check.command_line("0123456789ab")
    assert len(line) <= gpu_check.COMMAND_LIMIT_CHARS
    assert "benchmarks/gpu_check.py" in line and "--commit 0123456789ab" in line and "${OUT:-" in line


def test_the_step_limits_fit_seven_minutes():
    assert sum(step.limit_s for step in gpu_check.STEPS) <= 7 * 60
    assert [step.name for step in gpu_check.STEPS][:3] == ["wheels", "environment", "build"]


def test_test_files_run_gpu_path_first_and_each_once():
    tests = Path(__file__).resolve().parents[1]
    ordered = [path.name for path in gpu_check.ordered_test_files(tests, dry_run=False)]
    assert sorted(ordered) == sorted(path.name for path in tests.rglob("test_*.py"))
    assert ordered[0] == "test_gpu.py"
    assert ordered.index("test_backends.py") < ordered.index("test_trainer.py") < ordered.index("test_packaging.py")
    dry_run = gpu_check.ordered_test_files(tests, dry_run=True)
    assert [path.name for path in dry_run] == list(gpu_check.DRY_RUN_TESTS) and all(path.is_file() for path in dry_run)


def test_junit_is_read_into_counts_backends_and_failures(tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    tests = gpu_check.read_junit(path)
    assert (tests["tests"], tests["passed"], tests["failed"], tests["skipped"]) == (6, 3, 2, 1)
    assert tests["by_backend"] == {
        "triton": {"passed": 1, "failed": 0, "skipped": 1},
        "cuda": {"passed": 0, "failed": 1, "skipped": 0},
        "torch": {"passed": 1, "failed": 0, "skipped": 0},
    }
    assert tests["test_gpu"] == {"passed": 1, "failed": 1, "skipped": 0}
    assert tests["failures"][0].endswith("[cuda] - AssertionError: rel err 0.5")
    assert tests["skip_reasons"] == {"needs a CUDA GPU": 1}
    assert gpu_check.read_junit(tmp_path / "missing.xml")["tests"] == 0


def test_gpu_stack_pins_are_read_with_normalized_names(tmp_path):
    path = tmp_path / "stack.txt"
    path.write_text("# comment\ntorch==2.11.0\nhuggingface_hub==1.33.0  # why\n\nnumpy\n")
    assert gpu_check.gpu_stack(path) == {"torch": "2.11.0", "huggingface-hub": "1.33.0"}
    assert {"torch", "triton", "transformers"} <= gpu_check.gpu_stack().keys()


def test_headline_rows_put_the_fastest_full_step_first():
    rows = [
        {**BENCH_ROW, "implementation": "naive", "mode": "dpo", "fwd_ms": 10.0, "fwd_bwd_ms": 30.0},
        {**BENCH_ROW, "implementation": "dpo_fast-triton", "mode": "dpo", "fwd_ms": 5.0, "fwd_bwd_ms": 12.0},
        {**BENCH_ROW, "implementation": "dpo_fast-triton", "mode": "forward", "fwd_ms": 4.0, "fwd_bwd_ms": None},
        {**BENCH_ROW, "implementation": "liger", "mode": "dpo", "oom": True, "fwd_ms": None, "fwd_bwd_ms": None},
        {**BENCH_ROW, "implementation": "cce", "mode": "dpo", "error": "not run: time budget of 55 s spent",
         "fwd_ms": None, "fwd_bwd_ms": None},
    ]  # fmt: skip
    table = gpu_check.headline_rows({"results": rows})
    assert [row["implementation"] for row in table][:2] == ["dpo_fast-triton", "naive"]
    assert table[0]["dpo"]["ms"] == 12.0 and table[0]["forward"]["ms"] == 4.0
    assert {row["implementation"]: row["dpo"] for row in table[2:]} == {"liger": "OOM", "cce": "not run"}


def _check(tmp_path, monkeypatch, steps, budget=None):
    monkeypatch.setattr(gpu_check, "STEPS", steps)
    return gpu_check.Check(tmp_path / "out", dry_run=True, commit="abc", steps=tuple(s.name for s in steps),
                           budget_s=budget)  # fmt: skip


def test_a_command_past_its_limit_is_interrupted_and_keeps_its_output(tmp_path, monkeypatch):
    check = _check(tmp_path, monkeypatch, gpu_check.STEPS)
    started = time.monotonic()
    done = check.run([sys.executable, "-c", "import time; print('partial', flush=True); time.sleep(60)"], limit_s=1)
    assert done["timed_out"] and time.monotonic() - started < 10
    assert done["returncode"] == -signal.SIGINT or done["returncode"] == 1  # killed by SIGINT, or Python's exit
    assert "partial" in done["tail"] and "partial" in (tmp_path / "out" / "gpu_check.log").read_text()


def test_commands_get_sigint_when_this_process_was_started_ignoring_it(tmp_path, monkeypatch):
    """A shell without job control starts background commands with SIGINT ignored, which children inherit."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        check = _check(tmp_path, monkeypatch, gpu_check.STEPS)
        done = check.run([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"], limit_s=1)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert done["timed_out"] and done["returncode"] == -signal.SIGINT, done


def test_a_command_that_ignores_sigint_is_killed(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "GRACE_S", 1)
    check = _check(tmp_path, monkeypatch, gpu_check.STEPS)
    ignore = (
        "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    )
    started = time.monotonic()
    done = check.run([sys.executable, "-c", ignore], limit_s=1)
    assert done["timed_out"] and done["returncode"] == -signal.SIGKILL
    assert time.monotonic() - started < 10


def test_a_step_past_its_limit_leaves_results_and_the_next_step_runs(tmp_path, monkeypatch, capsys):
    steps = (gpu_check.Step("wheels", 2, 2, "sleeps"), gpu_check.Step("tests", 2, 2, "passes"))
    monkeypatch.setattr(gpu_check, "SUMMARY_RESERVE_S", 0)
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 0.5)
    check = _check(tmp_path, monkeypatch, steps)
    sleep = [sys.executable, "-c", "import time; print('working', flush=True); time.sleep(60)"]
    monkeypatch.setattr(check, "step_wheels", lambda: gpu_check._outcome(check.run(sleep), "slept"))
    monkeypatch.setattr(check, "step_tests", lambda: {"status": "passed", "detail": "ok"})
    assert check.run_all() == 1
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [(step["step"], step["status"]) for step in results["steps"]] == [
        ("wheels", "timed_out"),
        ("tests", "passed"),
    ]
    assert results["steps"][0]["seconds"] < 2 + 5
    assert results["files"] == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].startswith("files: gpu_check.json")
    assert "| wheels | timed_out |" in printed


def test_steps_after_the_whole_run_budget_are_not_run(tmp_path, monkeypatch):
    steps = (gpu_check.Step("wheels", 60, 60, "spends it all"), gpu_check.Step("tests", 60, 60, "too late"))
    monkeypatch.setattr(gpu_check, "SUMMARY_RESERVE_S", 0)
    check = _check(tmp_path, monkeypatch, steps, budget=2)
    monkeypatch.setattr(check, "step_wheels", lambda: (time.sleep(2.5), {"status": "passed", "detail": ""})[1])
    assert check.run_all() == 1
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert results["steps"][1]["status"] == "not_run"


def test_the_summary_fits_one_screen():
    results = {
        "date": "2026-11-28T10:00:00+00:00", "commit": "abc", "dry_run": False, "files": ["gpu_check.json"],
        "environment": {"device": {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "sm_count": 132,
                                   "gpu_memory_gib": 79.2, "cuda_available": True}, "torch_build": {"cuda": "13.0"},
                        "versions": {"python": "3.12.3", **{name: "1.0" for name in gpu_check.VERSIONED}},
                        "differs_from_gpu_stack": {"torch": {"here": "2.12.0", "gpu_stack": "2.11.0"}}},
        "steps": [{"step": step.name, "status": "passed", "seconds": 1.0, "limit_s": step.limit_s, "detail": "ok"}
                  for step in gpu_check.STEPS],
        "tests": {"tests": 20, "passed": 10, "failed": 10, "skipped": 0, "test_gpu": {"passed": 1, "failed": 1,
                  "skipped": 0}, "by_backend": {"triton": {"passed": 1, "failed": 1, "skipped": 0}},
                  "failures": [f"tests/test_x.py::test_{i}[triton] - AssertionError" for i in range(10)]},
        "headline_case": {"H": 4096, "V": 128256, "tokens": 16384, "dtype": "bfloat16"},
        "headline": gpu_check.headline_rows({"results": [
            {**BENCH_ROW, "implementation": f"impl-{i}", "mode": mode, "fwd_ms": 1.0, "fwd_bwd_ms": 2.0}
            for i in range(12) for mode in gpu_check.MODES]}),
        "train": [{"model": "llama-1b", "arm": "trl", "status": "ok", "step_s": 0.5, "tokens_per_s": 8000.0,
                   "peak_gib": 20.0, "note": None},
                  {"model": "llama-1b", "arm": "fast", "status": "not measured", "step_s": None,
                   "tokens_per_s": None, "peak_gib": None, "note": "worker stopped"}],
        "total_s": 400.0,
    }  # fmt: skip
    text = gpu_check.summary(results)
    assert len(text.splitlines()) <= 60 and max(len(line) for line in text.splitlines()) <= 200
    assert "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 79.2 GiB)" in text and "torch 2.12.0 (CI 2.11.0)" in text
    assert "python 3.12.3, torch 1.0 (CUDA 13.0)" in text
    assert "| impl-0 | 2.0 (1.20x) | 2.0 (1.20x) | 1.0 (1.20x) | 2.0 (1.20x) | 900 | 2.0e-03 |" in text
    assert "... 2 more in junit.xml" in text and "| llama-1b | trl | 0.500 | 8,000 | 20.0 |" in text
