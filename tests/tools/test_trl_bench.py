"""benchmarks/bench_train.py runs end to end in its CPU smoke mode: every arm measured or skipped with a reason,
the lean trainer's steps measured as TRL's are; benchmarks/record_figures.py records the TRL parity tests' figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_bench_train_smoke(tmp_path):
    arms = "trl,fast,fast-shared,trl-liger,dpo-fast-cli,dpo-fast-cli-shared"
    command = [sys.executable, str(BENCH / "bench_train.py"), "--smoke", "--out", str(tmp_path), "--arms", arms]
    subprocess.run(command, check=True, timeout=900, capture_output=True)
    report = json.loads((tmp_path / "bench_train.json").read_text())
    entries = {entry["arm"]: entry for entry in report["results"]}
    assert set(entries) == set(arms.split(","))
    for arm in ("trl", "fast", "fast-shared", "dpo-fast-cli", "dpo-fast-cli-shared"):
        entry = entries[arm]
        assert entry["status"] == "ok", entry
        timing = entry["timing"]
        assert timing["tokens_per_s"] > 0 and timing["steps"] == 3 and timing["memory_kind"] == "rss"
        assert timing["total_peak_gib"] >= timing["peak_gib"]
    assert entries["trl-liger"]["status"] == "skipped" and "CUDA" in entries["trl-liger"]["reason"]
    assert len(report["meta"]["code"]["source_sha256"]) == 64 and report["meta"]["versions"]["trl"]
    table = (tmp_path / "bench_train.md").read_text()
    assert table.count("| tiny |") == 6 and "FastDPOTrainer, prefix_sharing=True" in table and "Code: " in table


@pytest.mark.slow
def test_bench_train_cpu_measurement_smoke(tmp_path):
    """``bench_train.py --cpu`` (prefix sharing on a long-prompt set, the token metrics' cost) on its smoke shapes."""
    command = [sys.executable, str(BENCH / "bench_train.py"), "--cpu", "--smoke", "--out", str(tmp_path)]
    subprocess.run(command, check=True, timeout=900, capture_output=True)
    report = json.loads((tmp_path / "bench_train.json").read_text())
    measured = {(entry["question"], entry["arm"]): entry for entry in report["results"]}
    assert set(measured) == {("token metrics", "fast"), ("token metrics", "fast-nometrics"),
                             ("prefix sharing", "fast"), ("prefix sharing", "fast-shared"),
                             ("prefix sharing", "dpo-fast-cli"), ("prefix sharing", "dpo-fast-cli-shared")}  # fmt: skip
    for (question, arm), entry in measured.items():
        assert entry["status"] == "ok", entry
        timing = entry["timing"]
        assert timing["tokens_per_s"] > 0 and timing["total_peak_gib"] > 0, entry
        assert entry["shape"]["prompt_fraction"] == (0.75 if question == "prefix sharing" else 0.5)
    table = (tmp_path / "bench_train.md").read_text()
    for goal in ("tokens/s vs without | ", "token metrics on vs off | "):
        assert goal in table and f"{goal}not measured" not in table
    # at smoke shapes a step's resident set can stay below where it began: then its memory ratio is not measured
    assert "step memory vs without | " in table


@pytest.mark.slow
def test_record_figures_trl_parity(tmp_path):
    command = [sys.executable, str(BENCH / "record_figures.py"), "trl-parity", "-k", "test_matches_trl and hinge",
               "--out", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "trl-parity.json").read_text())
    (test,) = record["tests"]
    assert (test["file"], test["test"], test["outcome"]) == ("test_trl", "test_matches_trl[hinge]", "passed")
    # the differences the test printed, each within its 1e-4 tolerance
    assert test["max_relative_difference"].keys() == {"logs", "eval", "weight updates"}
    assert all(0 <= value <= 1e-4 for value in test["max_relative_difference"].values())
    assert record["largest"] == {"dpo": {"comparisons": 1, **test["max_relative_difference"]}}
    assert record["outcomes"]["passed"] == 1
    assert "| test_trl | test_matches_trl[hinge] | hinge | passed |" in (tmp_path / "trl-parity.md").read_text()


JUNIT = """<testsuites><testsuite>
<testcase classname="integrations.test_trl" name="test_prefix_sharing_matches[ipo]"><system-out>
prefix sharing, ipo precomputed: max relative difference: logs 2.9e-07, weight updates 6.3e-07
</system-out></testcase>
<testcase classname="integrations.test_trl" name="test_matches_trl[hinge]"><system-out>
hinge: max relative difference: logs 1.0e-06, eval 2.0e-06, weight updates 3.0e-07
</system-out></testcase>
<testcase classname="integrations.test_kto_trl" name="test_matches_kto[kto]"><system-out>
kto, weights: max relative difference: logs 3.8e-06, weight updates 4.3e-07
LoRA: max relative difference: logs 1.0e-07, weight updates 5.0e-07
</system-out></testcase>
</testsuite></testsuites>"""


def test_record_figures_reads_every_printed_comparison_by_group():
    """A case with spaces and commas (prefix sharing's) and the KTO tests' are recorded, each in its group."""
    sys.path.insert(0, str(BENCH))
    import record_figures

    tests = record_figures.parse_parity(JUNIT)
    assert [len(test["printed"]) for test in tests] == [1, 1, 2]
    assert tests[0]["printed"][0]["case"] == "prefix sharing, ipo precomputed"
    assert record_figures.largest_by_group(tests) == {
        "prefix sharing": {"comparisons": 1, "logs": 2.9e-07, "weight updates": 6.3e-07},
        "dpo": {"comparisons": 1, "logs": 1.0e-06, "eval": 2.0e-06, "weight updates": 3.0e-07},
        "kto": {"comparisons": 2, "logs": 3.8e-06, "weight updates": 5.0e-07},
    }
