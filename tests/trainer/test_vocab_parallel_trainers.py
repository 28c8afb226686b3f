"""The trainers with the LM head split over the vocabulary on 2 CPU processes (gloo) against 1 process (issue 28).

- ``dpo-fast train`` with ``tensor_parallel: 2``: both processes run the whole (tiny, tied) Llama on the same
  batches, the head (and the tied embedding) a ``Shard(0)`` DTensor of 20 of its 40 rows on each; the run's logged
  metrics and its checkpoints' full weights equal a 1-process run's with the same batch size, and a checkpoint saved
  so resumes so.
- ``dpo-fast train`` on 4 processes with ``tensor_parallel: 2``: 2 data-parallel replicas of the split head, each
  accumulating 2 micro-batches, against 1 process taking all 4 by gradient accumulation; and resumed.
- ``dpo-fast train`` with ``tensor_parallel: 2`` and the options that take other paths to the loss (LoRA, activation
  checkpointing, padding-free rows, a live reference model, prefix sharing, KTO, ORPO, bf16) against 1 process.
- ``FastDPOTrainer`` on a model loaded with transformers' ``from_pretrained(..., tp_plan="auto")`` (the whole model
  tensor-parallel, the head ``colwise_gather_output``: a ``Shard(0)`` DTensor the drop-in keeps sharded): the log
  history and the final full weights equal a 1-process run's (SGD, as tests/integrations/test_fsdp_trl.py). The Trainer hands
  accelerate a ``ParallelismConfig(tp_size=2)``, which accelerate 1.15/1.16 accept on accelerators only (its
  ``multi_device`` leaves out ``MULTI_CPU``); the script treats CPU processes as accelerate treats GPUs
  (``_accept_parallelism_config_on_cpu``), the one departure from the GPU route. No GPU here: NCCL has not run.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("accelerate")

from trainer_helpers import TINY_LLAMA, TOKENIZER, flags, launch, logged, run, run_values, weights, write_tiny_files

pytestmark = pytest.mark.slow

RUN = {"max_steps": 4, "save_steps": 2, "save_total_limit": 0, "per_device_eval_batch_size": 5}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_files(tmp_path_factory.mktemp("tiny"))


def _train_tp(files, out: Path, processes: int = 2, options: dict = RUN, **overrides) -> str:
    """``dpo-fast train`` with ``tensor_parallel: 2`` on ``processes`` launched processes (``options`` in its config
    file, ``overrides`` as flags); what it printed."""
    config = out.parent / f"{out.name}.json"
    config.write_text(json.dumps(run_values(files, out, tensor_parallel=2, **options)))
    command = ["-m", "dpo_fast.trainer.cli", "train", "--config", str(config), *flags(overrides)]
    return launch(processes, ["--multi_gpu"], command).stdout


def _train_one(files, out: Path, **options) -> None:
    """The same run in this process on 1 thread, with a reference of its own (``<out>-cache``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(files, out, reference_cache_dir=str(out.parent / f"{out.name}-cache"), **options)
    finally:
        torch.set_num_threads(threads)


def _assert_same(got: list[dict], expected: list[dict], rel=1e-4, abs=1e-5) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a == pytest.approx(b, rel=rel, abs=abs)


def _assert_same_weights(got_run: Path, expected_run: Path, steps, rtol=1e-4, atol=1e-5) -> None:
    """The full weights saved at each of ``steps`` (``checkpoint-<step>/model``) by two runs."""
    for step in steps:
        got, want = weights(got_run / f"checkpoint-{step}"), weights(expected_run / f"checkpoint-{step}")
        assert got.keys() == want.keys()
        for key in want:  # the full (gathered) head, saved once (tied)
            torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=atol, msg=key)


def _assert_resumed(resumed: Path, uninterrupted: Path) -> None:
    """A run resumed from ``uninterrupted``'s step-2 checkpoint: the same steps 3 and 4, the same step-4 weights."""
    steps = [r for r in logged(resumed) if "loss" in r]
    _assert_same(steps, [r for r in logged(uninterrupted) if "loss" in r][2:], rel=1e-5, abs=1e-6)
    _assert_same_weights(resumed, uninterrupted, (4,), rtol=1e-5, atol=1e-7)


def test_dpo_fast_train_with_the_head_split_over_two_processes_matches_one(files, tmp_path):
    log = _train_tp(files, tmp_path / "tp")
    rows = math.ceil(TINY_LLAMA["vocab_size"] / 2)
    line = re.search(r"parallelism: tensor parallel over 2 processes on cpu \(gloo\): lm_head.weight split over the "
                     r"vocabulary, (\d+) of (\d+) rows on this process \(at most (\d+)\) \(the tied input embedding "
                     r"with it\)", log)  # fmt: skip
    assert line is not None, log
    assert line.groups() == (str(rows), str(TINY_LLAMA["vocab_size"]), str(rows))

    _train_one(files, tmp_path / "one", **RUN)
    _assert_same(logged(tmp_path / "tp"), logged(tmp_path / "one"))
    _assert_same_weights(tmp_path / "tp", tmp_path / "one", (2, 4))

    # the checkpoint loads with from_pretrained: the whole head, tied
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tp" / "checkpoint-4" / "model")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tuple(model.get_output_embeddings().weight.shape) == (TINY_LLAMA["vocab_size"], TINY_LLAMA["hidden_size"])

    # a checkpoint saved with the head sharded resumes with it sharded: the same steps 3 and 4
    _train_tp(files, tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "tp" / "checkpoint-2"))
    _assert_resumed(tmp_path / "resumed", tmp_path / "tp")


def test_two_replicas_of_a_head_split_over_two_processes_match_one_process(files, tmp_path):
    """4 processes, ``tensor_parallel: 2``: 2 data-parallel replicas of 2 processes, each accumulating 2 micro-batches
    of its own per step, the gradients averaged over the replicas: a step is what one process makes of the same 4
    micro-batches with ``gradient_accumulation_steps: 4`` (metrics, eval and the checkpoints' full weights); a
    checkpoint saved so resumes so."""
    shape = {**RUN, "per_device_train_batch_size": 2}
    replicas = {**shape, "gradient_accumulation_steps": 2}
    log = _train_tp(files, tmp_path / "dp-tp", processes=4, options=replicas)
    rows = math.ceil(TINY_LLAMA["vocab_size"] / 2)
    assert log.count(f"lm_head.weight split over the vocabulary, {rows} of {TINY_LLAMA['vocab_size']} rows") == 1, log
    assert "; 2 data-parallel replicas of 2 processes, the backbone replicated, gradients averaged" in log, log

    _train_one(files, tmp_path / "one", **shape, gradient_accumulation_steps=4)
    got = logged(tmp_path / "dp-tp")
    assert [r for r in got if "eval_loss" in r] and [r for r in got if "grad_norm" in r]
    _assert_same(got, logged(tmp_path / "one"))
    _assert_same_weights(tmp_path / "dp-tp", tmp_path / "one", (2, 4))

    resume = {"resume_from_checkpoint": str(tmp_path / "dp-tp" / "checkpoint-2")}
    _train_tp(files, tmp_path / "resumed", processes=4, options=replicas, **resume)
    _assert_resumed(tmp_path / "resumed", tmp_path / "dp-tp")


OPTION_SETS = {
    "lora-checkpointing-padding-free": {"lora_r": 4, "gradient_checkpointing": True, "padding_free": True},
    "reference-model-prefix-sharing": {"reference": "model", "prefix_sharing": True},
    "kto": {"objective": "kto"},
    "orpo-bf16": {"objective": "orpo", "bf16": True},
}


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_the_trainers_options_with_the_head_split_match_one_process(files, tmp_path, name):
    """The options that take other paths to the loss (LoRA's wrapped model, activation checkpointing, padding-free
    rows, a live reference model, prefix sharing, KTO's unpaired rows and KL estimate, ORPO, bf16 autocast) with
    ``tensor_parallel: 2`` on 2 processes: every logged metric as 1 process's (bf16: within its rounding)."""
    options = {"max_steps": 3, "save_steps": 0, **OPTION_SETS[name]}
    _train_tp(files, tmp_path / "tp", options=options)
    _train_one(files, tmp_path / "one", **options)
    got, expected = logged(tmp_path / "tp"), logged(tmp_path / "one")
    assert len([r for r in got if "loss" in r]) == 3
    if options.get("bf16"):
        _assert_same(got, expected, rel=1e-2, abs=1e-3)
    else:
        _assert_same(got, expected)


def test_gradients_are_averaged_over_the_replicas_in_buckets(monkeypatch):
    """``average_gradients`` with 2 replicas whose other replica holds 3x each gradient: (g + 3g) / 2 = 2g in every
    gradient, bucketed by dtype and at most about ``BUCKET_NUMEL`` elements per all-reduce; parameters without a gradient
    left alone (DTensor gradients, averaged by their local rows, are the 4-process test's)."""
    from types import SimpleNamespace

    from dpo_fast.trainer import tensor_parallel

    calls = []

    def all_reduce(flat, group=None):  # the other replica's gradients are 3x this one's
        calls.append((flat.dtype, flat.numel(), group))
        flat.mul_(4)

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    monkeypatch.setattr(tensor_parallel, "BUCKET_NUMEL", 10)
    tp = tensor_parallel.TensorParallel.__new__(tensor_parallel.TensorParallel)
    tp.replicas = SimpleNamespace(size=lambda: 2, get_group=lambda: "replicas")
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
              for shape, dtype in [((2, 3), torch.float32), ((4,), torch.float32), ((3,), torch.float64),
                                   ((5,), torch.float32), ((2,), torch.float32)]]  # fmt: skip
    grads = [torch.randn(p.shape, dtype=p.dtype) for p in params]
    for param, grad in zip(params, grads):
        param.grad = grad.clone()
    frozen = torch.nn.Parameter(torch.ones(3))
    tp.average_gradients([*params, frozen])
    for param, grad in zip(params, grads):
        torch.testing.assert_close(param.grad, 2 * grad)
    assert frozen.grad is None
    # float32: 6 + 4 reach 10 (one all-reduce), then 5 + 2 left for the end; float64 alone
    assert sorted(calls, key=str) == sorted([(torch.float32, 10, "replicas"), (torch.float32, 7, "replicas"),
                                             (torch.float64, 3, "replicas")], key=str)  # fmt: skip
    assert calls[0] == (torch.float32, 10, "replicas")


def test_tensor_parallel_that_does_not_divide_the_process_count_is_refused(files, tmp_path):
    from types import SimpleNamespace

    from dpo_fast.trainer import TrainConfig, train
    from dpo_fast.trainer.tensor_parallel import TensorParallel

    with pytest.raises(ValueError, match="tensor_parallel=2 but the run has 1 processes"):
        train(TrainConfig(**run_values(files, tmp_path / "run", tensor_parallel=2)))
    three = SimpleNamespace(num_processes=3)  # refused before the accelerator is asked anything else
    with pytest.raises(ValueError, match="tensor_parallel=2 but the run has 3 processes.*launch a multiple of 2"):
        TensorParallel.setup(SimpleNamespace(tensor_parallel=2), three)


# ---- FastDPOTrainer on transformers' tensor-parallel model

STEPS, PAIRS = 3, 4
COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
            "grad_norm", "entropy", "mean_token_accuracy")  # fmt: skip


def _save_model(path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA)).save_pretrained(path)


def _fast_dpo(model_path: Path, output_dir: Path, load: dict | None = None,
              **options) -> tuple[list[dict], dict[str, torch.Tensor], dict]:  # fmt: skip
    """FastDPOTrainer (SGD) from the saved model (``from_pretrained(**load)``), a second copy as reference; its log,
    full final weights, and what its head was. ``options`` go to ``DPOConfig``."""
    load = load or {}
    from datasets import Dataset
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig

    from dpo_fast.integrations.trl import FastDPOTrainer

    rows = [json.loads(line) for line in (Path(TOKENIZER).parent / "train.jsonl").read_text().splitlines()[:24]]
    model = AutoModelForCausalLM.from_pretrained(model_path, **load)
    reference = AutoModelForCausalLM.from_pretrained(model_path, **load)
    args = DPOConfig(
        output_dir=str(output_dir), per_device_train_batch_size=PAIRS, max_steps=STEPS, learning_rate=0.1,
        optim="sgd", logging_steps=1, beta=0.5, max_length=32, bf16=False, report_to=[], seed=0, save_strategy="no",
        disable_tqdm=True, lr_scheduler_type="constant", **options,
    )  # fmt: skip
    trainer = FastDPOTrainer(model=model, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=AutoTokenizer.from_pretrained(TOKENIZER))  # fmt: skip
    with _count_sharded_passes() as passes:
        trainer.train()
    head = trainer.accelerator.unwrap_model(trainer.model_wrapped).get_output_embeddings().weight
    about = {"head": type(head).__name__, "rows": tuple(head.to_local().shape) if isinstance(head, DTensor) else None,
             "placements": str(getattr(head, "placements", None)), "sharded_passes": passes}  # fmt: skip
    full = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in trainer.model.named_parameters()}  # fmt: skip
    history = [{key: log[key] for key in COMPARED} for log in trainer.state.log_history if "loss" in log]
    return history, full, about


def test_fast_dpo_trainer_on_a_tensor_parallel_model_matches_one_process(tmp_path):
    from accelerate.state import AcceleratorState

    _save_model(tmp_path / "model")
    launch(2, ["--multi_gpu"], [__file__, str(tmp_path / "model"), str(tmp_path / "two")])
    two = torch.load(tmp_path / "two" / "result.pt", weights_only=True)
    rows = math.ceil(TINY_LLAMA["vocab_size"] / 2)
    # the drop-in ran every fused pass (policy and reference, forward and backward) on the rank's 20 rows
    passes = two["about"].pop("sharded_passes")
    assert passes["passes"] >= 2 * STEPS and passes["rows"] == rows, passes
    assert two["about"] == {"head": "DTensor", "rows": (rows, TINY_LLAMA["hidden_size"]),
                            "placements": "(Shard(dim=0),)"}  # fmt: skip

    torch.set_num_threads(1)
    try:
        history, full, about = _fast_dpo(tmp_path / "model", tmp_path / "one")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert about["head"] == "Parameter" and about["sharded_passes"]["passes"] == 0
    _assert_same(two["history"], history)
    assert two["weights"].keys() == full.keys()
    for key, value in full.items():
        torch.testing.assert_close(two["weights"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert history[-1]["loss"] != history[0]["loss"]  # it trained


@contextlib.contextmanager
def _count_sharded_passes():
    """Yields {"passes": n, "rows": r}: the fused passes run on this rank's rows of the head (``ShardedBackend``s
    made) while the block runs, and the most rows one held."""
    from dpo_fast import vocab_parallel

    counts = {"passes": 0, "rows": 0}
    init = vocab_parallel.ShardedBackend.__init__

    def counting_init(self, backend, shard):
        counts["passes"] += 1
        counts["rows"] = max(counts["rows"], shard.rows)
        init(self, backend, shard)

    vocab_parallel.ShardedBackend.__init__ = counting_init
    try:
        yield counts
    finally:
        vocab_parallel.ShardedBackend.__init__ = init


def _accept_parallelism_config_on_cpu() -> None:
    """accelerate (1.15, 1.16) refuses a ``ParallelismConfig`` unless its state is FSDP2, DeepSpeed or one of its
    ``multi_device`` types, which name every accelerator but not ``MULTI_CPU``. Counting CPU processes among them
    lets the Trainer of a tensor-parallel model run on gloo as it runs on GPUs (no DDP wrapper; the tensor-parallel
    ranks take the same batches)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    multi_device = Accelerator.multi_device.fget
    Accelerator.multi_device = property(
        lambda self: multi_device(self) or (self.use_distributed and self.distributed_type == DistributedType.MULTI_CPU)
    )


if __name__ == "__main__":  # one of the 2 processes of accelerate launch
    import torch.distributed as dist

    from dpo_fast.trainer.parallel import setup_cpu_processes

    setup_cpu_processes()  # gloo over the launched processes (docs/distributed.md), before transformers' own setup
    _accept_parallelism_config_on_cpu()
    model_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    configured = {"accelerator_config": {"use_configured_state": True}}
    history, full, about = _fast_dpo(model_path, out, {"tp_plan": "auto"}, **configured)
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({"history": history, "weights": full, "about": about}, out / "result.pt")
