"""Run the drop-ins' tests on each TRL release of the supported range, one virtual environment per release, and record
the outcome in benchmarks/results/trl-versions.{json,md} (docs/trl.md, "Versions").

Each test file runs in its own pytest process with the environment's Python, ``TRITON_INTERPRET=1`` (stock TRL 1.15
launches its Triton kernels on any device: on CPU only Triton's interpreter runs them) and a JUnit report; the
record holds, per release and file, the passed / failed / skipped / errored counts, pytest's time and the command's
wall time, with each environment's versions (TRL, transformers, accelerate, datasets, peft, torch, triton), the
code's commit (``environment.code_state``) and the load average before and after.

Example (the environments as docs/trl.md describes them)::

    python benchmarks/trl_versions.py --python /work/venv-trl114/bin/python --python /work/venv-trl115/bin/python \\
        --python /work/venv-mixin/bin/python

Takes about 25 minutes on 2 cores. Exits 1 when a test failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.etree import ElementTree

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _stack import environment  # noqa: E402

ROOT = environment.ROOT
FILES = ("test_trl.py", "test_kto_trl.py", "test_trl_mixin.py", "test_trl_versions.py", "test_trl_options.py",
         "test_trl_recipe.py", "test_fsdp_trl.py")  # fmt: skip
PACKAGES = ("trl", "transformers", "accelerate", "datasets", "peft", "torch", "triton")


def versions(python: str) -> dict:
    """Python's and ``PACKAGES``' versions in the environment of ``python``."""
    code = (
        "import importlib.metadata as m, json, platform; v = {'python': platform.python_version()}\n"
        f"for p in {PACKAGES!r}:\n"
        "    try: v[p] = m.version(p)\n"
        "    except m.PackageNotFoundError: v[p] = 'not installed'\n"
        "print(json.dumps(v))"
    )
    return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)


def run_file(python: str, name: str, folder: Path) -> dict:
    """One test file under ``python``: the counts from its JUnit report, pytest's time, the wall time."""
    report = folder / f"{name}.xml"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    start = time.perf_counter()
    done = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                           str(ROOT / "tests" / "integrations" / name)], capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
    wall = time.perf_counter() - start
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    failed = [case.get("name") for case in suite.iter("testcase") if case.find("failure") is not None
              or case.find("error") is not None]  # fmt: skip
    return {"file": name, "returncode": done.returncode, **counts, "passed": counts["tests"] - counts["failures"]
            - counts["errors"] - counts["skipped"], "pytest_s": round(float(suite.get("time", 0)), 1),
            "wall_s": round(wall, 1), "failed_tests": failed}  # fmt: skip


def markdown(record: dict) -> str:
    """The record as a page: one column per release, one row per file."""
    releases = record["releases"]
    lines = [
        "# The drop-ins' tests on each supported TRL release",
        "",
        f"{record['date']}; {environment.code_summary(record['code'])}",
        f"Machine: {record['machine']}; load average before {record['load_before']}, after {record['load_after']}.",
        "",
        "Each cell: passed / tests, pytest's time (the command's wall time, with start-up and collection).",
        "",
        "| test file | " + " | ".join(f"TRL {r['versions']['trl']}" for r in releases) + " |",
        "| --- | " + " | ".join("---" for _ in releases) + " |",
    ]
    for index, name in enumerate(FILES):
        cells = [f"{r['files'][index]['passed']}/{r['files'][index]['tests']}, {r['files'][index]['pytest_s']} s "
                 f"({r['files'][index]['wall_s']})" for r in releases]  # fmt: skip
        lines.append(f"| `tests/integrations/{name}` | " + " | ".join(cells) + " |")
    totals = [(sum(f["passed"] for f in r["files"]), sum(f["tests"] for f in r["files"]),
               sum(f["pytest_s"] for f in r["files"]), sum(f["wall_s"] for f in r["files"])) for r in releases]  # fmt: skip
    lines.append("| **all** | " + " | ".join(f"**{p}/{t}, {s:.0f} s ({w:.0f})**" for p, t, s, w in totals) + " |")
    lines += ["", "| environment | " + " | ".join(PACKAGES[1:]) + " | python |",
              "| --- | " + " | ".join("---" for _ in PACKAGES) + " |"]  # fmt: skip
    for r in releases:
        v = r["versions"]
        lines.append(f"| TRL {v['trl']} | " + " | ".join(v[p] for p in PACKAGES[1:]) + f" | {v['python']} |")
    failed = [f"TRL {r['versions']['trl']} {f['file']}: {f['failed_tests']}" for r in releases for f in r["files"]
              if f["failed_tests"] or f["returncode"] not in (0,)]  # fmt: skip
    lines += ["", f"Failures: {'; '.join(failed) if failed else 'none'}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", action="append", required=True, help="an environment's Python (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / environment.RESULTS / "trl-versions",
                        help="the results' stem (default: benchmarks/results/trl-versions)")  # fmt: skip
    args = parser.parse_args(argv)
    load_before = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    code = environment.code_state()
    releases = []
    with tempfile.TemporaryDirectory() as scratch:
        for python in args.python:
            found = versions(python)
            print(f"TRL {found['trl']} ({python})", flush=True)
            files = []
            for name in FILES:
                files.append(run_file(python, name, Path(scratch)))
                print(f"  {name}: {files[-1]['passed']}/{files[-1]['tests']} passed, {files[-1]['wall_s']} s",
                      flush=True)  # fmt: skip
            releases.append({"python_path": python, "versions": found, "files": files})
    record = {"date": datetime.date.today().isoformat(), "code": code, "machine": f"{os.cpu_count()} CPUs",
              "load_before": load_before, "load_after": ", ".join(f"{v:.1f}" for v in os.getloadavg()),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "releases": releases}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(record))
    bad = any(f["returncode"] != 0 for r in releases for f in r["files"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
