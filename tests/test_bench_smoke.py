"""The benchmark harness end to end on CPU: ``benchmarks/bench_loss.py --suite smoke`` (tiny shapes, every mode).

One run of the CLI feeds every test here. Each implementation the harness knows gets a test: it
passes when all its rows were measured and match the float64 reference, and is skipped, with the
harness's reason, when it cannot run here (a peer that is not installed, a GPU-only kernel).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from cases import SUITES
from implementations import all_implementations
from report import default_implementation, derive, goal_lines

ROW_KEYS = {"case", "pairs", "T", "H", "V", "tokens", "valid_tokens", "dtype", "implementation", "mode", "fwd_ms",
            "fwd_bwd_ms", "tflops", "gemm_ratio", "peak_mem_mb", "memory_kind", "max_rel_err", "errors", "oom",
            "error", "rounds"}  # fmt: skip


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    command = [sys.executable, str(BENCH / "bench_loss.py"), "--suite", "smoke", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("*-smoke.json")
    return json.loads(path.read_text()), out


def test_results_have_the_documented_schema(smoke):
    results, out = smoke
    assert {"meta", "suite", "settings", "missing", "results"} <= results.keys()
    assert {"date", "device", "versions"} <= results["meta"].keys()
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


def test_goals_compare_dpo_fasts_default_with_the_named_implementation():
    ours = default_implementation("cpu", "float32")  # dpo_fast-cpp once the extension is built, else dpo_fast-torch
    base = {"case": "cpu", "mode": "dpo", "dtype": "float32", "fwd_ms": 1.0}
    rows = [
        {**base, "implementation": ours, "fwd_bwd_ms": 2.0, "peak_mem_mb": 10.0},
        {**base, "implementation": ours + "-recompute", "fwd_bwd_ms": 1.0, "peak_mem_mb": 1.0},
        {**base, "implementation": "cce", "fwd_bwd_ms": 4.0, "peak_mem_mb": 50.0},
        {**base, "implementation": "naive", "fwd_bwd_ms": 3.0, "peak_mem_mb": 80.0},
    ]
    lines = goal_lines({"meta": {"device": {"type": "cpu"}}, "results": rows})
    # the default runs gradients in the forward, so the faster "-recompute" variant here is not the one compared
    assert f"| cpu · dpo | time | {ours} | cce | 0.5 | <= 1.0 | met |" in lines
    assert f"| cpu · dpo | memory | {ours} | naive | 0.125 | <= 0.1 | not met |" in lines
