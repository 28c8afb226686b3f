"""benchmarks/bench_memory.py (issue 27): the search for the longest sequence and largest batch, the step's
measurement from outside any trainer, and the CLI end to end on a tiny vocabulary."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_memory  # noqa: E402 (benchmarks/ is put on sys.path first)
from _stack.memory import MemoryProbe  # noqa: E402
from _train.search import Point, largest_fitting  # noqa: E402
from _train.steps import StepWindows  # noqa: E402

MIB = 2**20


def _linear(base_mib: float, mib_per_value: float, calls: list):
    """A step whose peak is base + slope x value (MiB): the memory of a real step, without the step."""

    def measure(value: int) -> Point:
        calls.append(value)
        return Point(value, "ok", int((base_mib + mib_per_value * value) * MIB))

    return measure


def test_the_search_brackets_the_budgets_crossing_within_the_tolerance_in_few_steps():
    calls = []
    found = largest_fitting(_linear(300, 0.1, calls), start=512, budget=2048 * MIB, granularity=64, tolerance=0.05)
    crossing = (2048 - 300) / 0.1  # 17,480
    assert found["complete"] and found["fits"] <= crossing < found["fails"]
    assert found["fails"] - found["fits"] <= 0.05 * found["fits"]
    assert calls[:7] == [512, 1024, 2048, 4096, 8192, 16384, 32768]  # doubling first
    assert len(calls) <= 7 + 3, calls  # then a bisection on the measured peaks: a few steps, not log2(16384 / 64)
    assert [p["value"] for p in found["points"]] == calls


def test_a_search_whose_start_does_not_fit_halves():
    calls = []
    found = largest_fitting(_linear(100, 4.0, calls), start=512, budget=1024 * MIB, granularity=64, tolerance=0.05)
    assert calls[:2] == [512, 256] and found["fits"] <= 231 < found["fails"]
    nothing = largest_fitting(_linear(5000, 1.0, []), start=512, budget=1024 * MIB, granularity=64)
    assert nothing["fits"] is None and nothing["fails"] == 64 and nothing["complete"]


def test_without_a_budget_the_search_bisects_until_out_of_memory():
    def measure(value: int) -> Point:
        return Point(value, "ok" if value <= 37 else "out_of_memory", None)

    found = largest_fitting(measure, start=1, budget=None)
    assert (found["fits"], found["fails"], found["complete"]) == (37, 38, True)


def test_a_search_stops_at_its_limit_a_failure_or_its_deadline():
    at_limit = largest_fitting(_linear(0, 0.001, []), start=16, budget=2048 * MIB, limit=64)
    assert at_limit["fits"] == 64 and not at_limit["complete"] and "limit" in at_limit["stopped"]
    failing = largest_fitting(lambda v: Point(v, "error", None), start=16, budget=2048 * MIB)
    assert failing["fits"] is None and not failing["complete"] and "failed" in failing["stopped"]
    late = largest_fitting(_linear(0, 1, []), start=16, budget=2048 * MIB, deadline=0)
    assert late["points"] == [] and late["stopped"] == "deadline"
    # past the deadline, points measured before are still taken (a resumed run re-derives its searches from them)
    calls = []
    replayed = largest_fitting(_linear(0, 1, calls), start=16, budget=2048 * MIB, deadline=0, known=lambda v: v < 100)
    assert calls == [16, 32, 64] and replayed["fits"] == 64 and replayed["stopped"] == "deadline"


def test_a_point_over_budget_does_not_fit():
    assert not Point(4096, "over_budget", 2100 * MIB).fits(2048 * MIB)
    assert not Point(4096, "ok", 2100 * MIB).fits(2048 * MIB) and Point(4096, "ok", 2000 * MIB).fits(2048 * MIB)
    assert Point(4096, "ok", 10**12).fits(None) and not Point(4096, "out_of_memory", None).fits(None)


def test_step_windows_measure_each_optimizer_step_of_any_loop():
    model = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with StepWindows(MemoryProbe("cpu")) as windows:
        for length in (3, 7):
            model(torch.zeros(2, length, dtype=torch.long)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            model(torch.zeros(1, 1, dtype=torch.long))  # between steps: opens the next window, measured in it
    assert [step["embedded_tokens"] for step in windows.steps] == [6, 14]
    assert all(step["peak_bytes"] >= 0 and step["baseline_bytes"] > 0 for step in windows.steps)
    x = torch.randn(1, 1, 4, 2)
    torch.nn.functional.scaled_dot_product_attention(x, x, x)  # the hooks and the wrapper are gone
    assert windows.attention["calls_without_mask"] == 0


def test_the_fitted_slope_is_bytes_per_token_of_the_batch_where_the_peak_grows_with_it():
    def point(length, peak):
        return {"status": "ok", "pairs": 1, "tokens": 2 * length, "peak_bytes": peak}

    points = [point(n, 100 * MIB + 2 * n * 1000) for n in (2048, 4096, 8192)]
    over = {"status": "over_budget", "pairs": 1, "tokens": 2 * 9000, "peak_bytes": None}
    # at small T the peak is the optimizer's update (a constant): not the per-token memory the slope is about
    flat = [point(n, 150 * MIB) for n in (256, 512)]
    slope, at_zero = bench_memory.fit(flat + points + [over])
    assert slope == pytest.approx(1000) and at_zero == pytest.approx(100 * MIB)
    assert bench_memory.fit(flat[:1] + points[-1:])[0] == pytest.approx((points[-1]["peak_bytes"] - 150 * MIB) / 15872)
    assert bench_memory.fit(points[:1]) is None


def test_every_arm_steps_with_the_optimizer_trls_trainer_builds():
    """The plain loops (naive, Liger's loss, the body) once stepped with torch's default AdamW, whose update on CPU
    allocates twice the largest parameter (250 MiB at V = 128,256, H = 256): the body's peak at short sequences was
    that, not its activations. TRL's trainer steps with fused AdamW, which allocates nothing; so must they."""
    from _train import arms
    from _train.models import MODELS, Shape
    from torch.optim.optimizer import register_optimizer_step_post_hook

    seen = {}
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: seen.setdefault(name, optimizer))
    try:
        for name in ("trl", "body"):
            arms.run(name, MODELS["tiny"], [Shape(pairs=1, length=8)], "cpu", gradient_checkpointing=False)
    finally:
        handle.remove()
    assert isinstance(seen["body"], torch.optim.AdamW) and isinstance(seen["trl"], torch.optim.AdamW)
    assert seen["body"].defaults["fused"] and seen["trl"].defaults["fused"]


def test_the_goal_is_judged_from_complete_searches_only():
    def search(variant, fits, complete=True):
        return {"kind": "length", "variant": variant, "vocab": 128256, "fits": fits, "fails": fits + 64,
                "complete": complete, "stopped": None if complete else "deadline"}  # fmt: skip

    results = {
        "settings": {"budget_bytes": 2**31},
        "searches": [
            search("trl", 1000),
            search("liger", 2000, complete=False),
            search("fast", 9000),
            search("dpo-fast-cli", 7000),
        ],
    }
    text = "\n".join(bench_memory.goal_lines(results, 128256))
    assert "| FastDPOTrainer | TRL DPOTrainer (its fused LM head) | 9.0x (9,000 / 1,000) | >= 8x | met |" in text
    assert "| dpo-fast train | TRL DPOTrainer (its fused LM head) | 7.0x (7,000 / 1,000) | >= 8x | missed |" in text
    assert "4.5x (9,000 / 2,000) | >= 4x | not judged (their search was cut short) |" in text
    assert "3.5x (7,000 / 2,000) | >= 4x | missed |" in text  # theirs can only be longer: a miss stands


def test_bench_memory_smoke(tmp_path):
    """The CLI on a tiny vocabulary, in-process: the searches, a curve, the report and the plot."""
    command = [sys.executable, str(BENCH / "bench_memory.py"), "--smoke", "--out", str(tmp_path), "--arms", "fast",
               "--variants", "body,fast+padded", "--parts", "length,curves,batch"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = tmp_path.glob("*-memory-smoke.json")
    results = json.loads(path.read_text())
    assert {"date", "device", "versions", "code"} <= results["meta"].keys()
    searched = {(s["kind"], s["variant"]): s for s in results["searches"]}
    assert searched[("length", "fast")]["fits"] == 64 and "limit" in searched[("length", "fast")]["stopped"]
    assert searched[("batch", "fast")]["fits"] == 2
    by_variant = {}
    for point in results["points"]:
        assert point["status"] == "ok", point
        assert point["embedded_tokens"] == 2 * point["pairs"] * point["length"]
        by_variant.setdefault(point["variant"], []).append(point)
    assert {p["length"] for p in by_variant["body"]} == {16, 32}
    padded = by_variant["fast+padded"][0]["attention"]
    assert padded["calls_with_mask"] > 0 and padded["largest_mask"]["shape"][1:] == [1, 64, 64]  # warm-up: 64 tokens
    assert by_variant["fast"][0]["attention"]["calls_with_mask"] == 0  # no padding: no mask, SDPA's causal kernel
    text = path.with_suffix(".md").read_text()
    assert "| FastDPOTrainer | 64; cut short: no miss up to the limit of 64 |" in text and "Code: " in text
    # a run resumed for one part keeps the other parts' searches, and measures no point it was given again
    resume = [*command[:4], str(tmp_path / "again"), "--arms", "fast", "--parts", "batch", "--resume", str(path)]
    done = subprocess.run(resume, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    (again,) = (tmp_path / "again").glob("*-memory-smoke.json")
    resumed = json.loads(again.read_text())
    assert {(s["kind"], s["variant"]): s for s in resumed["searches"]} == searched
    assert resumed["points"] == results["points"] and resumed["earlier_runs"] == [results["meta"]]
