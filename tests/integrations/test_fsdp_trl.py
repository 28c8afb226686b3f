"""``FastDPOTrainer`` under accelerate's FSDP2 on 2 CPU processes (gloo) against 1 process, same global batch.

The 2 processes run this file as a script (``accelerate launch --use_fsdp --fsdp_version 2``), each
with 2 pairs per step; the 1 process runs in the test with 4. accelerate takes FSDP only on
accelerators, so the script first switches its CPU state to FSDP2
(``dpo_fast.trainer.parallel.make_accelerator``) and has the Trainer use that state
(``accelerator_config={"use_configured_state": True}``); from there the Trainer's accelerator shards
with accelerate's own ``fully_shard`` wrapping, as on GPUs. The script checks that the parameters are
DTensors and writes its log history and full final weights; the test compares them with the 1-process
run's within float32 tolerance (SGD, whose update is linear in the gradient: Adam's normalisation turns a
summation-order difference in a near-zero gradient entry into a full-size step). No GPU here: multi-GPU runs are not tested.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("accelerate")

from datasets import Dataset
from trainer_helpers import TINY_LLAMA, TOKENIZER, launch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig

from dpo_fast.integrations.trl import FastDPOTrainer

STEPS = 3
PAIRS = 4  # the global batch: 4 pairs per step
COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
            "grad_norm")  # fmt: skip


def preference_rows() -> Dataset:
    rows = [json.loads(line) for line in (Path(TOKENIZER).parent / "train.jsonl").read_text().splitlines()[:24]]
    return Dataset.from_list(rows)


def train(per_device_pairs: int, output_dir: Path, **options) -> tuple[list[dict], dict[str, torch.Tensor], str]:
    """FastDPOTrainer from the seed-0 tiny Llama, a frozen copy as reference; its log history, full final
    weights and parallelism. ``options`` go to ``DPOConfig``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA))
    args = DPOConfig(
        output_dir=str(output_dir), per_device_train_batch_size=per_device_pairs, max_steps=STEPS, learning_rate=0.1,
        optim="sgd",
        logging_steps=1, beta=0.5, max_length=32, bf16=False, report_to=[], seed=0, save_strategy="no",
        disable_tqdm=True, lr_scheduler_type="constant", **options,
    )  # fmt: skip
    trainer = FastDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=preference_rows(),
                             processing_class=AutoTokenizer.from_pretrained(TOKENIZER))  # fmt: skip
    trainer.train()
    prepared = trainer.model_wrapped
    sharded = sum(isinstance(p, DTensor) for p in prepared.parameters())
    parallelism = f"{trainer.accelerator.distributed_type.value}: {sharded} of {len(list(prepared.parameters()))}"
    state = get_model_state_dict(prepared, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    history = [{key: log[key] for key in COMPARED} for log in trainer.state.log_history if "loss" in log]
    return history, {key: value.clone() for key, value in state.items()}, parallelism


@pytest.mark.slow
def test_fast_dpo_trainer_under_fsdp2_on_two_processes_matches_one(tmp_path):
    from accelerate.state import AcceleratorState

    fsdp = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP"]
    launch(2, fsdp, [__file__, str(tmp_path / "two")])
    two = torch.load(tmp_path / "two" / "result.pt", weights_only=True)
    assert two["parallelism"] == "FSDP: 20 of 20"  # every parameter a DTensor; the head stays tied

    torch.set_num_threads(1)
    try:
        history, weights, parallelism = train(PAIRS, tmp_path / "one")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert parallelism == "NO: 0 of 20"
    assert len(two["history"]) == len(history) == STEPS
    for got, expected in zip(two["history"], history):
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert two["weights"].keys() == weights.keys()
    for key, value in weights.items():
        torch.testing.assert_close(two["weights"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert history[-1]["loss"] != history[0]["loss"]  # it trained


if __name__ == "__main__":  # one of the processes of accelerate launch --use_fsdp
    from dpo_fast.trainer.parallel import make_accelerator

    out = Path(sys.argv[1])
    accelerator = make_accelerator()  # the CPU state becomes FSDP2 before the Trainer makes its accelerator
    # transformers' TrainingArguments resets the accelerate state unless told to use the configured one
    configured = {"accelerator_config": {"use_configured_state": True}}
    history, weights, parallelism = train(PAIRS // accelerator.num_processes, out, **configured)
    if accelerator.is_main_process:
        torch.save({"history": history, "weights": weights, "parallelism": parallelism}, out / "result.pt")
