"""FastKTOTrainer against TRL's own KTOTrainer: same config, data, seed and weights, float32 on CPU.

The tiny Llama and tokenizer of ``test_trl``; unpaired data with more desirable than undesirable completions,
mixed within each batch. Each case trains both trainers a few steps with SGD and compares every logged metric
(the KL estimate from the mismatched pairs among them), the evaluation metrics and each parameter's update,
within 1e-4 relative.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("trl")

import torch
from datasets import Dataset
from test_trl import (
    BASE,
    TOKENIZER,
    assert_logs_match,
    assert_updates_match,
    preference_data,
    tiny_moe,
    train_from,
)
from trl import KTOConfig, KTOTrainer

from dpo_fast.integrations.kto import FastKTOTrainer


def unpaired_data(rows: int, seed: int) -> Dataset:
    """Each preference pair's chosen (desirable) or rejected (undesirable) completion, about 2 desirable to 1."""
    pairs = preference_data(rows, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    desirable = (torch.rand(rows, generator=gen) < 0.65).tolist()
    return Dataset.from_dict({
        "prompt": pairs["prompt"],
        "completion": [c if d else r for c, r, d in zip(pairs["chosen"], pairs["rejected"], desirable)],
        "label": desirable,
    })  # fmt: skip


TRAIN, EVAL = unpaired_data(12, seed=0), unpaired_data(8, seed=1)


def train(trainer_class, tmp_path, *, steps=2, base=None, peft_config=None, trainer_kwargs=None, **options):
    """Train from ``base``'s weights (default: test_trl's tiny Llama) with SGD; return the log history, the
    evaluation metrics and each trainable parameter's update."""
    config = dict(
        output_dir=str(tmp_path / trainer_class.__name__), per_device_train_batch_size=4, per_device_eval_batch_size=4,
        max_steps=steps, optim="sgd", learning_rate=0.5, logging_steps=1, bf16=False, report_to=[], seed=0,
        save_strategy="no", disable_tqdm=True, max_length=64,
    )  # fmt: skip
    args = KTOConfig(**{**config, **options})
    return train_from(base, trainer_class, args, TRAIN, EVAL, peft_config=peft_config, trainer_kwargs=trainer_kwargs)


CASES = {
    "kto": {},
    "kto-weights-precompute": dict(desirable_weight=1.3, undesirable_weight=0.7, precompute_ref_log_probs=True,
                                   beta=0.3),
    "apo_zero_unpaired": dict(loss_type="apo_zero_unpaired"),
    # TRL's KL estimate is gathered per micro-batch
    "kto-accumulation": dict(per_device_train_batch_size=2, gradient_accumulation_steps=2),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_matches_trl(case, tmp_path):
    options = CASES[case]
    fast_logs, fast_eval, fast_updates = train(FastKTOTrainer, tmp_path, **options)
    stock_logs, stock_eval, stock_updates = train(KTOTrainer, tmp_path, **options)
    assert {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
            "entropy", "logits/chosen", "logits/rejected"} <= stock_logs[0].keys()  # fmt: skip
    beta = options.get("beta", 0.1)
    logs = assert_logs_match(fast_logs + [fast_eval], stock_logs + [stock_eval], beta)
    updates = assert_updates_match(fast_updates, stock_updates)
    if options.get("loss_type") != "apo_zero_unpaired":
        # the KL estimate is on, and positive after a step (in training, or in the evaluation after it)
        assert any(log.get("kl", log.get("eval_kl", 0)) > 0 for log in stock_logs + [stock_eval])
    print(f"{case}: max relative difference: logs {logs:.1e}, weight updates {updates:.1e}")


def test_lora_policy_uses_base_as_reference(tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    fast_logs, fast_eval, fast_updates = train(FastKTOTrainer, tmp_path, peft_config=lora)
    stock_logs, stock_eval, stock_updates = train(KTOTrainer, tmp_path, peft_config=lora)
    logs = assert_logs_match(fast_logs + [fast_eval], stock_logs + [stock_eval], beta=0.1)
    updates = assert_updates_match(fast_updates, stock_updates)
    print(f"LoRA: max relative difference: logs {logs:.1e}, weight updates {updates:.1e}")


def test_moe_router_aux_loss_matches_trl(tmp_path):
    base = tiny_moe("mixtral")
    fast_logs, fast_eval, fast_updates = train(FastKTOTrainer, tmp_path, base=base)
    stock_logs, stock_eval, stock_updates = train(KTOTrainer, tmp_path, base=base)
    assert "aux_loss" in stock_logs[0]
    logs = assert_logs_match(fast_logs + [fast_eval], stock_logs + [stock_eval], beta=0.1)
    updates = assert_updates_match(fast_updates, stock_updates)
    print(f"MoE: max relative difference: logs {logs:.1e}, weight updates {updates:.1e}")


def test_lm_head_module_is_never_called(tmp_path):
    calls = []
    handle = BASE.lm_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        train(FastKTOTrainer, tmp_path, steps=1)
    finally:
        handle.remove()
    assert not calls


def test_bad_options_are_refused_by_name(tmp_path):
    args = KTOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, desirable_weight=-1.0)
    with pytest.raises(ValueError, match="desirable_weight"):
        FastKTOTrainer(model=None, args=args, train_dataset=None)
    with pytest.raises(ValueError, match="backend must be one of"):
        FastKTOTrainer(model=None, args=KTOConfig(output_dir=str(tmp_path), report_to=[], bf16=False), backend="tpu")


def test_return_outputs_gives_the_models_full_logits_with_trls_warning(tmp_path):
    """``compute_loss(return_outputs=True)``: the same loss, and the model's own outputs, as TRL's KTOTrainer."""
    args = KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], bf16=False, max_length=64)
    trainer = FastKTOTrainer(model=copy.deepcopy(BASE), ref_model=copy.deepcopy(BASE), args=args, train_dataset=TRAIN,
                             processing_class=TOKENIZER)  # fmt: skip
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, batch)
    with pytest.warns(FutureWarning, match="return_outputs=True"):
        loss_again, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    assert torch.equal(loss, loss_again)
    assert outputs.logits.shape[-1] == BASE.config.vocab_size
