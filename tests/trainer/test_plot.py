"""``dpo-fast plot``: a real short run's metrics.jsonl drawn to a PNG with its three panels; bad input is one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from matplotlib.image import imread  # noqa: E402
from trainer_helpers import run, write_tiny_files  # noqa: E402

from dpo_fast.trainer import cli, plot  # noqa: E402

TITLES = ["loss", "reward accuracy", "reward margin"]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two real tiny runs (6 steps, logged every step, evaluated at steps 3 and 6): DPO and KTO."""
    root = tmp_path_factory.mktemp("plot")
    files = write_tiny_files(root / "files")
    out = {}
    for objective in ("dpo", "kto"):
        out[objective] = root / objective
        run(files, out[objective], objective=objective, eval_steps=3, max_steps=6)
    return out


def records_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def lines_of(ax) -> dict[str, tuple[list, list]]:
    """The axes' lines by label's first word (``train``, ``eval``): their x and y data."""
    return {line.get_label().split()[0]: (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()
            if not line.get_label().startswith("_")}  # fmt: skip


def test_the_cli_writes_a_png_of_three_panels_drawn_from_the_log(runs, capsys):
    run_dir = runs["dpo"]
    assert cli.main(["plot", str(run_dir)]) == 0
    png = run_dir / "metrics.png"
    assert capsys.readouterr().out.strip() == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(png)
    height, width = pixels.shape[:2]
    assert width > 2 * height > 400
    # each third of the image (one panel) holds both curves' colours: C0 (train) and C1 (eval)
    colours = {"train": (0x1F, 0x77, 0xB4), "eval": (0xFF, 0x7F, 0x0E)}
    for third in range(3):
        panel = pixels[:, third * width // 3 : (third + 1) * width // 3, :3]
        for name, rgb in colours.items():
            close = (abs(panel - [c / 255 for c in rgb]).max(axis=-1) < 0.06).sum()
            assert close > 20, (third, name, close)


def test_each_panel_draws_the_logged_train_and_eval_values(runs):
    records = records_of(runs["dpo"])
    fig = plot.figure(plot.read_records(runs["dpo"] / "metrics.jsonl"))
    assert [ax.get_title() for ax in fig.axes] == TITLES
    for ax, (key, _) in zip(fig.axes, plot.PANELS):
        lines = lines_of(ax)
        for name, prefix in (("train", ""), ("eval", "eval_")):
            steps = [r["step"] for r in records if prefix + key in r]
            values = [r[prefix + key] for r in records if prefix + key in r]
            assert steps, (key, name)
            assert lines[name][0] == steps and lines[name][1] == pytest.approx(values, rel=0, abs=0), (key, name)
    assert lines_of(fig.axes[0])["eval"][0] == [3, 6]


def test_a_metric_the_objective_does_not_log_leaves_its_panel_empty_with_a_note(runs, tmp_path):
    records = plot.read_records(runs["kto"] / "metrics.jsonl")
    assert not any("rewards/accuracies" in r for r in records)  # KTO logs no reward accuracy
    fig = plot.figure(records)
    assert [ax.get_title() for ax in fig.axes] == TITLES
    loss, accuracy, margin = fig.axes
    assert not lines_of(accuracy) and "not logged" in " ".join(text.get_text() for text in accuracy.texts)
    assert set(lines_of(loss)) == set(lines_of(margin)) == {"train", "eval"}
    out = plot.plot(runs["kto"], tmp_path / "sub" / "kto.png")  # --out: any path, its folder made
    assert out == tmp_path / "sub" / "kto.png" and out.read_bytes()[:4] == b"\x89PNG"


def test_a_torn_last_line_is_skipped_with_a_note(runs, tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text((runs["dpo"] / "metrics.jsonl").read_text() + '{"step": 7, "loss": 0.6')
    records = plot.read_records(log)
    assert records == records_of(runs["dpo"]) and "skipped 1 line" in capsys.readouterr().err
    assert cli.main(["plot", str(log)]) == 0 and (tmp_path / "metrics.png").is_file()


def cli_error(capsys, argv) -> tuple[int, str]:
    status = cli.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("dpo-fast plot: error: ")
    return status, lines[0]


def bad_inputs(tmp_path, runs):
    """name -> (the path to plot, a piece of the one-line error)."""
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (tmp_path / "empty.jsonl").write_text("")
    dataset = tmp_path / "dataset.jsonl"
    dataset.write_text(json.dumps({"prompt": "reverse ab:", "chosen": " ba", "rejected": " ab"}) + "\n")
    unrelated = tmp_path / "unrelated.jsonl"
    unrelated.write_text(json.dumps({"step": 1, "grad_norm": 1.0}) + "\n")
    text = tmp_path / "text.jsonl"
    good = (runs["dpo"] / "metrics.jsonl").read_text().splitlines()
    text.write_text("\n".join([good[0], json.dumps({"step": 2, "loss": "low"})]) + "\n")
    return {
        "no such path": (tmp_path / "missing", "no such run folder or metrics file"),
        "a folder without a log": (empty_dir, "has no metrics.jsonl"),
        "an empty file": (tmp_path / "empty.jsonl", "holds no metrics record"),
        "a data file": (dataset, "holds no metrics record"),
        "no plotted metric": (unrelated, "log none of loss, rewards/accuracies, rewards/margins"),
        "a metric that is not a number": (text, "step 2: loss is 'low', not a number"),
    }


@pytest.mark.parametrize("case", ["no such path", "a folder without a log", "an empty file", "a data file",
                                  "no plotted metric", "a metric that is not a number"])  # fmt: skip
def test_bad_input_is_one_error_line_and_exit_2(runs, tmp_path, capsys, case):
    path, message = bad_inputs(tmp_path, runs)[case]
    status, line = cli_error(capsys, ["plot", str(path)])
    assert status == 2 and message in line, line
    assert not list(tmp_path.rglob("*.png"))
    with pytest.raises((ValueError, OSError)):
        cli.main(["plot", str(path), "--debug"])


def test_without_matplotlib_the_error_names_the_install(runs, monkeypatch, capsys):
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    status, line = cli_error(capsys, ["plot", str(runs["dpo"])])
    assert status == 2 and "pip install matplotlib" in line
    with pytest.raises(ModuleNotFoundError, match="pip install matplotlib"):
        plot.figure(plot.read_records(runs["dpo"] / "metrics.jsonl"))


def test_the_default_runs_recorded_metrics_plot_with_its_eval_figures(tmp_path, capsys):
    """The bundled default run's metrics.jsonl, as benchmarks/results/default-run.json recorded it (400 steps, eval
    every 100): the CLI draws it, and each panel's eval curve is the recorded eval metrics at steps 100 to 400."""
    recorded = json.loads((ROOT / "benchmarks" / "results" / "default-run.json").read_text())["metrics"]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in recorded))
    assert cli.main(["plot", str(tmp_path), "--out", str(tmp_path / "default-run.png")]) == 0
    assert (tmp_path / "default-run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = plot.figure(plot.read_records(tmp_path / "metrics.jsonl"))
    evals = [record for record in recorded if "eval_loss" in record]
    assert [record["step"] for record in evals] == [100, 200, 300, 400]
    for ax, (key, _) in zip(fig.axes, plot.PANELS):
        assert lines_of(ax)["eval"] == ([100, 200, 300, 400], [record["eval_" + key] for record in evals]), key
        assert len(lines_of(ax)["train"][0]) == sum("loss" in record for record in recorded)
