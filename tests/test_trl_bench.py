"""benchmarks/bench_train.py runs end to end in its CPU smoke mode: every arm measured or skipped with a reason;
benchmarks/record_figures.py records the TRL parity tests' figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_bench_train_smoke(tmp_path):
    arms = "trl,fast,trl-liger,dpo-fast-cli"
    command = [sys.executable, str(BENCH / "bench_train.py"), "--smoke", "--out", str(tmp_path), "--arms", arms]
    subprocess.run(command, check=True, timeout=900, capture_output=True)
    report = json.loads((tmp_path / "bench_train.json").read_text())
    entries = {entry["arm"]: entry for entry in report["results"]}
    assert set(entries) == set(arms.split(","))
    for arm in ("trl", "fast"):
        entry = entries[arm]
        assert entry["status"] == "ok", entry
        assert entry["timing"]["tokens_per_s"] > 0 and entry["timing"]["steps"] == 3
        assert entry["longest_sequence"] == {"fits": 64, "fails": None, "complete": True}
        assert entry["largest_batch"]["fits"] == 2
    assert entries["trl-liger"]["status"] == "skipped" and "CUDA" in entries["trl-liger"]["reason"]
    assert entries["dpo-fast-cli"]["status"] in ("ok", "skipped"), entries["dpo-fast-cli"]
    code = report["environment"]["code"]
    assert len(code["source_sha256"]) == 64 and code["commit"] == report["environment"]["commit"]
    table = (tmp_path / "bench_train.md").read_text()
    assert table.count("| tiny |") == 4 and "FastDPOTrainer" in table and "Code: " in table


@pytest.mark.slow
def test_record_figures_trl_parity(tmp_path):
    command = [sys.executable, str(BENCH / "record_figures.py"), "trl-parity", "-k", "test_matches_trl and hinge",
               "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "trl-parity.json").read_text())
    (test,) = record["tests"]
    assert test["test"] == "test_matches_trl[hinge]" and test["outcome"] == "passed"
    # the differences the test printed, each within its 1e-4 tolerance
    assert test["max_relative_difference"].keys() == {"logs", "eval", "weight updates"}
    assert all(0 <= value <= 1e-4 for value in test["max_relative_difference"].values())
    assert record["largest"] == test["max_relative_difference"] and record["outcomes"]["passed"] == 1
    assert "| test_matches_trl[hinge] | passed |" in (tmp_path / "trl-parity.md").read_text()
