"""``dpo-fast train`` on 2 CPU processes (gloo) against 1 process with the same global batch: DDP, and FSDP2.

FSDP2 runs for real: accelerate's ``fully_shard`` on the decoder layers and the model (the run's
log says so and counts the DTensor parameters), a checkpoint saved under FSDP resumes under FSDP and
loads with ``from_pretrained``, and a ``reference: model`` copy works under FSDP. The 1-process run takes the 2 processes' global batch (2 x 4 pairs) by
accumulating 2 micro-batches of 4. No GPU here: multi-GPU runs are not tested.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from trainer_helpers import flags, launch, logged, run, run_values, train_records, weights, write_tiny_files
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow

# 4 steps of 8 pairs, a checkpoint every 2; the eval's 24 rows make 5 batches of 5, padded across processes
RUN = {"max_steps": 4, "save_steps": 2, "save_total_limit": 0, "per_device_eval_batch_size": 5}
FSDP2 = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_files(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def one_process(files, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("one") / "run"
    try:
        run(files, out, gradient_accumulation_steps=2, **RUN)
    finally:
        torch.set_num_threads(threads)
    return out


def two_processes(files, out, launcher_flags, **overrides) -> str:
    """``dpo-fast train --config <the 1-process run's keys> --KEY VALUE ...`` by ``accelerate launch`` on 2 CPU
    processes; returns its standard output."""
    config = out.parent / f"{out.name}.json"
    config.write_text(json.dumps(run_values(files, out, **RUN)))
    command = ["-m", "dpo_fast.trainer.cli", "train", "--config", str(config), *flags(overrides)]
    return launch(2, launcher_flags, command).stdout


def assert_same_run(got, expected):
    got_records, expected_records = logged(got), logged(expected)
    assert len(got_records) == len(expected_records) == 5  # 4 steps and the final eval
    for a, b in zip(got_records, expected_records):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    for step in (2, 4):
        expected_weights, got_weights = weights(expected / f"checkpoint-{step}"), weights(got / f"checkpoint-{step}")
        assert got_weights.keys() == expected_weights.keys()
        for key in expected_weights:
            torch.testing.assert_close(got_weights[key], expected_weights[key], rtol=1e-4, atol=1e-5)


def test_ddp_on_two_processes_matches_one(files, one_process, tmp_path):
    log = two_processes(files, tmp_path / "ddp", ["--multi_gpu"])
    assert "parallelism: DDP (data parallel, every process holds the whole model) over 2 processes on cpu (gloo)" in log
    assert_same_run(tmp_path / "ddp", one_process)


def test_fsdp2_on_two_processes_shards_matches_one_resumes_and_loads(files, one_process, tmp_path):
    log = two_processes(files, tmp_path / "fsdp", FSDP2)
    sharded = re.search(
        r"parallelism: FSDP2 \(fully_shard\) over 2 processes on cpu \(gloo\); (\d+) of (\d+) param", log
    )
    assert sharded is not None, log
    assert sharded.group(1) == sharded.group(2) == "20"  # every parameter tensor is a DTensor; the head stays tied
    assert_same_run(tmp_path / "fsdp", one_process)

    # a checkpoint saved under FSDP resumes under FSDP: the same steps 3-4 and final weights; the resumed run
    # takes its reference from a live frozen copy (an FSDP module cannot be deep-copied: the copy is made before
    # sharding), equal to the precomputed one to rounding
    resumed = tmp_path / "resumed"
    log = two_processes(files, resumed, FSDP2, resume_from_checkpoint=str(tmp_path / "fsdp" / "checkpoint-2"),
                        reference="model")  # fmt: skip
    assert "resuming from" in log and "FSDP2" in log
    for a, b in zip(train_records(logged(resumed)), train_records(logged(tmp_path / "fsdp"))[2:], strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    expected, got = weights(tmp_path / "fsdp" / "checkpoint-4"), weights(resumed / "checkpoint-4")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-7)

    # and loads with from_pretrained: the full (unsharded) weights, tied head included
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp" / "checkpoint-4" / "model")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    for key, value in weights(one_process / "checkpoint-4").items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-4, atol=1e-5)


def test_kto_runs_under_ddp_with_its_kl_estimate_reduced_over_the_processes(files, tmp_path):
    """KTO's KL estimate is a collective (TRL's gather and mean) in every train and eval micro-batch: the run, its eval
    (whose batches are padded across processes) and its checkpoints complete, with a KL estimate that leaves 0."""
    two_processes(files, tmp_path / "kto", ["--multi_gpu"], objective="kto", reference="model", learning_rate=3e-2,
                  desirable_weight=4.0)  # fmt: skip
    records = logged(tmp_path / "kto")
    steps = train_records(records)
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and "eval_kl" in records[-1]
    assert steps[0]["kl"] == 0 and any(r["kl"] > 0 for r in steps[1:])
    assert all(math.isfinite(value) for record in records for value in record.values())
