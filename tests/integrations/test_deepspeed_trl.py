"""``FastDPOTrainer`` and ``FastKTOTrainer`` under DeepSpeed ZeRO-3 on 2 CPU processes (gloo), against TRL's own
``DPOTrainer`` and ``KTOTrainer`` under the same launch.

One ``accelerate launch --config_file <zero3.yaml>`` runs this file as a script on 2 CPU processes; each process
sets up accelerate's state over gloo first (``dpo_fast.trainer.parallel.setup_cpu_processes``, the recipe of
``docs/distributed.md``) and the trainers use it (``accelerator_config={"use_configured_state": True}``). The
DeepSpeed config partitions every parameter, the tiny lm_head too (``stage3_param_persistence_threshold: 0``). The
script trains each case with the stock trainer and with the drop-in from the same weights and data (plain SGD,
whose update is linear in the gradient), and saves the log histories, the consolidated final weights, what ran
(the DeepSpeed engine, its stage, the lm_head's partition) and how many fused-loss chunks each process ran:

- ``dpo-uneven``: DPO on data whose micro-batches alternate very short and very long completions, in order
  (``train_sampling_strategy="sequential"``), so that process 0 always gets the short ones and process 1 the long
  ones; dpo_fast's chunk budget is cut to one token per chunk, so the two processes run very different numbers of
  chunks (printed). A collective inside the fused loss would hang or drift; none does.
- ``dpo-tied``: DPO with a tied lm_head (the embedding), the default data.
- ``kto``: KTO with its KL estimate (a collective of every micro-batch).

The test compares every logged metric (TRL's floors for rewards and the KL, ``test_trl.assert_logs_match``) and
each parameter's change over the run, by norm, between the two trainers.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("deepspeed")

from trainer_helpers import launch

pytestmark = pytest.mark.slow

STEPS = 3
PAIRS = 2  # per process and step
# the largest relative difference allowed between the drop-in and TRL: logged metrics (test_trl's tolerance), and
# each parameter's change over the run by norm (float32 weights resolve a change of 1e-3 only to about 1e-4 of it)
TOLERANCE, UPDATE_TOLERANCE = 1e-4, 1e-3
DEEPSPEED_CONFIG = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                          "stage3_gather_16bit_weights_on_model_save": True},
    "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}  # fmt: skip


def accelerate_config(folder: Path) -> Path:
    """The accelerate config file of ``docs/distributed.md`` (ZeRO-3 from a DeepSpeed JSON), written to ``folder``."""
    (folder / "ds_zero3.json").write_text(json.dumps(DEEPSPEED_CONFIG, indent=2))
    path = folder / "zero3.yaml"
    path.write_text(
        "distributed_type: DEEPSPEED\nnum_machines: 1\nnum_processes: 2\n"
        f"deepspeed_config:\n  deepspeed_config_file: {folder / 'ds_zero3.json'}\n  zero3_init_flag: true\n"
    )
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("zero3-trl")
    done = launch(2, ["--config_file", str(accelerate_config(folder))], [__file__, str(folder)], timeout=600)
    print(done.stdout[-2000:])
    return torch.load(folder / "results.pt", weights_only=True)


def check_ran_under_zero3(result: dict) -> None:
    """The DeepSpeed engine trained at stage 3, over 2 processes, with the lm_head's weight partitioned between them."""
    assert result["engine"] == "DeepSpeedEngine" and result["zero_stage"] == 3 and result["processes"] == 2
    held, total = result["lm_head_partition"]
    assert total > 0 and held == math.ceil(total / 2), result["lm_head_partition"]  # this process's half
    assert result["lm_head_numel_outside_forward"] == 0  # partitioned: the local tensor is an empty placeholder


def compare(case: dict, beta: float) -> tuple[float, float]:
    """The largest relative differences of the logged metrics and of the parameters' changes (fast vs stock)."""
    from test_trl import assert_logs_match

    fast, stock = case["fast"], case["stock"]
    for result in (fast, stock):
        check_ran_under_zero3(result)
    assert len(stock["history"]) == STEPS
    logs = assert_logs_match(fast["history"], stock["history"], beta, tolerance=TOLERANCE)
    initial = case["initial"]
    assert fast["weights"].keys() == stock["weights"].keys() == initial.keys()
    updates = 0.0
    for name, start in initial.items():
        expected, got = (
            stock["weights"][name].double() - start.double(),
            fast["weights"][name].double() - start.double(),
        )
        if expected.norm() == 0:
            continue
        error = ((got - expected).norm() / expected.norm()).item()
        assert error <= UPDATE_TOLERANCE, f"{name}: its change differs by {error:.2e} relative"
        updates = max(updates, error)
    assert stock["history"][-1]["loss"] != stock["history"][0]["loss"]  # it trained
    return logs, updates


def test_fast_dpo_trainer_under_zero3_matches_trl_with_very_different_completion_lengths_on_the_ranks(results):
    case = results["dpo-uneven"]
    chunks = case["fast"]["chunks"]  # fused-loss chunks (one token each) per process, over the run
    assert chunks[1] >= 8 * chunks[0] > 0, chunks
    logs, updates = compare(case, beta=0.5)
    print(
        f"dpo-uneven (chunks per process {chunks}): metrics within {logs:.1e}, parameter changes within {updates:.1e}"
    )


def test_fast_dpo_trainer_under_zero3_matches_trl_with_a_tied_head(results):
    logs, updates = compare(results["dpo-tied"], beta=0.5)
    print(f"dpo-tied: metrics within {logs:.1e}, parameter changes within {updates:.1e}")


def test_fast_kto_trainer_under_zero3_matches_trl(results):
    case = results["kto"]
    logs, updates = compare(case, beta=0.1)
    assert any(log.get("kl", 0) > 0 for log in case["stock"]["history"])  # the KL estimate is on
    print(f"kto: metrics within {logs:.1e}, parameter changes within {updates:.1e}")


# ------------------------------------------------------------------------------------------ the launched processes


def uneven_preference_rows(batches: int) -> list[dict]:
    """Micro-batches of PAIRS rows in order, alternately with 1-3 and 40-48 character completions."""
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in range(batches):
        for _ in range(PAIRS):
            a, b = torch.randint(0, 60, (2,), generator=gen).tolist()
            pad = 0 if batch % 2 == 0 else 40 + int(torch.randint(0, 8, (1,), generator=gen))
            rows.append({"prompt": f"<s>what is {a}+{b}? ", "chosen": f"{a + b}" + "." * pad,
                         "rejected": f"{a + b + 1}" + "," * pad})  # fmt: skip
    return rows


def count_chunks() -> list[int]:
    """Cut dpo_fast's chunk budget to one token per chunk and count the chunks its backends run (a one-item list)."""
    from dpo_fast import backends, chunking

    chunking.DEFAULT_SCRATCH_MIB["cpu"] = 1e-9  # budget 0 bytes: one row per chunk
    counter = [0]
    for name in ("torch", "cpp"):
        module = backends.get(name)
        original = module.logits_stats

        def counted(*args, original=original, **kwargs):
            counter[0] += 1
            return original(*args, **kwargs)

        module.logits_stats = counted
    return counter


def run(trainer_class, config_class, model, data, output_dir: Path, chunks: list[int] | None = None, **options):
    """Train a copy of ``model`` (a frozen copy as reference) with SGD under the launch's ZeRO-3; what ran and its
    results."""
    import copy

    import deepspeed
    from accelerate.state import AcceleratorState
    from datasets import Dataset
    from test_trl import TOKENIZER

    # one DeepSpeed trainer after another in a process: each makes its own accelerator state (and DeepSpeed plugin)
    # on the process state set up at the start
    AcceleratorState._reset_state(reset_partial_state=False)
    args = config_class(
        output_dir=str(output_dir), per_device_train_batch_size=PAIRS, max_steps=STEPS, learning_rate=0.5,
        optim="sgd", logging_steps=1, max_length=64, bf16=False, report_to=[], seed=0, save_strategy="no",
        disable_tqdm=True, lr_scheduler_type="constant", accelerator_config={"use_configured_state": True}, **options,
    )  # fmt: skip
    trainer = trainer_class(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=args,
                            train_dataset=Dataset.from_list(data), processing_class=TOKENIZER)  # fmt: skip
    before = 0 if chunks is None else chunks[0]
    trainer.train()
    engine = trainer.model_wrapped
    head = trainer.accelerator.unwrap_model(engine).get_output_embeddings().weight
    result = {
        "engine": type(engine).__name__ if isinstance(engine, deepspeed.DeepSpeedEngine) else repr(type(engine)),
        "zero_stage": engine.zero_optimization_stage(), "processes": trainer.accelerator.num_processes,
        "lm_head_partition": [head.ds_tensor.numel(), head.ds_numel], "lm_head_numel_outside_forward": head.numel(),
        "history": [{k: v for k, v in log.items() if k not in ("epoch", "step") and "runtime" not in k
                     and "per_second" not in k} for log in trainer.state.log_history if "loss" in log],
        "weights": {k: v.clone() for k, v in (trainer.accelerator.get_state_dict(engine) or {}).items()},
    }  # fmt: skip
    if chunks is not None:
        per_process = [None] * trainer.accelerator.num_processes
        torch.distributed.all_gather_object(per_process, chunks[0] - before)
        result["chunks"] = per_process
    return result


def main(folder: Path) -> None:
    from dpo_fast.trainer.parallel import setup_cpu_processes

    setup_cpu_processes()  # before anything else makes accelerate's state: gloo on CPU processes
    from accelerate import PartialState
    from test_kto_trl import unpaired_data
    from test_trl import preference_data, tiny_llama
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    from dpo_fast.integrations.trl import FastDPOTrainer, FastKTOTrainer

    chunks = count_chunks()
    untied, tied = tiny_llama(), tiny_llama()
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    assert tied.get_output_embeddings().weight is tied.get_input_embeddings().weight
    preference = preference_data(STEPS * 2 * PAIRS, seed=0).to_list()
    uneven = uneven_preference_rows(STEPS * 2)
    unpaired = unpaired_data(STEPS * 2 * PAIRS, seed=0).to_list()
    dpo = {"beta": 0.5, "loss_type": ["sigmoid"]}
    cases = {
        "dpo-uneven": (DPOTrainer, FastDPOTrainer, DPOConfig, untied, uneven,
                       {**dpo, "train_sampling_strategy": "sequential"}),
        "dpo-tied": (DPOTrainer, FastDPOTrainer, DPOConfig, tied, preference, dpo),
        "kto": (KTOTrainer, FastKTOTrainer, KTOConfig, untied, unpaired, {"beta": 0.1}),
    }  # fmt: skip
    results = {}
    for name, (stock_class, fast_class, config_class, model, data, options) in cases.items():
        initial = {key: value.clone() for key, value in model.state_dict().items()}
        stock = run(stock_class, config_class, model, data, folder / name / "stock", **options)
        fast = run(fast_class, config_class, model, data, folder / name / "fast", chunks=chunks, **options)
        results[name] = {"initial": initial, "stock": stock, "fast": fast}
    if PartialState().is_main_process:
        torch.save(results, folder / "results.pt")


if __name__ == "__main__":  # one of the 2 processes of accelerate launch --config_file zero3.yaml
    main(Path(sys.argv[1]))
