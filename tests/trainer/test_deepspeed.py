"""``dpo-fast train`` under DeepSpeed ZeRO-3 and ZeRO-2 on 2 CPU processes (gloo) against 1 process without DeepSpeed.

Both start from the same saved weights (a model folder: ZeRO-3 builds a model partitioned, ``zero.Init``, and a
config ``.json``'s random init comes out otherwise there). The 1-process run takes the 2 processes' global batch
(2 x 4 pairs) by accumulating 2 micro-batches of 4; AdamW with weight decay on the matrices. Each launch:

- says that the DeepSpeed engine ran at its stage over 2 processes, and under ZeRO-3 that every parameter, lm_head's
  weight among them, is partitioned (half of it on each process), under ZeRO-2 that the optimizer state is: a run that
  fell back to DDP fails;
- logs the 1-process run's metrics and saves its weights (``model/`` of each checkpoint) within float32 rounding;
- checkpoints the engine's partitions (``deepspeed/``), from which a killed run resumes (``resume_from_checkpoint:
  auto`` in its output folder) to the uninterrupted run's metrics and weights, bit for bit;
- saves a ``model/`` that ``from_pretrained`` loads.

ZeRO-3 runs the untied head (lm_head.weight is read only by the fused loss, inside the wrapped module's forward:
DeepSpeed must gather it there and again for the backward), ZeRO-2 the tied one and gradient accumulation; KTO runs
under ZeRO-3 with its live reference, a partitioned copy of the policy. The launches use the CPU recipe of
``docs/distributed.md``: no ACCELERATE_USE_CPU, the trainer sets up gloo itself. The unit tests at the end pin the
defects found under ZeRO-3 without a launch.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("accelerate")

from trainer_helpers import TINY_LLAMA, flags, launch, logged, run, run_values, weights, write_tiny_files
from transformers import AutoConfig, AutoModelForCausalLM

# 4 steps of 8 pairs, a checkpoint every 2; the eval's 24 rows make 5 batches of 5, padded across processes
RUN = {"max_steps": 4, "save_steps": 2, "save_total_limit": 0, "per_device_eval_batch_size": 5, "weight_decay": 0.1}
# float32 rounding: the 2 processes sum and reduce in another order than 1 process
METRICS_RTOL, METRICS_ATOL, WEIGHTS_RTOL, WEIGHTS_ATOL = 1e-4, 1e-5, 1e-4, 1e-5
# every DeepSpeed value the run decides is "auto" (the trainer writes the run's keys); the tiny head is partitioned
DEEPSPEED = {
    "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}  # fmt: skip
ZERO3 = {**DEEPSPEED, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny data, and the initial weights of the tied and the untied tiny Llama as model folders."""
    folder = write_tiny_files(tmp_path_factory.mktemp("tiny"))
    for name, tied in (("tied", True), ("untied", False)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**TINY_LLAMA, "tie_word_embeddings": tied}))
        model.save_pretrained(folder / f"init-{name}")
    return folder


def one_process(files, out, model: str, **overrides):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(files, out, model=str(files / f"init-{model}"), gradient_accumulation_steps=2, **{**RUN, **overrides})
    finally:
        torch.set_num_threads(threads)
    return out


def launcher_flags(stage: int, folder) -> list[str]:
    """ZeRO-3 by an accelerate config file naming a DeepSpeed JSON (docs/distributed.md's), ZeRO-2 by accelerate
    launch's flags alone."""
    if stage == 2:
        return ["--use_deepspeed", "--zero_stage", "2"]
    (folder / "ds_zero3.json").write_text(json.dumps(ZERO3))
    config = folder / "zero3.yaml"
    config.write_text(
        "distributed_type: DEEPSPEED\nnum_machines: 1\nnum_processes: 2\n"
        f"deepspeed_config:\n  deepspeed_config_file: {folder / 'ds_zero3.json'}\n  zero3_init_flag: true\n"
    )
    return ["--config_file", str(config)]


def two_processes(stage: int, files, out, model: str, **overrides) -> str:
    """``dpo-fast train`` under ZeRO-``stage`` by ``accelerate launch`` on 2 CPU processes; its standard output."""
    config = out.parent / f"{out.name}.json"
    config.write_text(json.dumps(run_values(files, out, model=str(files / f"init-{model}"), **RUN)))
    command = ["-m", "dpo_fast.trainer.cli", "train", "--config", str(config), *flags(overrides)]
    return launch(2, launcher_flags(stage, out.parent), command, timeout=600).stdout


def assert_same_run(got, expected) -> tuple[float, float]:
    """Metrics and checkpoint weights within float32 rounding; returns the largest relative differences."""
    got_records, expected_records = logged(got), logged(expected)
    assert len(got_records) == len(expected_records) == 5  # 4 steps and the final eval
    worst_metric = 0.0
    for a, b in zip(got_records, expected_records):
        assert a.keys() == b.keys() and ("grad_norm" in a or "loss" not in a)  # DeepSpeed's norm is logged
        assert a == pytest.approx(b, rel=METRICS_RTOL, abs=METRICS_ATOL)
        worst_metric = max([worst_metric] + [abs(a[k] - b[k]) / max(abs(b[k]), METRICS_ATOL / METRICS_RTOL)
                                             for k in b])  # fmt: skip
    worst_weight = 0.0
    for step in (2, 4):
        expected_weights, got_weights = weights(expected / f"checkpoint-{step}"), weights(got / f"checkpoint-{step}")
        assert got_weights.keys() == expected_weights.keys()
        for key, value in expected_weights.items():
            torch.testing.assert_close(got_weights[key], value, rtol=WEIGHTS_RTOL, atol=WEIGHTS_ATOL, msg=key)
            worst_weight = max(worst_weight, ((got_weights[key] - value).norm() / value.norm()).item())
    return worst_metric, worst_weight


def assert_killed_run_resumes_bit_for_bit(stage: int, files, run_dir, model: str, **overrides) -> str:
    """A run killed after checkpoint-2 (its folder: checkpoint-2 and the log of every step) resumes with
    ``resume_from_checkpoint: auto`` to the uninterrupted run's log and checkpoint-4, bit for bit."""
    killed = run_dir.parent / f"{run_dir.name}-killed"
    killed.mkdir()
    shutil.copytree(run_dir / "checkpoint-2", killed / "checkpoint-2")
    shutil.copy(run_dir / "metrics.jsonl", killed / "metrics.jsonl")  # lines past step 2: cut back on resume
    log = two_processes(stage, files, killed, model, resume_from_checkpoint="auto", **overrides)
    assert f"resuming from {killed / 'checkpoint-2'} at step 2" in log
    assert logged(killed) == logged(run_dir)
    expected, got = weights(run_dir / "checkpoint-4"), weights(killed / "checkpoint-4")
    assert expected.keys() == got.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    return log


def assert_loads_with_from_pretrained(checkpoint, tied: bool) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoint / "model")
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    saved = weights(checkpoint)
    for key, value in model.state_dict().items():
        if key in saved:
            torch.testing.assert_close(value, saved[key], rtol=0, atol=0)
    assert {"deepspeed", "scheduler.pt", "rng_state_0.pt", "rng_state_1.pt"} <= {p.name for p in checkpoint.iterdir()}


@pytest.mark.slow
def test_zero3_on_two_processes_partitions_matches_one_resumes_and_loads(files, tmp_path):
    expected = one_process(files, tmp_path / "one", "untied")
    log = two_processes(3, files, tmp_path / "zero3", "untied")
    ran = re.search(r"parallelism: DeepSpeed ZeRO-3 over 2 processes on cpu \(gloo\); (\d+) of (\d+) parameter tensors "
                    r"partitioned \(lm_head.weight: (\d+) of (\d+) elements on this process\)", log)  # fmt: skip
    assert ran is not None, log
    assert ran.group(1) == ran.group(2) == "21"  # every parameter tensor, the untied head among them
    assert int(ran.group(4)) == TINY_LLAMA["vocab_size"] * TINY_LLAMA["hidden_size"] == 2 * int(ran.group(3))
    metrics, weights_error = assert_same_run(tmp_path / "zero3", expected)
    print(f"ZeRO-3 vs 1 process: metrics within {metrics:.1e}, weights within {weights_error:.1e} (by norm)")
    assert_killed_run_resumes_bit_for_bit(3, files, tmp_path / "zero3", "untied")
    assert_loads_with_from_pretrained(tmp_path / "zero3" / "checkpoint-4", tied=False)


@pytest.mark.slow
def test_zero2_with_accumulation_on_two_processes_matches_one_resumes_and_loads(files, tmp_path):
    """ZeRO-2 accumulating 2 micro-batches of 2 pairs per process: the same 8 pairs per step as the 1-process run's
    2 micro-batches of 4 (the data order is a permutation of rows), the engine stepping at the second."""
    expected = one_process(files, tmp_path / "one", "tied")
    accumulation = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
    log = two_processes(2, files, tmp_path / "zero2", "tied", **accumulation)
    ran = re.search(r"parallelism: DeepSpeed ZeRO-2 over 2 processes on cpu \(gloo\); optimizer state partitioned "
                    r"\((\d+) of (\d+) trainable elements on this process\)", log)  # fmt: skip
    assert ran is not None, log
    held, total = int(ran.group(1)), int(ran.group(2))
    assert total // 2 <= held < total  # this process's half (ZeRO-2 keeps the weights whole on each)
    metrics, weights_error = assert_same_run(tmp_path / "zero2", expected)
    print(f"ZeRO-2 vs 1 process: metrics within {metrics:.1e}, weights within {weights_error:.1e} (by norm)")
    assert_killed_run_resumes_bit_for_bit(2, files, tmp_path / "zero2", "tied", **accumulation)
    assert_loads_with_from_pretrained(tmp_path / "zero2" / "checkpoint-4", tied=True)


@pytest.mark.slow
def test_zero3_kto_with_its_live_reference_matches_one_process(files, tmp_path):
    """KTO's live reference (``reference: model``) under ZeRO-3: a second model built partitioned as the policy was,
    each process's partitions copied from the policy's, run by its own engine; its KL estimate, metrics and weights
    match 1 process's (no eval: the eval KL is each eval step's mean over the processes' micro-batches, clamped at
    0, so it depends on the process count, as TRL's does)."""
    kto = {"objective": "kto", "reference": "model", "max_steps": 2, "save_steps": 0, "eval_dataset": None}
    expected = one_process(files, tmp_path / "one", "untied", **kto)
    log = two_processes(3, files, tmp_path / "zero3-kto", "untied", **kto)
    assert "parallelism: DeepSpeed ZeRO-3 over 2 processes on cpu (gloo); 21 of 21 parameter tensors partitioned" in log
    got, want = logged(tmp_path / "zero3-kto"), logged(expected)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2]
    assert got[0]["kl"] == 0 and abs(got[0]["rewards/chosen"]) < 1e-5  # the reference is the policy at step 1
    for a, b in zip(got, want):
        assert a == pytest.approx(b, rel=METRICS_RTOL, abs=METRICS_ATOL)
    final, reference_weights = weights(tmp_path / "zero3-kto" / "checkpoint-2"), weights(expected / "checkpoint-2")
    for key, value in reference_weights.items():
        torch.testing.assert_close(final[key], value, rtol=WEIGHTS_RTOL, atol=WEIGHTS_ATOL, msg=key)


# ------------------------------------------------------------------------------------ the defects, without a launch


def test_the_step_output_shows_deepspeed_its_loss(files):
    """ZeRO-3 hooks the tensors a module returns to gather its parameters again before their backward: it finds them
    in tensors, tuples, lists and dicts only (a plain dataclass hid the loss, and backward failed in AccumulateGrad)."""
    from deepspeed.runtime.zero.utils import apply_to_tensors_only
    from trainer_helpers import TOKENIZER
    from transformers import AutoTokenizer

    from dpo_fast.trainer import TrainConfig, data
    from dpo_fast.trainer.model import DPOModel

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    rows = data.tokenize(data.load_rows(str(files / "train.jsonl"), "train", "dataset"), tokenizer, 32, 16, "t")
    batch = data.collate(rows[:2], False, tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = DPOModel(AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA)),
                     TrainConfig(model="m", dataset="d"))  # fmt: skip
    out = model(**batch, ref_logps=torch.zeros(4))
    seen = []
    apply_to_tensors_only(lambda tensor: seen.append(tensor) or tensor, out)
    assert any(tensor is out.loss for tensor in seen) and out.loss.requires_grad
    assert len(seen) == 3  # the loss and the two sums of metrics: nothing hidden from DeepSpeed


def test_weight_decay_groups_read_zero3_placeholders_by_their_full_shape():
    """ZeRO-3 replaces each parameter with a 1-D placeholder (its shape in ``ds_shape``): the matrices still get weight
    decay, and no group is empty (DeepSpeed's optimizer would have fewer groups than the schedule)."""
    from dpo_fast.trainer.loop import _param_groups

    model = torch.nn.Linear(4, 3)
    for param in model.parameters():
        param.ds_shape = param.shape
        param.data = torch.empty(0)
    groups = _param_groups(model, weight_decay=0.1)
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(1, 0.1), (1, 0.0)]
    assert groups[0]["params"][0] is model.weight
    model.bias.requires_grad_(False)
    assert [(len(g["params"]), g["weight_decay"]) for g in _param_groups(model, 0.1)] == [(1, 0.1)]


def test_deepspeed_on_cpu_processes_refuses_accelerate_use_cpu(monkeypatch):
    """ACCELERATE_USE_CPU=1 turns DeepSpeed off in accelerate (the run would be plain DDP): refused, in one line."""
    from accelerate.state import PartialState

    from dpo_fast.trainer import parallel

    monkeypatch.setattr(PartialState, "_shared_state", {})
    for key, value in {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_USE_CPU": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(parallel, "has_accelerator", lambda: False)
    with pytest.raises(ValueError, match="ACCELERATE_USE_CPU=1 turns DeepSpeed off"):
        parallel.setup_cpu_processes()
