"""``report_to``: dpo-fast train's records reach TensorBoard, W&B (offline) and trackio, read back from their files.

Each tracker must hold every record of ``metrics.jsonl`` under the same names at the same steps (TensorBoard stores
float32: within 1e-6 relative). TensorBoard's event files are read with TensorBoard's own reader; W&B's offline run
file with a reader of its record log below; trackio's store with trackio's. The W&B and trackio tests skip where the
package is not installed (the ``test`` extra installs TensorBoard only).
"""

from __future__ import annotations

import json
import math
import struct

import pytest
import yaml
from trainer_helpers import run, run_values, write_tiny_files

from dpo_fast.trainer import TrainConfig, cli, load_config, trackers

STEPS = 6  # trainer_helpers.run's: logged every step, evaluated at steps 3 and 6


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_files(tmp_path_factory.mktemp("trackers") / "files")


def expected(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metric name -> [(step, value)] of every metrics.jsonl record (``step`` itself is the step)."""
    series = {}
    for record in records:
        for key, value in record.items():
            if key != "step":
                series.setdefault(key, []).append((record["step"], value))
    return series


def by_step(records: list[dict]) -> list[dict]:
    """The records of each step merged into one (W&B keeps one history row per step; the train and eval records of
    a step share ``epoch``)."""
    merged = {}
    for record in records:
        merged.setdefault(record["step"], {}).update(record)
    return list(merged.values())


def assert_series_equal(got: dict, want: dict, rel: float) -> None:
    assert got.keys() == want.keys()
    for name, points in want.items():
        assert [step for step, _ in got[name]] == [step for step, _ in points], name
        for (_, value), (_, logged) in zip(got[name], points):
            assert math.isclose(value, logged, rel_tol=rel, abs_tol=1e-12), (name, value, logged)


def test_report_to_takes_names_a_list_or_none_and_refuses_anything_else(files, tmp_path):
    values = run_values(files, tmp_path / "out")
    assert TrainConfig(**values).report_to == "none" and trackers.names("none") == []
    assert TrainConfig(**values, report_to=["tensorboard", "wandb"]).report_to == "tensorboard,wandb"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**values, "report_to": ["trackio", "tensorboard"]}))
    assert trackers.names(load_config(path).report_to) == ["trackio", "tensorboard"]
    for bad in ("tensorbord", "none,tensorboard", "wandb,wandb", ""):
        with pytest.raises(ValueError, match="report_to must be none, or one or more of tensorboard | wandb"):
            TrainConfig(**values, report_to=bad)


def test_a_tracker_that_is_not_installed_is_one_line_naming_the_package(files, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(trackers.TRACKERS, "wandb", (lambda: False, "wandb"))
    out = tmp_path / "out"
    argv = ["train", "--config", str(tmp_path / "run.json"), "--report-to", "tensorboard,wandb"]
    (tmp_path / "run.json").write_text(json.dumps(run_values(files, out)))
    assert cli.main(argv) == cli.USER_ERROR_STATUS
    assert "report_to: wandb needs the wandb package: pip install wandb" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was created


def tensorboard_series(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard shows for the event files in ``folder``, as name -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_every_record_of_metrics_jsonl(files, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    records = run(files, out, report_to="tensorboard", eval_steps=3)
    assert len(records) == STEPS + 2 and "eval_loss" in records[3]
    assert_series_equal(tensorboard_series(out / trackers.PROJECT), expected(records), rel=1e-6)


def test_tensorboard_hides_what_an_earlier_run_logged_past_the_new_runs_start(files, tmp_path):
    """A run again into the same folder (``overwrite_output_dir``) shows only its own steps, as metrics.jsonl does."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    run(files, out, report_to="tensorboard")
    records = run(files, out, report_to="tensorboard", max_steps=3, learning_rate=1e-3, overwrite_output_dir=True)
    assert [record["step"] for record in records] == [1, 2, 3, 3]
    assert_series_equal(tensorboard_series(out / trackers.PROJECT), expected(records), rel=1e-6)


def wandb_history(path) -> list[dict]:
    """The history rows (``_step`` and the logged values) of a W&B run file (``run-*.wandb``).

    The file is W&B's record log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of
    chunks, each a 7-byte header (CRC32C, length: little-endian uint16, type: 1 whole, 2 first, 3 middle, 4 last)
    and its bytes, a block's tail shorter than a header zero-padded; each whole record is a ``Record`` protobuf."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0)
    rows, position, pending = [], 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail: padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a record is whole
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})  # fmt: skip
    return rows


def test_wandb_offline_holds_every_record_of_metrics_jsonl(files, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    records = run(files, out, report_to="wandb", eval_steps=3)
    wandb.teardown()  # the run file is written by W&B's service process: wait for it to finish
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    series = {}
    for row in wandb_history(run_file):
        for key, value in row.items():
            if not key.startswith("_"):  # W&B's own: _step, _runtime, _timestamp
                series.setdefault(key, []).append((row["_step"], value))
    assert_series_equal(series, expected(by_step(records)), rel=1e-12)


def test_trackio_holds_every_record_of_metrics_jsonl(files, tmp_path, monkeypatch):
    pytest.importorskip("trackio")
    from trackio import sqlite_storage, utils

    for module in (utils, sqlite_storage):  # its store, read at import from TRACKIO_DIR
        monkeypatch.setattr(module, "TRACKIO_DIR", tmp_path / "trackio")
    out = tmp_path / "tk"
    records = run(files, out, report_to="trackio", eval_steps=3)
    series = {}
    for row in sqlite_storage.SQLiteStorage.get_logs(trackers.PROJECT, out.name):
        for key, value in row.items():
            if key not in ("step", "timestamp"):
                series.setdefault(key, []).append((row["step"], value))
    assert_series_equal(series, expected(records), rel=1e-12)
