"""Run axolotl's DPO on CPU, plain and with plugins, and compare the losses per step and the weight updates.

Usage (with the Python of a venv that has axolotl and dpo_fast; docs/trl.md, "axolotl")::

    python tests/axolotl_harness/run_harness.py --work /tmp/axo                       # plain + the hook probe
    python tests/axolotl_harness/run_harness.py --work /tmp/axo --plugin my.module.Plugin --tolerance 1e-4
    python tests/axolotl_harness/run_harness.py --work /tmp/axo-kto --rl kto --plugin my.module.Plugin \
        --record benchmarks/results/axolotl-plugin-kto                                # .json and .md written

Takes: a work folder (the tiny model and data are built there once, by ``fixtures.py``), ``--rl`` (``dpo`` or
``kto``: the data and ``rl:`` of the config), the number of steps and pairs, and the plugins to compare (``module.Class`` names, importable with ``tests/axolotl_harness`` on ``PYTHONPATH``;
by default ``hook_probe.HookProbePlugin``, which changes nothing). Runs ``python -m axolotl.cli.train`` once
plain and once per plugin (``plugins: [name]`` added to the same config), offline (``HF_HUB_OFFLINE=1``), each
in its own folder with its log. Gives: a table of the loss per step of every run, each run's weight update
(the checkpoint at the last step minus the initial weights), and per plugin the largest relative difference
from plain axolotl's loss and update; ``summary.json`` in the work folder holds the same. Exits 1 when a run
fails, when a plugin was not loaded (axolotl only warns and trains without it), or when ``--tolerance`` is
given and a plugin's loss or update differs from plain axolotl's by more. ``--record STEM`` also writes
``STEM.json`` and ``STEM.md``: the same with the versions (Python, axolotl, TRL, transformers, ...) and the code's
commit (``benchmarks/environment.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fixtures  # noqa: E402

PROBE = "hook_probe.HookProbePlugin"


def environment() -> dict:
    """The runs' environment: offline, no telemetry, CPU only, the harness's plugins importable."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", AXOLOTL_DO_NOT_TRACK="1",
               DO_NOT_TRACK="1", WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")  # fmt: skip
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(fixtures.ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_axolotl(name: str, config_text: str, work: Path) -> dict:
    """Run ``python -m axolotl.cli.train`` on ``config_text`` in ``work/name``; gives the run's record."""
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.yml"
    config.write_text(config_text)
    log = folder / "axolotl.log"
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "axolotl.cli.train", str(config)], stdout=out,
                              stderr=subprocess.STDOUT, env=environment(), cwd=folder)  # fmt: skip
    return {"name": name, "returncode": done.returncode, "wall_s": round(time.perf_counter() - start, 1),
            "log": str(log), "config": str(config)}  # fmt: skip


def losses(checkpoint: Path) -> dict[int, dict]:
    """step -> the train record TRL logged at that step (``loss``, ``rewards/*``, ...), from trainer_state.json."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {entry["step"]: entry for entry in state["log_history"] if "loss" in entry}


def weights(folder: Path) -> dict:
    """The safetensors weights saved in ``folder``, as float64 tensors by name."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights")
    return {name: tensor.double() for file in files for name, tensor in load_file(file).items()}


def updates(initial: dict, checkpoint: Path) -> dict:
    """name -> the parameter's update over the run (trained minus initial), float64."""
    trained = weights(checkpoint)
    missing = sorted(set(initial) - set(trained))
    if missing:
        raise ValueError(f"{checkpoint} lacks parameters {missing[:3]}")
    return {name: trained[name] - initial[name] for name in initial}


def relative(a, b) -> float:
    """``||a - b|| / ||b||`` (absolute when ``b`` is 0)."""
    norm = float(b.norm())
    return float((a - b).norm()) / (norm if norm > 0 else 1.0)


def plugin_problems(record: dict, plugin: str) -> list[str]:
    """What the run's log says went wrong with loading ``plugin`` (axolotl skips a plugin it cannot load)."""
    text = Path(record["log"]).read_text(errors="replace")
    problems = []
    if f"Plugin loaded successfully: {plugin}" not in text:
        problems.append(f"axolotl did not report loading {plugin}")
    if f"Could not load plugin '{plugin}'" in text:
        problems.append(f"axolotl could not load {plugin} and trained without it")
    return problems


def compare(runs: list[dict], initial: dict, steps: int) -> None:
    """Fill each run's record with its losses and update, and each plugin run's differences from the plain one."""
    for record in runs:
        if record["returncode"] != 0:
            continue
        checkpoint = Path(record["config"]).parent / "out" / f"checkpoint-{steps}"
        record["losses"] = {step: entry["loss"] for step, entry in losses(checkpoint).items()}
        record["margins"] = {step: entry.get("rewards/margins") for step, entry in losses(checkpoint).items()}
        record["_updates"] = updates(initial, checkpoint)
        record["update_norm"] = float(sum(float(u.pow(2).sum()) for u in record["_updates"].values()) ** 0.5)
    plain = runs[0]
    for record in runs[1:]:
        if record["returncode"] != 0 or plain["returncode"] != 0:
            continue
        loss_diffs = [abs(record["losses"][s] - plain["losses"][s]) / max(abs(plain["losses"][s]), 1e-12)
                      for s in plain["losses"]]  # fmt: skip
        per_param = {name: relative(record["_updates"][name], plain["_updates"][name]) for name in plain["_updates"]}
        worst = max(per_param, key=per_param.get)
        record["vs_plain"] = {"loss_max_rel": max(loss_diffs), "update_max_rel": per_param[worst],
                              "update_worst_param": worst}  # fmt: skip


def report(runs: list[dict], steps: int) -> str:
    """The runs as text: loss per step side by side, the update norms, the differences from plain axolotl."""
    ok = [r for r in runs if r["returncode"] == 0]
    lines = ["step  " + "  ".join(f"{r['name'][:24]:>24}" for r in ok)]
    for step in range(1, steps + 1):
        lines.append(f"{step:>4}  " + "  ".join(f"{r['losses'].get(step, float('nan')):>24.8f}" for r in ok))
    lines.append("update ||dW||  " + "  ".join(f"{r['name']}={r['update_norm']:.6e}" for r in ok))
    for record in runs:
        status = f"rc={record['returncode']}, {record['wall_s']} s, log {record['log']}"
        diff = record.get("vs_plain")
        if diff:
            status += (f"; vs plain: loss max rel diff {diff['loss_max_rel']:.3e}, update max rel diff "
                       f"{diff['update_max_rel']:.3e} ({diff['update_worst_param']})")  # fmt: skip
        lines.append(f"{record['name']}: {status}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, type=Path, help="work folder (fixtures, one folder per run)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (default: 4)")
    parser.add_argument("--rows", type=int, default=64, help="preference pairs in the data (default: 64)")
    parser.add_argument("--rl", choices=("dpo", "kto"), default="dpo", help="axolotl's rl: (default: dpo)")
    parser.add_argument("--record", type=Path, default=None, help="write STEM.json and STEM.md (versions, commit)")
    parser.add_argument("--plugin", action="append", default=None,
                        help=f"a plugin to compare against plain axolotl, module.Class (repeatable; default: {PROBE})")  # fmt: skip
    parser.add_argument("--tolerance", type=float, default=None,
                        help="fail when a plugin's loss or update differs from plain axolotl's by more (relative)")  # fmt: skip
    args = parser.parse_args(argv)
    load_before = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    work = args.work.resolve()
    model_dir, data = work / "fixtures" / "model", work / "fixtures" / "pairs.jsonl"
    if not (model_dir / "config.json").is_file():
        fixtures.build_model(model_dir)
    fixtures.build_data(data, args.rows, rl=args.rl)
    initial = weights(model_dir)

    plugins = args.plugin if args.plugin is not None else [PROBE]
    runs = []
    for name, listed in [("plain", [])] + [(plugin, [plugin]) for plugin in plugins]:
        config = fixtures.render_config(model_dir, data, work / name, plugins=listed, max_steps=args.steps, rl=args.rl,
                                        **fixtures.RL_KEYS[args.rl])  # fmt: skip
        print(f"running axolotl: {name} ...", flush=True)
        runs.append(run_axolotl(name, config, work))
    failures = [f"{r['name']}: axolotl exited {r['returncode']} (see {r['log']})" for r in runs if r["returncode"]]
    for record, plugin in zip(runs[1:], plugins):
        if record["returncode"] == 0:
            failures += [f"{plugin}: {problem}" for problem in plugin_problems(record, plugin)]
    compare(runs, initial, args.steps)
    print(report(runs, args.steps))
    for record in runs:
        probe_lines = [line for line in Path(record["log"]).read_text(errors="replace").splitlines()
                       if line.startswith("[hook-probe]")]  # fmt: skip
        if probe_lines:
            print(f"--- {record['name']}: the hooks axolotl called\n" + "\n".join(probe_lines))
    if args.tolerance is not None:
        for record in runs[1:]:
            diff = record.get("vs_plain")
            if diff and max(diff["loss_max_rel"], diff["update_max_rel"]) > args.tolerance:
                failures.append(f"{record['name']}: differs from plain axolotl by more than {args.tolerance}")
    summary = {"rl": args.rl, "steps": args.steps, "rows": args.rows, "tolerance": args.tolerance,
               "runs": [{k: v for k, v in record.items() if not k.startswith("_")} for record in runs],
               "failures": failures, "load_before": load_before}  # fmt: skip
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    if args.record is not None:
        import record

        record.write(args.record, summary, report(runs, args.steps))
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
