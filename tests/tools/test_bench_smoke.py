"""The benchmark harness end to end on CPU: ``benchmarks/bench_loss.py --suite smoke`` (tiny shapes, every mode).

One run of the CLI feeds most tests here. Each implementation the harness knows gets a test: it
passes when all its rows were measured and match the float64 reference, and is skipped, with the
harness's reason, when it cannot run here (a peer that is not installed, a GPU-only kernel).
A second run measures the smoke sweep as the cpu suites run (each measurement in its own process,
three rounds), for the rounds and the plots; ``record_figures.py`` runs on small settings.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

from _loss.cases import SUITES, Case
from _loss.implementations import all_implementations
from _loss.measure import Settings, record_for
from _loss.tables import MEMORY_CAP_NOTE, derive, goal_lines, line_style, markdown
from _stack import environment
from bench_loss import DEFAULT_SETTINGS, ROUND_FIGURES, Runner, combine_rounds, memory_cap_reason, suite_defaults

ROW_KEYS = {"case", "pairs", "T", "H", "V", "tokens", "valid_tokens", "dtype", "implementation", "mode", "fwd_ms",
            "fwd_bwd_ms", "tflops", "gemm_ratio", "peak_mem_mb", "memory_kind", "max_rel_err", "errors", "oom",
            "error", "rounds", "median_round"}  # fmt: skip


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    command = [sys.executable, str(BENCH / "bench_loss.py"), "--suite", "smoke", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("*-smoke.json")
    return json.loads(path.read_text()), out


def test_no_module_of_benchmarks_can_shadow_or_be_shadowed_by_an_installed_package():
    """``python benchmarks/x.py`` puts benchmarks/ first on sys.path: a module there named like a PyPI package
    (``environment``, ``report``, ``cases`` and ``measure`` were) would hide it from every library importing it, or
    the other way round. Only the scripts have plain names; the rest is in packages whose names start with ``_``,
    which no PyPI project's can."""
    scripts = {
        "bench_loss", "bench_train", "bench_memory", "gpu_check", "record_figures", "check_wheels", "trl_versions",
        "vocab_parallel_memory", "wheelhouse",
    }  # fmt: skip
    top_level = {path.stem for path in BENCH.glob("*.py")} | {path.parent.name for path in BENCH.glob("*/__init__.py")}
    assert {name for name in top_level if not name.startswith("_")} == scripts


def test_results_have_the_documented_schema(smoke):
    results, out = smoke
    assert {"meta", "suite", "settings", "missing", "results"} <= results.keys()
    assert {"date", "device", "versions", "code", "dpo_fast_default"} <= results["meta"].keys()
    assert {"torch", "triton", "trl", "liger-kernel", "cut-cross-entropy", "verl"} <= results["meta"]["versions"].keys()
    for row in results["results"]:
        assert row.keys() == ROW_KEYS, row.keys() ^ ROW_KEYS
    assert all(item["reason"] for item in results["missing"])
    (table,) = out.glob("*-smoke.md")
    assert "| implementation |" in table.read_text()


def test_the_sweep_is_plotted(smoke):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install .[bench])")
    assert list(smoke[1].glob("*-smoke-time.png"))


def test_every_mode_of_every_case_has_its_gemm_line(smoke):
    results, _ = smoke
    measured = {
        (row["case"], row["tokens"], row["mode"]) for row in results["results"] if row["implementation"] == "gemm"
    }
    wanted = {(case.name, case.tokens, mode) for case in SUITES["smoke"] for mode in case.modes}
    assert measured == wanted


@pytest.mark.parametrize("name", [impl.name for impl in all_implementations()])
def test_implementation_runs_and_matches_the_reference(smoke, name):
    results, _ = smoke
    reasons = {item["implementation"]: item["reason"] for item in results["missing"]}
    if name in reasons:
        pytest.skip(f"{name} not measured here: {reasons[name]}")
    impl = next(impl for impl in all_implementations() if impl.name == name)
    rows = [row for row in results["results"] if row["implementation"] == name]
    wanted = {(case.name, case.tokens, mode) for case in SUITES["smoke"] for mode in case.modes if mode in impl.modes}
    assert {(row["case"], row["tokens"], row["mode"]) for row in rows} == wanted
    for row in rows:
        assert not row["oom"] and row["error"] is None, row
        assert row["fwd_ms"] > 0 and row["tflops"] > 0
        if row["mode"] != "forward":
            assert row["fwd_bwd_ms"] >= row["fwd_ms"]
        if name != "gemm":
            # float32 on CPU: DESIGN.md's tolerance against the float64 reference
            assert row["max_rel_err"] <= 1e-4, row["errors"]


def test_derive_counts_the_modes_products_and_the_gemm_ratio():
    base = {"case": "c", "tokens": 8, "valid_tokens": 4, "H": 10, "V": 100, "mode": "frozen"}
    rows = [
        {**base, "implementation": "gemm", "fwd_ms": 1.0, "fwd_bwd_ms": 2.0},
        {**base, "implementation": "x", "fwd_ms": 3.0, "fwd_bwd_ms": 4.0},
        {**base, "implementation": "x", "mode": "forward", "fwd_ms": 0.5, "fwd_bwd_ms": None},
    ]
    derive(rows)
    assert rows[1]["tflops"] == pytest.approx(2 * 2 * 4 * 10 * 100 / 4e-3 / 1e12)  # two products, 4 ms
    assert rows[1]["gemm_ratio"] == pytest.approx(2.0)
    assert rows[2]["tflops"] == pytest.approx(2 * 4 * 10 * 100 / 0.5e-3 / 1e12)  # forward: one product, fwd time
    assert rows[2]["gemm_ratio"] is None  # no forward-mode GEMM line among these rows


def _goal_rows(ours: str) -> list[dict]:
    base = {"case": "cpu", "mode": "dpo", "dtype": "float32", "fwd_ms": 1.0}
    return [
        {**base, "implementation": ours, "fwd_bwd_ms": 2.0, "peak_mem_mb": 10.0},
        {**base, "implementation": ours + "-recompute", "fwd_bwd_ms": 1.0, "peak_mem_mb": 1.0},
        {**base, "implementation": "cce", "fwd_bwd_ms": 4.0, "peak_mem_mb": 50.0},
        {**base, "implementation": "naive", "fwd_bwd_ms": 3.0, "peak_mem_mb": 80.0},
    ]


@pytest.mark.parametrize("ours", ["dpo_fast-cpp", "dpo_fast-torch"])
def test_goals_compare_the_default_the_results_file_records(ours):
    """The default comes from the file (what the measuring machine ran), whatever this machine would resolve."""
    recorded = {"float32": {"backend": ours.removeprefix("dpo_fast-"), "grads_in_forward": True, "scratch_mib": 64,
                            "implementation": ours}}  # fmt: skip
    lines = goal_lines({"meta": {"device": {"type": "cpu"}, "dpo_fast_default": recorded}, "results": _goal_rows(ours)})
    # the default runs gradients in the forward, so the faster "-recompute" variant here is not the one compared
    assert f"| cpu · dpo | time | {ours} | cce | 0.5 | <= 1.0 | met |" in lines
    assert f"| cpu · dpo | memory | {ours} | naive | 0.125 | <= 0.1 | not met |" in lines


def test_goals_of_a_file_without_the_recorded_default_are_not_judged():
    lines = goal_lines({"meta": {"device": {"type": "cpu"}}, "results": _goal_rows("dpo_fast-cpp")})
    assert "| cpu · dpo | time | not recorded | cce | – | <= 1.0 | not judged |" in lines
    assert not any(line.endswith((" met |", " not met |")) for line in lines)
    assert any("does not record what dpo_fast's default was" in line for line in lines)


def test_the_recorded_default_is_what_auto_resolves_here():
    recorded = environment.dpo_fast_default(torch.device("cpu"), torch.float32)
    from dpo_fast import backends

    assert recorded["backend"] == backends.resolve("auto", torch.device("cpu"), torch.float32)
    assert recorded["grads_in_forward"] and recorded["implementation"] == f"dpo_fast-{recorded['backend']}"


# ----------------------------------------------------------------------------------------------
# rounds: one round's figures per row, every round's errors


def _round(fwd_bwd_ms: float, peak: float, err: float) -> dict:
    row = record_for(SUITES["smoke"][0], "x", "dpo")
    errors = {"loss": err / 2, "grad_weight": err}
    return {**row, "fwd_ms": fwd_bwd_ms / 2, "fwd_bwd_ms": fwd_bwd_ms, "peak_mem_mb": peak, "errors": errors,
            "max_rel_err": err}  # fmt: skip


def test_a_rows_figures_are_its_median_rounds_and_its_errors_every_rounds():
    rounds = [_round(30.0, 5.0, 1e-7), _round(10.0, 9.0, 3e-7), _round(20.0, 1.0, 2e-7)]
    row = combine_rounds(rounds)
    # the median round by time is round 2 (20 ms): its memory goes with it, not the median memory (5)
    assert row["median_round"] == 2
    assert (row["fwd_ms"], row["fwd_bwd_ms"], row["peak_mem_mb"]) == (10.0, 20.0, 1.0)
    assert row["max_rel_err"] == 3e-7 and row["errors"] == {"loss": 1.5e-7, "grad_weight": 3e-7}
    assert [r["fwd_bwd_ms"] for r in row["rounds"]] == [30.0, 10.0, 20.0]
    assert all(r.keys() == set(ROUND_FIGURES) for r in row["rounds"])


def test_an_even_number_of_rounds_takes_the_lower_middle_one():
    row = combine_rounds([_round(40.0, 1.0, 1e-7), _round(10.0, 2.0, 1e-7), _round(30.0, 3.0, 1e-7),
                          _round(20.0, 4.0, 1e-7)])  # fmt: skip
    assert row["median_round"] == 3 and row["fwd_bwd_ms"] == 20.0


def test_rounds_not_run_take_no_part_and_are_kept():
    not_run = {**record_for(SUITES["smoke"][0], "x", "dpo"), "error": "not run: time budget of 60 s spent"}
    row = combine_rounds([_round(30.0, 5.0, 1e-7), _round(10.0, 9.0, 3e-7), not_run])
    assert row["error"] is None and row["median_round"] == 1 and row["fwd_bwd_ms"] == 10.0  # lower middle of two
    assert row["max_rel_err"] == 3e-7 and row["rounds"][2]["error"].startswith("not run")
    assert combine_rounds([not_run, not_run])["error"] == not_run["error"]


def test_a_failed_round_fails_the_row_and_keeps_every_round():
    failed = {**record_for(SUITES["smoke"][0], "x", "dpo"), "error": "RuntimeError: boom"}
    row = combine_rounds([_round(10.0, 1.0, 1e-7), failed, _round(12.0, 1.0, 1e-7)])
    assert row["error"] == "RuntimeError: boom" and len(row["rounds"]) == 3 and row["median_round"] is None


# ----------------------------------------------------------------------------------------------
# the CPU sweep


def test_the_cpu_sweep_runs_the_cpu_suites_head_from_256_to_4096_tokens_like_the_cpu_suite():
    sweep = SUITES["cpu-sweep"]
    assert [case.tokens for case in sweep] == [256, 512, 1024, 2048, 4096]
    assert {(case.name, case.hidden, case.vocab, case.dtype, case.prompt_fraction) for case in sweep} == {
        ("sweep", 512, 32000, "float32", 0.5)
    }
    (cpu,) = SUITES["cpu"]
    assert (sweep[-1].pairs, sweep[-1].length) == (cpu.pairs, cpu.length)  # its last point is the cpu case
    assert suite_defaults("cpu-sweep") == suite_defaults("cpu") == {"isolate": True, "rounds": 3,
                                                                     "memory_cap_mib": 4096.0}  # fmt: skip
    assert DEFAULT_SETTINGS["cpu-sweep"] == Settings(warmup=1, repeats=1)


def test_memory_cap_scales_the_largest_measured_point_linearly():
    assert memory_cap_reason((1024, 500.0), 2048, 1200.0) is None  # 1000 MiB expected
    reason = memory_cap_reason((1024, 700.0), 2048, 1200.0)  # 1400 MiB expected
    assert reason.startswith(MEMORY_CAP_NOTE) and "1400 MiB scaled to 2048" in reason
    assert memory_cap_reason(None, 2048, 1200.0) is None  # nothing measured yet
    assert memory_cap_reason((1024, 700.0), 2048, None) is None  # no cap


def test_a_point_over_the_memory_cap_is_not_run(tmp_path):
    naive = next(impl for impl in all_implementations() if impl.name == "naive")
    case = Case("sweep", 2, 32, 32, 256, 0.5, "float32")
    runner = Runner(torch.device("cpu"), [naive], Settings(0, 1), isolate=False, budget=None, done={},
                    scratch=tmp_path, memory_cap_mib=100.0)  # fmt: skip
    runner.measured_memory[("naive", "dpo", "sweep")] = (64, 60.0)  # 120 MiB expected at 128 tokens
    (row,) = runner.rows(case, "dpo")
    assert row["error"].startswith(MEMORY_CAP_NOTE) and row["fwd_ms"] is None
    runner.memory_cap_mib = 1000.0
    (row,) = runner.rows(case, "dpo")
    assert row["error"] is None and row["fwd_ms"] > 0


def test_the_gemm_line_is_dashed():
    assert line_style("gemm")["linestyle"] == "--"
    assert line_style("dpo_fast-cpp")["linestyle"] == "-"


@pytest.fixture(scope="module")
def isolated_sweep(tmp_path_factory):
    """The smoke sweep as the cpu suites run: each measurement in its own process, three rounds (the naive
    step alone, to keep CI short: 6 processes)."""
    out = tmp_path_factory.mktemp("sweep")
    command = [sys.executable, str(BENCH / "bench_loss.py"), "--suite", "smoke", "--case", "sweep", "--impl", "naive",
               "--isolate", "--rounds", "3", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("*-smoke.json")
    return json.loads(path.read_text()), out


def test_isolated_rounds_keep_every_round_and_the_median_rounds_figures(isolated_sweep):
    results, _ = isolated_sweep
    assert results["settings"]["isolate"] and results["settings"]["rounds"] == 3
    rows = results["results"]
    assert [row["tokens"] for row in rows] == [case.tokens for case in SUITES["smoke"] if case.name == "sweep"]
    for row in rows:
        assert row["error"] is None and len(row["rounds"]) == 3 and row["memory_kind"] == "rss", row
        median = row["rounds"][row["median_round"]]
        assert sorted(r["fwd_bwd_ms"] for r in row["rounds"])[1] == median["fwd_bwd_ms"] == row["fwd_bwd_ms"]
        assert (row["fwd_ms"], row["peak_mem_mb"]) == (median["fwd_ms"], median["peak_mem_mb"])
        assert row["max_rel_err"] == max(r["max_rel_err"] for r in row["rounds"]) <= 1e-4


def test_the_isolated_sweep_is_plotted_and_its_tables_say_which_round(isolated_sweep):
    results, out = isolated_sweep
    text = markdown(results)
    assert "max rel err (of every round):" in text
    pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install .[bench])")
    assert {path.name.rsplit("-", 1)[1] for path in out.glob("*-smoke-*.png")} == {"time.png", "memory.png"}


# ----------------------------------------------------------------------------------------------
# the code a results file records


def _git(folder: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                   capture_output=True)  # fmt: skip


def test_code_state_records_the_commit_and_a_dirty_tree(tmp_path, monkeypatch):
    monkeypatch.setattr(environment, "ROOT", tmp_path)
    (tmp_path / "dpo_fast").mkdir()
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "dpo_fast" / "api.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "one")
    clean = environment.code_state()
    assert len(clean["commit"]) == 40 and clean["dirty"] is False and clean["diff_sha256"] is None

    (tmp_path / "benchmarks" / "results" / "run.json").write_text("{}")  # a run's own output: not a change
    assert environment.code_state()["dirty"] is False

    (tmp_path / "dpo_fast" / "api.py").write_text("x = 2\n")
    edited = environment.code_state()
    assert edited["dirty"] is True and edited["dirty_files"] == [" M dpo_fast/api.py"]
    assert edited["source_sha256"] != clean["source_sha256"]
    (tmp_path / "dpo_fast" / "new.py").write_text("y = 1\n")
    added = environment.code_state()
    assert "?? dpo_fast/new.py" in added["dirty_files"] and added["diff_sha256"] != edited["diff_sha256"]


def test_code_state_reads_paths_git_would_quote(tmp_path, monkeypatch):
    """A space or a non-ASCII letter in an untracked file's name (a venv holds setuptools' ``Lorem ipsum.txt``):
    git's porcelain quotes such paths, and the quoted path was read as a file name (FileNotFoundError)."""
    monkeypatch.setattr(environment, "ROOT", tmp_path)
    (tmp_path / "dpo_fast").mkdir()
    (tmp_path / "dpo_fast" / "api.py").write_text("x = 1\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-q", "-m", "one")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "Lorem ipsum.txt").write_text("a")
    (tmp_path / "notes" / "café.txt").write_text("b")
    state = environment.code_state()
    assert state["dirty"] is True
    assert sorted(state["dirty_files"]) == ["?? notes/Lorem ipsum.txt", "?? notes/café.txt"]
    (tmp_path / "notes" / "café.txt").write_text("c")
    assert environment.code_state()["diff_sha256"] != state["diff_sha256"]


def test_outside_git_the_code_is_known_by_its_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setattr(environment, "ROOT", tmp_path)
    (tmp_path / "dpo_fast").mkdir()
    (tmp_path / "dpo_fast" / "api.py").write_text("x = 1\n")
    monkeypatch.delenv(environment.STATED_COMMIT, raising=False)
    state = environment.code_state()
    assert state["commit"] is None and state["dirty"] is None and "not a git checkout" in state["git"]
    assert len(state["source_sha256"]) == 64 and state["stated_commit"] is None
    assert "commit unknown" in environment.code_summary(state)
    monkeypatch.setenv(environment.STATED_COMMIT, "abc123")  # e.g. from the launcher on the GPU machine
    stated = environment.code_state()
    assert stated["commit"] is None and stated["stated_commit"] == "abc123"
    assert "stated commit abc123" in environment.code_summary(stated)


# ----------------------------------------------------------------------------------------------
# record_figures.py on small settings


def _record_figures(*args: str) -> dict:
    done = subprocess.run([sys.executable, str(BENCH / "record_figures.py"), *args], capture_output=True, text=True,
                          check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    path = Path(done.stdout.split("wrote ")[1].split(" and ")[0])
    assert path.with_suffix(".md").exists()
    return json.loads(path.read_text())


@pytest.mark.slow
def test_record_figures_default_run(tmp_path):
    default = Path(__file__).resolve().parents[2] / "dpo_fast" / "trainer" / "default"
    for name, rows in (("train.jsonl", 16), ("eval.jsonl", 8)):
        (tmp_path / name).write_text("".join((default / name).read_text().splitlines(keepends=True)[:rows]))
    record = _record_figures("default-run", "--out", str(tmp_path), "--", "--dataset", str(tmp_path / "train.jsonl"),
                             "--eval-dataset", str(tmp_path / "eval.jsonl"), "--max-steps", "2",
                             "--per-device-train-batch-size", "4", "--logging-steps", "1")  # fmt: skip
    assert record["wall_s"] > 0 and record["peak_rss_mib"] > 100
    assert [line["step"] for line in record["metrics"] if "loss" in line] == [1, 2]
    (final,) = [line for line in record["metrics"] if "eval_loss" in line]
    assert 0 <= final["eval_rewards/accuracies"] <= 1
    assert record["meta"]["code"]["source_sha256"] and "load_average_1m_end" in record["meta"]["device"]
    assert "| `eval_loss` |" in (tmp_path / "default-run.md").read_text()


@pytest.mark.slow
def test_record_figures_memory_test(tmp_path):
    record = _record_figures("memory-test", "--backends", "cpp", "--out", str(tmp_path), "--name", "memory")
    assert record["steps"]["cpp"]["extra_mib"] > 0 and record["steps"]["cpp"]["fraction_of_naive"] is None


def test_parse_parity_reads_each_tests_outcome_and_printed_differences():
    from record_figures import parse_parity

    junit = (
        '<testsuites><testsuite><testcase classname="tests.test_trl" name="test_matches_trl[sigmoid+sft]">'
        "<system-out>sigmoid+sft: max relative difference: logs 2.4e-07, eval 1.3e-05, weight updates 2.5e-06\n"
        '</system-out></testcase><testcase name="test_lm_head_module_is_never_called"/>'
        '<testcase name="test_other_loss_types_match_trl[bco_pair]"><failure message="x"/><system-out>'
        "bco_pair: max relative difference: logs 3.0e-04, weight updates 1.0e-06</system-out></testcase>"
        "</testsuite></testsuites>"
    )
    sft = {"logs": 2.4e-07, "eval": 1.3e-05, "weight updates": 2.5e-06}
    bco = {"logs": 3.0e-04, "weight updates": 1.0e-06}
    assert parse_parity(junit) == [
        {"file": "test_trl", "test": "test_matches_trl[sigmoid+sft]", "outcome": "passed",
         "printed": [{"case": "sigmoid+sft", "group": "dpo", **sft}], "max_relative_difference": sft},
        {"file": "", "test": "test_lm_head_module_is_never_called", "outcome": "passed", "printed": [],
         "max_relative_difference": None},
        {"file": "", "test": "test_other_loss_types_match_trl[bco_pair]", "outcome": "failure",
         "printed": [{"case": "bco_pair", "group": "dpo", **bco}], "max_relative_difference": bco},
    ]  # fmt: skip


def test_a_results_file_from_before_says_what_it_does_not_record():
    """The committed 2026-11-23 CPU results predate the code, the default and the median round: the report says so."""
    text = markdown(json.loads((BENCH / "results" / "2026-11-23-cpu.json").read_text()))
    assert "Code: not recorded" in text and "dpo_fast's default on this machine: not recorded" in text
    assert "| cpu · dpo | time | not recorded | cce | – | <= 1.0 | not judged |" in text
    assert "this file predates the median round" in text
