"""benchmarks/bench_train.py runs end to end in its CPU smoke mode: every arm measured or skipped with a reason."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"


@pytest.mark.slow
def test_bench_train_smoke(tmp_path):
    arms = "trl,fast,trl-liger,dpo-fast-cli"
    command = [sys.executable, str(BENCH), "--smoke", "--out", str(tmp_path), "--arms", arms]
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
    table = (tmp_path / "bench_train.md").read_text()
    assert table.count("| tiny |") == 4 and "FastDPOTrainer" in table
