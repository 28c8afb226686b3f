"""How long a sequence (and how large a batch) each DPO trainer fits in a memory budget: real steps, each in its own process.

Issue 27. Memory, unlike time, transfers from CPU to GPU by arithmetic (a 128,256-token vocabulary's
logits cost the same bytes on either), so this runs where it can: a Llama body of 2 layers
(hidden 256, MLP 1024, 4 heads of 64, one KV head, tied embeddings) under Llama-3's vocabulary
(V = 128,256) and Gemma 3's (262,144), random init, float32 on CPU. The arms are
``_train.arms.ARMS``: TRL 1.16's DPOTrainer (its default fused head), TRL with
``use_liger_kernel`` (CUDA only: Liger's layer kernels are Triton), Liger's fused DPO loss, the
naive full-logits step, the body alone, FastDPOTrainer and ``dpo-fast train``, each with and
without gradient checkpointing; the two dpo_fast arms also with prefix sharing at a prompt 3x the
completion, and FastDPOTrainer on padded pairs (the rejected completion a token shorter: an
attention mask).

A point is one training run of 2 optimizer steps in a fresh process (``_train.probe``): a warm-up
step on 64-token sequences (one-time costs, the optimizer's state), then the measured step, 1 pair
of T tokens a sequence (half prompt) unless said otherwise. Its figure is the peak resident set of
that step (forward, backward, AdamW) above the resident set when the step began, i.e. beyond the
weights, the reference copy and the optimizer state (``_train.steps``). Pairs have chosen and
rejected completions of one length, so batches carry no padding, transformers passes no attention
mask, and CPU SDPA runs its causal kernel, whose memory is linear in T (recorded per point).

The plan (``--parts``), in this order, under ``--time-budget``:

- ``length``: for the searched arms (TRL, Liger's fused loss, FastDPOTrainer, ``dpo-fast train``; on
  CUDA also TRL + use_liger_kernel) at V = 128,256, the longest sequence whose step stays within
  ``--budget-gib`` (2 GiB): doubling from 512 tokens, then a bisection on the measured peaks
  (``_train.search``), to 5%;
- ``curves``: every other variant (the body first) at 512, 1024 and 4096 tokens, the body and
  dpo_fast's arms with checkpointing at 8192 and 16,384 too (a point whose peak, scaled linearly from
  the variant's largest measured one, would pass ``--memory-cap-gib`` is not run);
- ``gemma``: at V = 262,144, the searched arms and the body at the same lengths;
- ``batch``: the largest batch (pairs a step) at 2,048 tokens a sequence, for the searched arms;
- ``gemma-length``: the searched arms' length searches at V = 262,144.

Per variant the report fits the peak against the batch's tokens (2 x pairs x T) by least squares
over its largest points (lengths at least half its largest; at small T the peak can be a constant,
the optimizer's update): the slope is the step's bytes per token; the head's share is that slope
less the body's (same vocabulary, same checkpointing).

    python benchmarks/bench_memory.py                        # the CPU run: results/<date>-cpu-memory.{json,md,png}
    python benchmarks/bench_memory.py --smoke --out /tmp/m   # CI: a tiny vocabulary, in-process, seconds
    python benchmarks/bench_memory.py --device cuda --model llama-1b --budget-gib 0   # a GPU: until out of memory
    python benchmarks/bench_memory.py report results/<date>-cpu-memory.json          # tables and plot again

On CUDA the same code searches with the allocator's peak (``torch.cuda.max_memory_allocated``) and
bf16 weights; ``--budget-gib 0`` searches until a step runs out of memory, as the GPU command of
``bench_train.py`` does after its timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stack import environment, report, worker
from _stack.memory import CPU_ENV
from _train.arms import ARMS, unavailable
from _train.models import MODELS
from _train.search import Point, largest_fitting

GIB, MIB, KIB = 2**30, 2**20, 2**10
VOCABS = {"llama3": 128256, "gemma3": 262144}
# the body of issue 27 (its vocabulary set per point)
BODY = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
            head_dim=64, max_position_embeddings=262144, tie_word_embeddings=True)  # fmt: skip
SMOKE_BODY = dict(MODELS["tiny"], max_position_embeddings=4096)
WARMUP_LENGTH = 64
CURVE_LENGTHS = (512, 1024, 4096)
# the body's, and dpo_fast's with checkpointing, as far as the searched arms reach: a slope is fitted where the
# step's memory grows with T (at short T the peak is the gradients), and the head's share is an arm's less the body's
LONG_LENGTHS = (*CURVE_LENGTHS, 8192, 16384)
LONG_CURVES = ("body", "body+gc", "fast+gc", "dpo-fast-cli+gc")
BATCH_LENGTH = 2048
SEARCH_START, SEARCH_LIMIT, SEARCH_GRANULARITY, SEARCH_TOLERANCE = 512, 131072, 64, 0.05
BATCH_LIMIT = 256
POINT_TIMEOUT_S = 3600  # a point's process is stopped after this (its figure is then missing, with the reason)
SEARCHED = ("trl", "trl-liger", "liger", "fast", "dpo-fast-cli")
PARTS = ("length", "curves", "gemma", "batch", "gemma-length")


@dataclasses.dataclass(frozen=True)
class Variant:
    """An arm with its settings: gradient checkpointing, the prompt's share of a sequence, padded pairs."""

    arm: str
    checkpointing: bool = False
    prompt_fraction: float = 0.5
    padded: bool = False

    @property
    def name(self) -> str:
        return self.arm + ("+padded" if self.padded else "") + ("+gc" if self.checkpointing else "")

    @property
    def label(self) -> str:
        extra = [text for flag, text in ((self.checkpointing, "gradient checkpointing"),
                                         (self.padded, "padded pairs (attention mask)"),
                                         (self.prompt_fraction != 0.5, f"prompt {self.prompt_fraction:.0%}")) if flag]  # fmt: skip
        return ARMS[self.arm].description + (f" ({', '.join(extra)})" if extra else "")


def variants() -> dict[str, Variant]:
    """Every variant of the plan, by name."""
    found = []
    for arm in ("trl", "trl-liger", "liger", "naive", "body", "fast", "dpo-fast-cli"):
        found += [Variant(arm), Variant(arm, checkpointing=True)]
    for arm in ("fast-shared", "dpo-fast-cli-shared"):
        found += [Variant(arm, prompt_fraction=0.75), Variant(arm, checkpointing=True, prompt_fraction=0.75)]
    found.append(Variant("fast", padded=True))
    return {variant.name: variant for variant in found}


VARIANTS = variants()


# ----------------------------------------------------------------------------------------------
# the run


@dataclasses.dataclass
class Plan:
    """What a run measures and how: the settings a results file records."""

    device: str
    body: dict
    vocabs: dict[str, int]
    budget_bytes: int | None
    memory_cap_bytes: int
    curve_lengths: tuple[int, ...]
    long_lengths: tuple[int, ...]
    batch_length: int
    search_start: int
    search_limit: int
    batch_limit: int
    granularity: int
    curve_variants: tuple[str, ...]
    parts: tuple[str, ...]
    searched: tuple[str, ...]
    isolate: bool


class Run:
    """The points measured so far (kept from ``--resume`` too), the searches, the results file rewritten after each."""

    def __init__(self, plan: Plan, stem: Path, meta: dict, command: list[str], deadline: float | None,
                 kept: dict | None = None):  # fmt: skip
        self.plan, self.stem, self.deadline = plan, stem, deadline
        self.results = {"meta": meta, "command": command, "settings": dataclasses.asdict(plan), "points": [],
                        "searches": [], "missing": []}  # fmt: skip
        if kept:
            self.results["points"] = [p for p in kept["points"] if not p["status"].startswith("not run")]
            self.results["searches"] = kept["searches"]  # those this run repeats are replaced
            self.results["earlier_runs"] = kept.get("earlier_runs", []) + [kept["meta"]]
        self.results["missing"] = [{"variant": name, "reason": unavailable(v.arm, plan.device)}
                                   for name, v in VARIANTS.items() if unavailable(v.arm, plan.device)]  # fmt: skip

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    def _find(self, variant: str, vocab: int, pairs: int, length: int) -> dict | None:
        for point in self.results["points"]:
            if (point["variant"], point["vocab"], point["pairs"], point["length"]) == (variant, vocab, pairs, length):
                return point
        return None

    def point(self, variant: str, vocab: int, pairs: int, length: int, limit: int | None) -> dict:
        """The point, measured now unless known; ``limit``: the bytes over which its step is stopped."""
        known = self._find(variant, vocab, pairs, length)
        stopped_lower = known and known["status"] == "over_budget" and limit and known["stopped_at_bytes"] < limit
        if known and not stopped_lower:
            return known
        if self.out_of_time():
            return {"variant": variant, "vocab": vocab, "pairs": pairs, "length": length, "status": "not run: time"}
        v = VARIANTS[variant]
        shape = {"pairs": pairs, "prompt_fraction": v.prompt_fraction, "padded": v.padded}
        spec = {"arm": v.arm, "model": {**self.plan.body, "vocab_size": vocab}, "device": self.plan.device,
                "gradient_checkpointing": v.checkpointing, "measured": [1], "budget_bytes": limit,
                "shapes": [{**shape, "length": WARMUP_LENGTH}, {**shape, "length": length}]}  # fmt: skip
        environ = CPU_ENV if self.plan.device == "cpu" else None
        started = time.time()
        outcome = worker.run("_train.probe:measure", spec, isolate=self.plan.isolate, timeout_s=POINT_TIMEOUT_S,
                             environ=environ)  # fmt: skip
        point = _point_record(variant, vocab, pairs, length, limit, outcome)
        print(
            f"bench_memory: {variant:24s} V={vocab:6d} {pairs:3d} x {length:6d}: {_describe(point)} "
            f"({time.time() - started:.0f} s)",
            flush=True,
        )
        if known:
            self.results["points"].remove(known)
        self.results["points"].append(point)
        report.write_json(self.results, self.stem.with_name(self.stem.name + ".json"))
        return point

    def search(self, kind: str, variant: str, vocab: int) -> None:
        """The longest sequence (``kind="length"``, 1 pair) or the largest batch (``"batch"``, at the batch length)."""
        budget = self.plan.budget_bytes

        def shape(value: int) -> tuple[int, int]:
            return (1, value) if kind == "length" else (value, self.plan.batch_length)

        def measure(value: int) -> Point:
            found = self.point(variant, vocab, *shape(value), budget or None)
            return Point(value, found["status"], found.get("peak_bytes") or found.get("stopped_at_bytes"))

        start, granularity = (self.plan.search_start, self.plan.granularity) if kind == "length" else (1, 1)
        found = largest_fitting(measure, start, budget, granularity, SEARCH_TOLERANCE if kind == "length" else 0,
                                self.plan.search_limit if kind == "length" else self.plan.batch_limit, self.deadline,
                                known=lambda value: self._find(variant, vocab, *shape(value)) is not None)  # fmt: skip
        record = {"kind": kind, "variant": variant, "vocab": vocab, **found}
        if kind == "batch":
            record["length"] = self.plan.batch_length
        self.results["searches"] = [s for s in self.results["searches"]
                                    if (s["kind"], s["variant"], s["vocab"]) != (kind, variant, vocab)] + [record]  # fmt: skip
        report.write_json(self.results, self.stem.with_name(self.stem.name + ".json"))

    def curve(self, variant: str, vocab: int) -> None:
        """The variant at each curve length, 1 pair, unless its peak scaled linearly would pass the memory cap."""
        cap = self.plan.memory_cap_bytes
        lengths = self.plan.long_lengths if variant in LONG_CURVES else self.plan.curve_lengths
        for length in lengths:
            measured = [p for p in self.results["points"] if (p["variant"], p["vocab"], p["pairs"]) == (variant, vocab, 1)
                        and p.get("peak_bytes")]  # fmt: skip
            largest = max(measured, key=lambda p: p["length"], default=None)
            if largest and largest["length"] < length and largest["peak_bytes"] * length / largest["length"] > cap:
                continue
            self.point(variant, vocab, 1, length, cap)


def _point_record(variant: str, vocab: int, pairs: int, length: int, limit: int | None, outcome) -> dict:
    """A results file's point from the probe's outcome (``_train.probe``'s result, or how the worker failed)."""
    point = {"variant": variant, "vocab": vocab, "pairs": pairs, "length": length, "tokens": 2 * pairs * length,
             "limit_bytes": limit}  # fmt: skip
    result = outcome.result or {}
    status = result.get("status") or ("out_of_memory" if outcome.killed else "error")
    point.update(status=status, memory_kind=result.get("memory_kind"), attention=result.get("attention"))
    steps = result.get("steps") or []
    if status == "ok" and steps:
        step = steps[-1]
        point.update(peak_bytes=step["peak_bytes"], baseline_bytes=step["baseline_bytes"],
                     embedded_tokens=step["embedded_tokens"])  # fmt: skip
    if status == "over_budget":
        point["stopped_at_bytes"] = result.get("stopped_at_bytes") or (steps[-1]["peak_bytes"] if steps else None)
    if status in ("error", "skipped") or (status == "out_of_memory" and not result):
        point["error"] = result.get("error") or result.get("reason") or outcome.error
    return point


def _describe(point: dict) -> str:
    if point["status"] == "ok":
        return f"{point['peak_bytes'] / MIB:.0f} MiB"
    if point["status"] == "over_budget":
        return f"over {point['stopped_at_bytes'] / MIB:.0f} MiB (stopped)"
    return f"{point['status']} {point.get('error') or ''}"[:300]


def execute(plan: Plan, run: Run) -> None:
    """The plan's parts in order (see the module's docstring)."""
    llama, gemma = plan.vocabs["llama3"], plan.vocabs.get("gemma3")
    searched = [name for name in plan.searched if name not in {m["variant"] for m in run.results["missing"]}]
    if "length" in plan.parts:
        for name in searched:
            run.search("length", name, llama)
    if "curves" in plan.parts:
        missing = {m["variant"] for m in run.results["missing"]}
        for name in sorted(plan.curve_variants, key=lambda name: VARIANTS[name].arm != "body"):  # the body first
            if name not in searched and name not in missing:
                run.curve(name, llama)
    if "gemma" in plan.parts and gemma:
        for name in [*searched, *(["body"] if "body" in plan.curve_variants else [])]:
            run.curve(name, gemma)
    if "batch" in plan.parts:
        for name in searched:
            run.search("batch", name, llama)
    if "gemma-length" in plan.parts and gemma:
        for name in searched:
            run.search("length", name, gemma)


# ----------------------------------------------------------------------------------------------
# the report


def fit(points: list[dict]) -> tuple[float, float] | None:
    """(bytes per token, bytes at zero tokens): least squares of the peak over the batch's tokens, over the 1-pair
    points that ran at lengths of at least half the largest (the two largest where fewer; at small T the peak can be
    the optimizer's update, a constant); None with fewer than two lengths."""
    ran = sorted((p for p in points if p["status"] == "ok" and p["pairs"] == 1), key=lambda p: p["tokens"])
    if len({p["tokens"] for p in ran}) < 2:
        return None
    largest = [p for p in ran if p["tokens"] >= ran[-1]["tokens"] / 2]
    if len({p["tokens"] for p in largest}) < 2:
        second = max(p["tokens"] for p in ran if p["tokens"] < ran[-1]["tokens"])
        largest = [p for p in ran if p["tokens"] >= second]
    xy = [(p["tokens"], p["peak_bytes"]) for p in largest]
    n, sx, sy = len(xy), sum(x for x, _ in xy), sum(y for _, y in xy)
    sxx, sxy = sum(x * x for x, _ in xy), sum(x * y for x, y in xy)
    slope = (n * sxy - sx * sy) / (n * sxx - sx * sx)
    return slope, (sy - slope * sx) / n


def _points(results: dict, variant: str, vocab: int) -> list[dict]:
    return sorted((p for p in results["points"] if p["variant"] == variant and p["vocab"] == vocab),
                  key=lambda p: (p["pairs"], p["length"]))  # fmt: skip


def slopes(results: dict, vocab: int) -> dict[str, dict]:
    """Per variant: ``per_token`` (bytes a token, fitted), ``head_per_token`` (that less the body's, with the same
    checkpointing; None for the shared layouts, whose body runs fewer tokens)."""
    found = {}
    for name in VARIANTS:
        fitted = fit(_points(results, name, vocab))
        if fitted:
            found[name] = {"per_token": fitted[0], "at_zero": fitted[1]}
    for name, figures in found.items():
        variant = VARIANTS[name]
        body = found.get(Variant("body", variant.checkpointing).name)
        comparable = body and variant.arm not in ("body", "fast-shared", "dpo-fast-cli-shared") and not variant.padded
        figures["head_per_token"] = figures["per_token"] - body["per_token"] if comparable else None
    return found


def _search(results: dict, kind: str, variant: str, vocab: int) -> dict | None:
    return next((s for s in results["searches"] if (s["kind"], s["variant"], s["vocab"]) == (kind, variant, vocab)),
                None)  # fmt: skip


def _found(search: dict | None, unit: str = "") -> str:
    if search is None:
        return "not run"
    text = "none" if search["fits"] is None else f"{search['fits']:,}{unit}"
    if search["fails"] is not None:
        text += f" ({search['fails']:,} over)"
    if not search["complete"]:
        text += f"; cut short: {search['stopped']}"
    return text


def _mib(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value / MIB:,.{digits}f}"


def _kib(value: float | None) -> str:
    return "–" if value is None else f"{value / KIB:,.1f}"


def _peak_cell(point: dict | None) -> str:
    if point is None:
        return ""
    if point["status"] == "ok":
        return _mib(point["peak_bytes"])
    if point["status"] == "over_budget":
        return f"> {_mib(point['stopped_at_bytes'])}"
    return point["status"].replace("_", " ")


GOALS = {"trl": 8.0, "liger": 4.0, "trl-liger": 4.0}  # the searched dpo_fast arms' length over these arms', at least


def goal_lines(results: dict, vocab: int) -> list[str]:
    """The goal of issue 27 at ``vocab``: each dpo_fast arm's longest sequence over TRL's (>= 8x) and Liger's (>= 4x)."""
    budget = results["settings"]["budget_bytes"]
    lines = []
    for ours in ("fast", "dpo-fast-cli"):
        mine = _search(results, "length", ours, vocab)
        for theirs, target in GOALS.items():
            other = _search(results, "length", theirs, vocab)
            if mine is None or other is None:
                continue
            if not (mine["fits"] and other["fits"]):
                lines.append(f"| {ARMS[ours].description} | {ARMS[theirs].description} | – | >= {target:g}x | "
                             "not judged (a search found no length) |")  # fmt: skip
                continue
            ratio = mine["fits"] / other["fits"]
            # a search's length is a measured fit, a lower bound where the search was cut short: a ratio at the goal
            # is met if theirs is complete, one under it missed if ours is
            if ratio >= target:
                verdict = "met" if other["complete"] else "not judged (their search was cut short)"
            else:
                verdict = "missed" if mine["complete"] else "not judged (our search was cut short)"
            lines.append(f"| {ARMS[ours].description} | {ARMS[theirs].description} | {ratio:.1f}x "
                         f"({mine['fits']:,} / {other['fits']:,}) | >= {target:g}x | {verdict} |")  # fmt: skip
    if not lines:
        return []
    return [f"Goal (issue 27, V = {vocab:,}, budget {_mib(budget)} MiB): the longest sequence of dpo_fast's arms over "
            "the others'.", "", "| dpo_fast arm | against | ratio | goal | |", "| --- | --- | ---: | ---: | --- |",
            *lines, ""]  # fmt: skip


def markdown(results: dict) -> str:
    settings, meta = results["settings"], results["meta"]
    budget, body = settings["budget_bytes"], settings["body"]
    smoke = body.get("hidden_size", 0) < 256
    lines = report.header("DPO training memory: the longest sequence under a budget, by trainer", meta)
    lines += [f"Command: `{' '.join(results['command'])}`.", ""]
    for earlier in results.get("earlier_runs", []):
        lines += [f"Points kept from an earlier run ({earlier['started']}): {environment.code_summary(earlier['code'])}",
                  ""]  # fmt: skip
    if smoke:
        lines += ["Smoke run (a tiny model and vocabulary): checks the harness, measures nothing of interest.", ""]
    lines += [
        (f"Body: {body['num_hidden_layers']} layers, hidden {body['hidden_size']}, MLP {body['intermediate_size']}, "
         f"{body['num_attention_heads']} heads, {body['num_key_value_heads']} KV head(s), tied embeddings; "
         f"{'bf16 on CUDA' if settings['device'].startswith('cuda') else 'float32 on CPU'}. A point: one fresh "
         f"process, a warm-up step at {WARMUP_LENGTH} tokens, then the measured optimizer step (forward, backward, "
         "AdamW), its peak "
         + ("resident set" if settings["device"] == "cpu" else "allocated memory")
         + " above the memory when it began: beyond the weights, the reference model and the optimizer state. "
         f"Budget: {_mib(budget) + ' MiB' if budget else 'none (until out of memory)'}. Sequences: T tokens each, half "
         "prompt (prefix sharing: prompt 3x the completion), 1 pair a step unless said otherwise; KiB / token: the "
         "least-squares slope of the peak over the batch's tokens (2 x pairs x T); head KiB / token: that less the "
         "body's (the same checkpointing)."), "",
    ]  # fmt: skip
    for key, vocab in settings["vocabs"].items():
        found = slopes(results, vocab)
        rows = []
        for name in dict.fromkeys([*settings["searched"], *VARIANTS]):
            points = _points(results, name, vocab)
            if not points:
                continue
            search = _search(results, "length", name, vocab)
            at = next((p for p in points if search and p["pairs"] == 1 and p["length"] == search["fits"]), None)
            figures = found.get(name, {})
            rows.append([VARIANTS[name].label, _found(search) if name in settings["searched"] else "–",
                         _peak_cell(at), _kib(figures.get("per_token")), _kib(figures.get("head_per_token"))])  # fmt: skip
        if not rows:
            continue
        lines += [f"## V = {vocab:,} ({key})", ""]
        lines += report.table(["variant", "longest sequence within budget (first over)", "its peak MiB",
                               "KiB / token", "head KiB / token"], rows)  # fmt: skip
        lines += ["", *goal_lines(results, vocab)]
        lengths = sorted({p["length"] for p in results["points"] if p["vocab"] == vocab and p["pairs"] == 1})
        curve_rows = []
        for name in VARIANTS:
            points = {p["length"]: p for p in _points(results, name, vocab) if p["pairs"] == 1}
            if points:
                curve_rows.append([VARIANTS[name].label, *(_peak_cell(points.get(n)) for n in lengths)])
        lines += [f"Peak MiB of the step by tokens a sequence (1 pair), V = {vocab:,}:", ""]
        lines += report.table(["variant", *(f"{n:,}" for n in lengths)], curve_rows)
        lines.append("")
    batches = [s for s in results["searches"] if s["kind"] == "batch"]
    if batches:
        lines += [f"## The largest batch at {settings['batch_length']:,} tokens a sequence", ""]
        lines += report.table(["variant", "V", "pairs a step within budget (first over)"],
                              [[VARIANTS[s["variant"]].label, f"{s['vocab']:,}", _found(s)] for s in batches])  # fmt: skip
        lines.append("")
    lines += ["## Attention", "", ("Calls of `scaled_dot_product_attention` in each point's run with and without an "
              "attention mask, and the largest mask (a mask is (rows, 1, T, T): quadratic in T)."), ""]  # fmt: skip
    attention_rows = []
    for name in VARIANTS:
        points = [p for p in results["points"] if p["variant"] == name and p.get("attention")]
        if points:
            largest = max(points, key=lambda p: p["length"])
            mask = largest["attention"]["largest_mask"]
            attention_rows.append([VARIANTS[name].label, sum(p["attention"]["calls_with_mask"] for p in points),
                                   sum(p["attention"]["calls_without_mask"] for p in points),
                                   f"{mask['shape']} {mask['dtype']} at T = {largest['length']:,}" if mask else "–"])  # fmt: skip
    lines += report.table(["variant", "calls with a mask", "without", "largest mask"], attention_rows)
    failed = [p for p in results["points"] if p.get("error")]
    if failed or results["missing"]:
        lines += ["", "## Not measured", ""]
        lines += [f"- {VARIANTS[m['variant']].label}: {m['reason']}" for m in results["missing"]]
        lines += [f"- {VARIANTS[p['variant']].label}, V = {p['vocab']:,}, {p['pairs']} x {p['length']:,}: "
                  f"{p['status']}: {p['error'][-300:]}" for p in failed]  # fmt: skip
    return "\n".join(lines) + "\n"


def panels(results: dict) -> list[report.Panel]:
    """One panel per vocabulary: peak MiB against tokens a sequence (1 pair), a line per variant, the budget drawn."""
    settings, found = results["settings"], []
    arms = list(dict.fromkeys(v.arm for v in VARIANTS.values()))
    for key, vocab in settings["vocabs"].items():
        panel = report.Panel(title=f"one DPO step, 1 pair, V = {vocab:,} ({key})", xlabel="tokens a sequence (T)",
                             ylabel=f"peak above weights and optimizer (MiB, {results['meta']['device']['type']})",
                             log_x=True)  # fmt: skip
        for name, variant in VARIANTS.items():
            points = [(p["length"], p["peak_bytes"] / MIB) for p in _points(results, name, vocab)
                      if p["pairs"] == 1 and p["status"] == "ok"]  # fmt: skip
            if points:
                panel.lines[variant.label] = points
                panel.styles[variant.label] = {"color": f"C{arms.index(variant.arm) % 10}",
                                               "linestyle": "--" if variant.checkpointing else
                                               (":" if variant.padded else "-")}  # fmt: skip
        if settings["budget_bytes"]:
            panel.hlines.append((settings["budget_bytes"] / MIB, f"budget, {_mib(settings['budget_bytes'])} MiB"))
        if panel.lines:
            found.append(panel)
    return found


def write(results: dict, stem: Path) -> list[Path]:
    return report.write(results, stem, markdown(results), {"plot": panels(results)})


# ----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--model", choices=sorted(MODELS), help="a named model's body instead of issue 27's "
                        "(its vocabulary is replaced by each point's)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="a tiny model and vocabulary, short lengths, in-process")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, among {', '.join(PARTS)}")
    parser.add_argument("--arms", help="comma-separated variants to search (default: those of "
                        f"{', '.join(SEARCHED)} that run here)")  # fmt: skip
    parser.add_argument("--variants", help="comma-separated variants of the curves (default: all; see VARIANTS)")
    parser.add_argument("--budget-gib", type=float, default=2.0, help="a step's budget (0: none, until out of memory)")
    parser.add_argument("--memory-cap-gib", type=float, default=5.0, help="curves: a point's step is stopped over "
                        "this, and not run when its peak, scaled linearly, would pass it")  # fmt: skip
    parser.add_argument("--time-budget", type=float, help="seconds; points not started by then are not run")
    parser.add_argument("--resume", type=Path, metavar="RESULTS_JSON", help="keep an earlier run's points")
    parser.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                        help="each point in a fresh process (default: on, off with --smoke)")  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        path = Path(argv[1])
        write(json.loads(path.read_text()), path.with_suffix(""))
        return 0
    args = _parser().parse_args(argv)
    parts = tuple(part for part in args.parts.split(",") if part)
    if set(parts) - set(PARTS):
        sys.exit(f"bench_memory: unknown parts {sorted(set(parts) - set(PARTS))}")
    searched = tuple(args.arms.split(",")) if args.arms else SEARCHED
    unknown = (set(searched) | set((args.variants or "").split(","))) - {""} - set(VARIANTS)
    if unknown:
        sys.exit(f"bench_memory: unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    body = (
        SMOKE_BODY if args.smoke else dict(MODELS[args.model], max_position_embeddings=262144) if args.model else BODY
    )
    plan = Plan(
        device=args.device, body={k: v for k, v in body.items() if k != "vocab_size"},
        vocabs={"llama3": 512, "gemma3": 1024} if args.smoke else VOCABS,
        budget_bytes=int(args.budget_gib * GIB) or None, memory_cap_bytes=int(args.memory_cap_gib * GIB),
        curve_lengths=(16, 32) if args.smoke else CURVE_LENGTHS, long_lengths=(16, 32) if args.smoke else LONG_LENGTHS,
        batch_length=32 if args.smoke else BATCH_LENGTH,
        search_start=16 if args.smoke else SEARCH_START, search_limit=64 if args.smoke else SEARCH_LIMIT,
        batch_limit=2 if args.smoke else BATCH_LIMIT, granularity=8 if args.smoke else SEARCH_GRANULARITY,
        curve_variants=tuple(args.variants.split(",")) if args.variants else tuple(VARIANTS),
        parts=parts, searched=searched, isolate=not args.smoke if args.isolate is None else args.isolate,
    )  # fmt: skip
    meta = environment.describe(args.device)
    stem = args.out / f"{meta['date']}-{environment.slug(meta)}-memory{'-smoke' if args.smoke else ''}"
    kept = json.loads(args.resume.read_text()) if args.resume else None
    deadline = time.time() + args.time_budget if args.time_budget else None
    run = Run(plan, stem, meta, ["python", "benchmarks/bench_memory.py", *argv], deadline, kept)
    execute(plan, run)
    environment.finish(meta)
    for path in write(run.results, stem):
        print(f"bench_memory: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
