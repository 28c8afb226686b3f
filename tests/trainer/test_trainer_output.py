"""The trainer's output folder and checkpoints: nothing lost, nothing mixed, nothing run on load.

A fresh run refuses a folder that holds a run; overwrite replaces it; the metrics log always
matches the state resumed (after a kill before the first checkpoint, or mid-write); stray folders
are ignored; a planted pickle in a checkpoint is refused; a LoRA checkpoint of a config-built model
loads with ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("peft")

from trainer_helpers import TINY_LLAMA, logged, run, train_records, weights, write_tiny_files
from transformers import AutoConfig, AutoModelForCausalLM


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_files(tmp_path_factory.mktemp("tiny"), train_rows=32, eval_rows=8)


def names(folder):
    return sorted(path.name for path in folder.iterdir())


def test_a_fresh_run_refuses_a_non_empty_output_dir_and_overwrite_replaces_the_old_run(files, tmp_path):
    out = tmp_path / "run"
    old = run(files, out, max_steps=4, save_steps=2, save_total_limit=0)
    (out / "notes.txt").write_text("the user's own file")
    with pytest.raises(
        ValueError, match="output_dir .* is not empty .*--resume-from-checkpoint auto.*--overwrite-output-dir"
    ):
        run(files, out, max_steps=3, save_steps=1)
    assert logged(out) == old and names(out) == ["checkpoint-2", "checkpoint-4", "metrics.jsonl", "notes.txt"]

    new = run(files, out, max_steps=3, save_steps=1, overwrite_output_dir=True)  # keeps the last 2 checkpoints
    assert [r["step"] for r in train_records(new)] == [1, 2, 3]  # the old run's lines are gone
    assert names(out) == ["checkpoint-2", "checkpoint-3", "metrics.jsonl", "notes.txt"]
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["config"]["max_steps"] == 3


def test_auto_resume_without_a_checkpoint_starts_fresh_and_rewrites_the_log(files, tmp_path):
    out = tmp_path / "run"
    first = run(files, out, max_steps=4)
    shutil.rmtree(out / "checkpoint-4")  # as if killed after step 4's log line, before any checkpoint
    again = run(files, out, max_steps=4, resume_from_checkpoint="auto")
    assert again == first


def test_resume_drops_a_log_line_torn_by_a_kill(files, tmp_path):
    out = tmp_path / "run"
    first = run(files, out, max_steps=4, save_steps=2, save_total_limit=0)
    shutil.rmtree(out / "checkpoint-4")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "epoch": 1.2, "lo')  # killed mid-write
    again = run(files, out, max_steps=4, save_steps=2, resume_from_checkpoint="auto")
    assert again == first


def test_stray_checkpoint_named_folders_are_not_checkpoints(files, tmp_path):
    out = tmp_path / "run"
    first = run(files, out, max_steps=4, save_steps=2, save_total_limit=0)
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-copy")
    (out / "checkpoint-4").rename(out / "checkpoint-4-old")
    again = run(files, out, max_steps=4, save_steps=2, save_total_limit=1, resume_from_checkpoint="auto")
    assert again == first
    assert names(out) == ["checkpoint-4", "checkpoint-4-old", "checkpoint-copy", "metrics.jsonl"]


def test_resuming_an_earlier_checkpoint_refuses_the_later_ones_unless_overwriting(files, tmp_path):
    out = tmp_path / "run"
    first = run(files, out, max_steps=4, save_steps=2, save_total_limit=0)
    earlier = str(out / "checkpoint-2")
    with pytest.raises(ValueError, match=r"holds checkpoints after step 2 \(checkpoint-4\)"):
        run(files, out, max_steps=4, save_steps=2, resume_from_checkpoint=earlier)
    again = run(files, out, max_steps=4, save_steps=2, resume_from_checkpoint=earlier, overwrite_output_dir=True)
    assert again == first and names(out) == ["checkpoint-2", "checkpoint-4", "metrics.jsonl"]


class _Payload:
    """Runs a shell command when unpickled."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("planted", ["optimizer.pt", "rng_state_0.pt"])
def test_resume_refuses_a_checkpoint_whose_pickle_would_run_code(files, tmp_path, planted):
    source = tmp_path / "source"
    run(files, source, max_steps=2, save_steps=1, save_total_limit=0)
    marker = tmp_path / "code-ran"
    checkpoint = source / "checkpoint-1"
    if planted == "optimizer.pt":
        saved = torch.load(checkpoint / planted, weights_only=True)
        saved["scheduler"]["payload"] = _Payload(f"touch {marker}")
    else:
        saved = {"python": _Payload(f"touch {marker}")}
    torch.save(saved, checkpoint / planted)
    with pytest.raises(ValueError, match=f"{planted}' holds objects other than tensors.*it was not loaded"):
        run(files, tmp_path / "resumed", max_steps=2, resume_from_checkpoint=str(checkpoint))
    assert not marker.exists()


def test_a_lora_checkpoint_of_a_config_built_model_loads_with_from_pretrained(files, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel

    out = tmp_path / "run"
    run(files, out, max_steps=2, lora_r=4, lora_alpha=8, learning_rate=1e-2, reference="adapters")
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "base" / "config.json").is_file(), "no base model beside the adapters"
    config = json.loads((checkpoint / "model" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((checkpoint / "base").resolve())

    torch.manual_seed(0)  # the run's random init, as its seed made it
    init = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA))
    base = AutoModelForCausalLM.from_pretrained(checkpoint / "base")
    assert base.state_dict().keys() == init.state_dict().keys()
    for key, value in init.state_dict().items():
        assert torch.equal(base.state_dict()[key], value), key

    input_ids = torch.randint(4, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    loaded = [
        PeftModel.from_pretrained(base, checkpoint / "model"),  # portable: the folder may move
        AutoPeftModelForCausalLM.from_pretrained(checkpoint / "model"),  # base_model_name_or_path
        AutoModelForCausalLM.from_pretrained(checkpoint / "model"),  # transformers' PEFT integration
    ]
    with torch.no_grad():
        logits = [model.eval()(input_ids=input_ids).logits for model in loaded]
        untrained = init.eval()(input_ids=input_ids).logits
    assert not torch.allclose(logits[0], untrained)  # the adapters did train, and are applied
    for other in logits[1:]:
        torch.testing.assert_close(other, logits[0], rtol=0, atol=0)
    assert weights(checkpoint).keys() == {k for k in weights(checkpoint) if "lora_" in k}  # model/ holds adapters
