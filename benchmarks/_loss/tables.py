"""``bench_loss.py``'s report: the derived figures, the markdown tables, the goals and the sweep's plots.

``_stack.report`` writes them (``write`` here); ``python benchmarks/bench_loss.py report RESULTS.json``
rewrites the tables and plots beside a JSON file (for instance after a run cut short by a time
limit, or after editing nothing but this module).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from _stack import report

from _loss.cases import GEMM_PRODUCTS

# How a sweep point left out by bench_loss.py's --memory-cap-mib begins its error
MEMORY_CAP_NOTE = "not run: over the memory cap"


def step_ms(row: dict) -> float | None:
    """The time the mode's FLOPs are counted over: forward+backward, or forward alone in the forward mode."""
    return row["fwd_ms"] if row["mode"] == "forward" else row["fwd_bwd_ms"]


def derive(rows: list[dict]) -> None:
    """Fill ``tflops`` (the mode's useful FLOPs over the step's time) and ``gemm_ratio`` (time over the
    GEMM line's, same case, tokens and mode) in place."""
    gemm = {(r["case"], r["tokens"], r["mode"]): step_ms(r) for r in rows if r["implementation"] == "gemm"}
    for row in rows:
        ms = step_ms(row)
        if ms is None:
            continue
        flops = 2 * GEMM_PRODUCTS[row["mode"]] * row["valid_tokens"] * row["H"] * row["V"]
        row["tflops"] = flops / (ms * 1e-3) / 1e12
        line = gemm.get((row["case"], row["tokens"], row["mode"]))
        row["gemm_ratio"] = ms / line if line else None


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "–"
    if value >= 10 ** (digits - 1):
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def _note(row: dict) -> str:
    if row["oom"]:
        return "OOM" if not row["error"] else f"OOM ({row['error']})"
    return row["error"] or ""


def _short_note(row: dict) -> str:
    """A table cell's word for a row without figures: not run, or failed."""
    if not row["error"]:
        return ""
    return "not run" if row["error"].startswith("not run") else "failed"


def _case_title(row: dict) -> str:
    shape = f"{row['pairs']} pairs x {row['T']} tokens" if row["pairs"] else f"{row['tokens']} tokens"
    return (f"{row['case']} · {row['mode']}: H={row['H']}, V={row['V']}, {shape}, "
            f"{row['valid_tokens']} valid, {row['dtype']}")  # fmt: skip


def _memory_header(rows: list[dict]) -> str:
    kinds = {row["memory_kind"] for row in rows if row["memory_kind"]}
    if kinds == {"rss"}:
        return "peak RSS growth MiB"
    return "peak MiB above inputs"


def _rounds(row: dict) -> str:
    """Each round's step time, the round whose figures the row holds in bold."""
    cells = []
    for index, figures in enumerate(row["rounds"] or []):
        ms = step_ms({**row, **figures})
        cell = "failed" if ms is None else _num(ms)
        cells.append(f"**{cell}**" if index == row.get("median_round") else cell)
    return " / ".join(cells)


def case_table(rows: list[dict]) -> list[str]:
    rounds = any(row["rounds"] for row in rows)
    lines = [
        f"| implementation | fwd ms | fwd+bwd ms | TFLOP/s | x GEMM line | {_memory_header(rows)} | max rel err | "
        + ("step ms by round (the row's in bold) | " if rounds else "")
        + "note |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | " + ("---: | " if rounds else "") + "--- |",
    ]
    for row in rows:
        err = "–" if row["max_rel_err"] is None else f"{row['max_rel_err']:.1e}"
        lines.append(
            f"| {row['implementation']} | {_num(row['fwd_ms'])} | {_num(row['fwd_bwd_ms'])} | {_num(row['tflops'])} "
            f"| {_num(row['gemm_ratio'])} | {_num(row['peak_mem_mb'])} | {err} | "
            + (f"{_rounds(row)} | " if rounds else "")
            + f"{_note(row)} |"
        )
    return lines


def sweep_tables(rows: list[dict]) -> list[str]:
    """Implementations down, tokens across: forward+backward ms, then peak memory."""
    tokens = sorted({row["tokens"] for row in rows})
    by_impl = defaultdict(dict)
    for row in rows:
        by_impl[row["implementation"]][row["tokens"]] = row
    lines = []
    for title, key in (("fwd+bwd ms", "fwd_bwd_ms"), (_memory_header(rows), "peak_mem_mb"),
                       ("max rel err (of every round)", "max_rel_err")):  # fmt: skip
        lines += [f"{title}:", "", "| implementation | " + " | ".join(f"{n // 1024}k" if n >= 1024 else str(n)
                                                                      for n in tokens) + " |"]  # fmt: skip
        lines.append("| --- |" + " ---: |" * len(tokens))
        for impl, cells in by_impl.items():
            values = []
            for n in tokens:
                row = cells.get(n)
                values.append("" if row is None else "OOM" if row["oom"] else _short_note(row) or _num(row[key]))
            lines.append(f"| {impl} | " + " | ".join(values) + " |")
        lines.append("")
    failed = [row for row in rows if _short_note(row) == "failed"]
    lines += [f"- {row['implementation']} at {row['tokens']} tokens failed: {row['error']}" for row in failed]
    return lines + ([""] if failed else [])


# The issues' goals (8 and 9): dpo_fast's default over another implementation, at most ``target``.
# (case, mode, the other implementation or "peers" for the best of them, "time" or "memory", target)
GOALS = [
    ("headline", "dpo", "gemm", "time", 1.1),
    ("headline", "dpo", "trl", "time", 0.7),
    ("headline", "dpo", "liger", "time", 0.5),
    ("headline", "dpo", "cce", "time", 0.9),
    ("headline", "dpo", "verl", "time", 1.0),
    ("headline", "dpo", "torch-lce", "time", 1.0),
    ("headline", "dpo", "naive", "memory", 0.05),
    ("headline", "dpo", "peers", "memory", 1.0),
    ("headline", "frozen", "gemm", "time", 1.15),
    ("headline", "forward", "gemm", "time", 1.1),
    ("headline", "token", "trl", "time", 0.7),
    ("cpu", "dpo", "cce", "time", 1.0),
    ("cpu", "dpo", "naive", "memory", 0.10),
]


def _figure(row: dict, metric: str) -> float | None:
    return step_ms(row) if metric == "time" else row["peak_mem_mb"]


def recorded_default(results: dict, dtype: str) -> str | None:
    """The row name of dpo_fast's default (``backend="auto"``, default ``grads_in_forward``) on the machine
    that measured, as its results file recorded it; None in a file from before it was recorded."""
    return ((results["meta"].get("dpo_fast_default") or {}).get(dtype) or {}).get("implementation")


def goal_lines(results: dict) -> list[str]:
    """The goals whose case and mode this run has: dpo_fast's default on the machine that measured (as the
    file records it, never worked out here) against the other, beside the target."""
    rows, lines, unrecorded = results["results"], [], False
    for case, mode, other, metric, target in GOALS:
        group = [r for r in rows if r["case"] == case and r["mode"] == mode]
        if not group:
            continue
        ours = recorded_default(results, group[0]["dtype"])
        if ours is None:
            unrecorded = True
            lines.append(f"| {case} · {mode} | {metric} | not recorded | {other} | – | <= {target} | not judged |")
            continue
        measured = [r for r in group if _figure(r, metric) is not None]
        mine = next((r for r in measured if r["implementation"] == ours), None)
        if other == "peers":
            theirs = [r for r in measured if not r["implementation"].startswith(("dpo_fast-", "gemm"))]
        else:
            theirs = [r for r in measured if r["implementation"] == other]
        against = min(theirs, key=lambda r: _figure(r, metric), default=None)
        if mine is None or against is None:
            ratio, verdict, other_name = "–", "not measured", other
        else:
            value = _figure(mine, metric) / _figure(against, metric)
            ratio, verdict, other_name = (
                f"{value:.3g}",
                "met" if value <= target else "not met",
                against["implementation"],
            )
        lines.append(f"| {case} · {mode} | {metric} | {ours} | {other_name} | {ratio} | <= {target} | {verdict} |")
    if not lines:
        return []
    header = ["## Goals (issues 8 and 9)", "",
              ("dpo_fast's default on the machine that measured (`backend=\"auto\"`, default `grads_in_forward`, "
               "as the results file records it) over the other implementation."), ""]  # fmt: skip
    if unrecorded:
        header += [("This results file does not record what dpo_fast's default was on the machine that measured it "
                    "(it was written before that was recorded), and the default of the machine rendering this "
                    "report may differ: the goals are not judged."), ""]  # fmt: skip
    header += ["| case · mode | figure | dpo_fast | against | ratio | target | |",
               "| --- | --- | --- | --- | ---: | ---: | --- |"]  # fmt: skip
    return [*header, *lines, ""]


def default_line(meta: dict) -> str:
    """What dpo_fast's defaults ran on the machine that measured, by dtype, as recorded."""
    defaults = meta.get("dpo_fast_default")
    if not defaults:
        return "dpo_fast's default on this machine: not recorded (this file was written before it was)."
    described = "; ".join(
        f"{dtype}: `{d['implementation']}` (backend `{d['backend']}`, grads_in_forward={d['grads_in_forward']}, "
        f"scratch {d['scratch_mib']} MiB)"
        for dtype, d in defaults.items()
    )
    line = f"dpo_fast's default on this machine, at the end of the run: {described}."
    at_start = meta.get("dpo_fast_default_at_start")
    if at_start:  # e.g. the cpp extension was built during the run
        line += " At the start it was " + ", ".join(f"{t}: `{d['implementation']}`" for t, d in at_start.items()) + "."
    return line


def rounds_rule(results: dict) -> str:
    """How this file made a row of several rounds: the median round (rows with ``median_round``), or, in files
    written before, per-column medians with round 0's errors."""
    if any("median_round" in row for row in results["results"]):
        return ("with several rounds a row's times and memory are those of its median round by step time, and its "
                "errors the largest of every round's.")  # fmt: skip
    return ("with several rounds (this file predates the median round) a row's times and memory are medians over "
            "the rounds taken column by column, and its errors round 0's.")  # fmt: skip


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        *report.header(f"DPO loss step: {results['suite']} suite, {meta['date']}", meta),
        default_line(meta), "",
        (f"Settings: {json.dumps(results['settings'])}. Times are medians of the timed steps; {rounds_rule(results)} "
         "TFLOP/s counts the mode's products on "
         "valid tokens (2, 4 or 6 x N_valid x H x V) over the step's time; 'x GEMM line' is the time over the same "
         "products' time in this run. Max rel err: the largest ||out - ref|| / ||ref|| over loss, log-probs and "
         "gradients against a float64 reference."), "",
    ]  # fmt: skip
    groups = defaultdict(list)
    for row in results["results"]:
        groups[(row["case"], row["mode"])].append(row)
    for (case, mode), rows in groups.items():
        if case == "sweep":
            title = (
                f"## sweep · {mode}: H={rows[0]['H']}, V={rows[0]['V']}, half of each row prompt, {rows[0]['dtype']}"
            )
            lines += [title, "", *sweep_tables(rows)]
        else:
            lines += [f"## {_case_title(rows[0])}", "", *case_table(rows), ""]
    lines += goal_lines(results)
    if results["missing"]:
        lines += ["## Not measured", ""]
        lines += [f"- {item['implementation']}: {item['reason']}" for item in results["missing"]]
        lines.append("")
    return "\n".join(lines)


def line_style(impl: str) -> dict:
    """Matplotlib style of an implementation's line: the GEMM line (the floor) black and dashed."""
    return {"color": "black", "linestyle": "--"} if impl == "gemm" else {"linestyle": "-"}


def plots(results: dict) -> dict[str, list[report.Panel]]:
    """The sweep's plots, ``time`` and ``memory``: forward+backward time and peak memory against tokens, one line
    per implementation (log-log, the GEMM line dashed); none without a sweep."""
    rows = [row for row in results["results"] if row["case"] == "sweep" and row["mode"] == "dpo"]
    if not rows:
        return {}
    meta, found = results["meta"], {}
    device = meta["device"].get("gpu") or meta["device"]["cpu"]
    tokens = sorted({r["tokens"] for r in rows})
    for key, label, name in (("fwd_bwd_ms", "forward+backward ms", "time"),
                             ("peak_mem_mb", _memory_header(rows), "memory")):  # fmt: skip
        by_impl = defaultdict(list)
        for row in sorted(rows, key=lambda r: r["tokens"]):
            by_impl[row["implementation"]].append(row)
        panel = report.Panel(title=f"DPO loss step, H={rows[0]['H']}, V={rows[0]['V']}, {rows[0]['dtype']}, {device}",
                             xlabel="tokens (half prompt)", ylabel=label, log_x=True, log_y=True, xticks=tokens)  # fmt: skip
        for impl, impl_rows in by_impl.items():
            points = [(r["tokens"], r[key]) for r in impl_rows if r[key] is not None]
            oom = [r["tokens"] for r in impl_rows if r["oom"]]
            capped = [r["tokens"] for r in impl_rows if (r["error"] or "").startswith(MEMORY_CAP_NOTE)]
            legend = impl + (f" (OOM from {min(oom)} tokens)" if oom else "")
            legend += f" (over the memory cap from {min(capped)} tokens)" if capped else ""
            if points:
                panel.lines[legend], panel.styles[legend] = points, line_style(impl)
        if panel.lines:  # e.g. no memory, when it was not measured
            found[name] = [panel]
    return found


def write(results: dict, stem: Path, tables: bool = True) -> None:
    """``<stem>.json`` always; ``<stem>.md`` and the plots when ``tables`` (``_stack.report``)."""
    derive(results["results"])
    if tables:
        report.write(results, stem, markdown(results), plots(results))
    else:
        report.write_json(results, stem.with_name(stem.name + ".json"))
