"""The precomputed reference's cache key is a hash of the reference's weights (``reference.weights_digest``), not of
where they came from: two runs from the same config ``.json`` and seed whose weights differ (ZeRO-3 builds a model
partitioned, and its random init comes out otherwise) each compute their own reference, and the same weights share
one wherever they are read from."""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from trainer_helpers import TINY_LLAMA, run, train_records, write_tiny_files
from transformers import AutoConfig, AutoModelForCausalLM

from dpo_fast.trainer import model as model_lib


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_files(tmp_path_factory.mktemp("tiny"), train_rows=32, eval_rows=8)


def computed(capsys) -> int:
    """How many reference tables the last run computed (rather than read from the cache)."""
    return capsys.readouterr().out.count("computed and cached")


def test_runs_whose_initial_weights_differ_do_not_share_a_reference(files, tmp_path, monkeypatch, capsys):
    options = {"max_steps": 1, "eval_dataset": None}
    first = train_records(run(files, tmp_path / "first", **options))
    assert computed(capsys) == 1
    load_model = model_lib.load_model

    def another_init(cfg):  # the same config file and seed, other weights: as ZeRO-3's partitioned init gives
        model = load_model(cfg)
        noise = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=noise))
        return model

    monkeypatch.setattr(model_lib, "load_model", another_init)
    second = train_records(run(files, tmp_path / "second", **options))
    assert computed(capsys) == 1  # a cache miss: the key is the weights'
    assert abs(second[0]["logps/chosen"] - first[0]["logps/chosen"]) > 1
    # at step 1 the policy is its own reference: rewards 0 up to rounding (with the first run's reference they
    # were beta times the difference of the two runs' log-probs)
    for record in (first[0], second[0]):
        assert abs(record["rewards/chosen"]) < 1e-5 and abs(record["rewards/rejected"]) < 1e-5, record


def test_the_same_weights_share_a_reference_whatever_their_source(files, tmp_path, capsys):
    """A model folder and a copy of it elsewhere (another path, other modification times): one reference."""
    options = {"max_steps": 1, "eval_dataset": None}
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA)).save_pretrained(tmp_path / "folder")
    original = train_records(run(files, tmp_path / "original", model=str(tmp_path / "folder"), **options))
    assert computed(capsys) == 1
    shutil.copytree(tmp_path / "folder", tmp_path / "copy")
    copied = train_records(run(files, tmp_path / "copied", model=str(tmp_path / "copy"), **options))
    assert computed(capsys) == 0  # read from the cache the first run wrote
    assert copied == original
