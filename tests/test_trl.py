"""FastDPOTrainer against TRL's own DPOTrainer: same config, same data, same seed, float32 on CPU.

A tiny Llama built from a config and a character-level tokenizer built in code (no hub). Each case
trains both trainers a few steps from the same weights and compares every logged metric, the
evaluation metrics and the weight updates, within 1e-4 relative.
"""

from __future__ import annotations

import copy
import math

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from dpo_fast.integrations.trl import PAIR_LOSSES, REFUSED_LOSSES, FastDPOTrainer  # noqa: E402

TOLERANCE = 1e-4
# Logged values that are not the math: timings, and TRL's running token count (checked equal apart)
NOT_COMPARED = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "epoch", "step",
                "eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "learning_rate"}  # fmt: skip


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Characters of the arithmetic dataset, one token each, with BOS, EOS and padding."""
    symbols = ["<pad>", "<s>", "</s>", "<unk>"] + list("abcdefghijklmnopqrstuvwxyz0123456789 .,?+=")
    tokenizer = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def preference_data(rows: int, seed: int) -> Dataset:
    """Sums with a right (chosen) and a wrong (rejected) answer, of varied lengths."""
    gen = torch.Generator().manual_seed(seed)
    data = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(rows):
        a, b = torch.randint(0, 60, (2,), generator=gen).tolist()
        data["prompt"].append(f"<s>what is {a}+{b}? " + "please " * (i % 2))
        data["chosen"].append(f"{a + b}" + " ok" * (i % 3))
        data["rejected"].append(f"{a + b + 1 + i % 5} no" + "." * (i % 4))
    return Dataset.from_dict(data)


TOKENIZER = tiny_tokenizer()
TRAIN, EVAL = preference_data(12, seed=0), preference_data(4, seed=1)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


BASE = tiny_llama()


def train(trainer_class, tmp_path, *, steps=3, peft_config=None, trainer_kwargs=None, **options):
    """Train from BASE's weights; return the log history, the evaluation metrics, and each trainable
    parameter's update (after - before).

    The optimizer is plain SGD: its update is linear in the gradient, so a gradient error shows in
    the weights as it is. (AdamW's first steps move each weight by about ``lr * sign(g)``, blind to
    the gradient's size and a coin toss where ``g`` is rounding noise: a weaker, noisier test.)
    """
    config = dict(
        output_dir=str(tmp_path / trainer_class.__name__), per_device_train_batch_size=4, max_steps=steps,
        optim="sgd", learning_rate=0.5, logging_steps=1, bf16=False, gradient_checkpointing=False, report_to=[],
        seed=0, save_strategy="no", disable_tqdm=True, max_length=64,
    )  # fmt: skip
    args = DPOConfig(**{**config, **options})
    ref_model = None if peft_config is not None or args.precompute_ref_log_probs else copy.deepcopy(BASE)
    trainer = trainer_class(
        model=copy.deepcopy(BASE), ref_model=ref_model, args=args, train_dataset=TRAIN, eval_dataset=EVAL,
        processing_class=TOKENIZER, peft_config=peft_config, **(trainer_kwargs or {}),
    )  # fmt: skip
    trainable = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    before = {name: p.detach().clone() for name, p in trainable.items()}
    trainer.train()
    updates = {name: p.detach() - before[name] for name, p in trainable.items()}
    return list(trainer.state.log_history), trainer.evaluate(), updates


def rel_diff(actual: float, expected: float, floor: float = 1e-2) -> float:
    return abs(actual - expected) / max(abs(expected), floor)


def assert_logs_match(fast_logs: list[dict], stock_logs: list[dict], beta: float) -> float:
    """Every logged metric of every step within TOLERANCE; returns the largest relative difference.

    A reward is ``beta * (logp - ref_logp)``, a difference of two log-probs: it is measured against
    ``beta * |logp|``, the scale at which its rounding is made (the first step's rewards are 0).
    """
    assert len(fast_logs) == len(stock_logs)
    worst = 0.0
    for fast, stock in zip(fast_logs, stock_logs):
        assert fast.keys() == stock.keys()
        for key, expected in stock.items():
            if key in NOT_COMPARED:
                continue
            assert math.isfinite(fast[key]), key
            floor = 1e-2
            if "rewards/" in key:
                prefix = key.split("rewards/")[0]
                floor = beta * max(abs(stock[f"{prefix}logps/chosen"]), abs(stock[f"{prefix}logps/rejected"]))
                if key.endswith("accuracies") and abs(stock[f"{prefix}rewards/margins"]) <= TOLERANCE * floor:
                    # policy == reference (the first step): the margins are rounding noise, so is their sign
                    continue
            error = rel_diff(fast[key], expected, floor)
            worst = max(worst, error)
            assert error <= TOLERANCE, f"{key}: {fast[key]} vs TRL's {expected}"
    return worst


def assert_updates_match(fast_updates: dict, stock_updates: dict) -> float:
    """Each trainable parameter's update within TOLERANCE of TRL's, by norm; returns the largest difference."""
    assert fast_updates.keys() == stock_updates.keys() and stock_updates
    worst = 0.0
    for name, stock in stock_updates.items():
        error = ((fast_updates[name] - stock).norm() / stock.norm()).item()
        worst = max(worst, error)
        assert error <= TOLERANCE, f"{name}: update differs from TRL's by {error:.2e} relative"
    return worst


CASES = {
    # TRL 1.16's sigmoid ignores label_smoothing: FastDPOTrainer must too
    "sigmoid-label_smoothing": dict(loss_type=["sigmoid"], label_smoothing=0.2),
    "robust-label_smoothing": dict(loss_type=["robust"], label_smoothing=0.1),
    "hinge": dict(loss_type=["hinge"], beta=0.5),
    "ipo-checkpointing": dict(loss_type=["ipo"], gradient_checkpointing=True),
    "ipo-precompute": dict(loss_type=["ipo"], precompute_ref_log_probs=True),
    "sigmoid+sft": dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
    # TR-DPO: the reference moves toward the policy after every step
    "sigmoid-sync_ref_model": dict(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_trl(case, tmp_path):
    fast_logs, fast_eval, fast_updates = train(FastDPOTrainer, tmp_path, **CASES[case])
    stock_logs, stock_eval, stock_updates = train(DPOTrainer, tmp_path, **CASES[case])
    beta = CASES[case].get("beta", 0.1)
    logs = assert_logs_match(fast_logs, stock_logs, beta)
    evals = assert_logs_match([fast_eval], [stock_eval], beta)
    updates = assert_updates_match(fast_updates, stock_updates)
    print(f"{case}: max relative difference: logs {logs:.1e}, eval {evals:.1e}, weight updates {updates:.1e}")


@pytest.mark.parametrize("loss_type", sorted(set(PAIR_LOSSES) - {"sigmoid", "robust", "hinge", "ipo"}))
def test_other_loss_types_match_trl(loss_type, tmp_path):
    options = dict(loss_type=[loss_type], label_smoothing=1e-3 if loss_type == "exo_pair" else 0.0)
    fast_logs, _, fast_updates = train(FastDPOTrainer, tmp_path, steps=2, **options)
    stock_logs, _, stock_updates = train(DPOTrainer, tmp_path, steps=2, **options)
    logs = assert_logs_match(fast_logs, stock_logs, beta=0.1)
    updates = assert_updates_match(fast_updates, stock_updates)
    print(f"{loss_type}: max relative difference: logs {logs:.1e}, weight updates {updates:.1e}")


def test_peft_policy_uses_base_as_reference(tmp_path):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    fast_logs, fast_eval, fast_updates = train(FastDPOTrainer, tmp_path, peft_config=lora)
    stock_logs, stock_eval, stock_updates = train(DPOTrainer, tmp_path, peft_config=lora)
    logs = assert_logs_match(fast_logs, stock_logs, beta=0.1)
    evals = assert_logs_match([fast_eval], [stock_eval], beta=0.1)
    updates = assert_updates_match(fast_updates, stock_updates)
    print(f"LoRA: max relative difference: logs {logs:.1e}, eval {evals:.1e}, weight updates {updates:.1e}")
    assert any(entry.get("rewards/margins", 0) != 0 for entry in fast_logs)  # the adapters did move the policy


def test_lm_head_module_is_never_called(tmp_path):
    """The logits are never formed: the lm_head module does not run, in training or evaluation."""
    calls = []
    handle = BASE.lm_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        train(FastDPOTrainer, tmp_path, steps=1)
    finally:
        handle.remove()
    assert not calls


def test_without_token_metrics_the_rest_still_match(tmp_path):
    fast_logs, _, fast_updates = train(FastDPOTrainer, tmp_path, steps=2, trainer_kwargs=dict(token_metrics=False))
    stock_logs, _, stock_updates = train(DPOTrainer, tmp_path, steps=2)
    skipped = {"entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"}
    assert_logs_match(fast_logs, [{k: v for k, v in log.items() if k not in skipped} for log in stock_logs], beta=0.1)
    assert_updates_match(fast_updates, stock_updates)


def test_every_trl_loss_type_is_supported_or_refused():
    """The loss types TRL's DPOConfig lists, read from the installed TRL."""
    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    listed = set(help_text.split("Possible values are:")[1].split(". If multiple")[0].replace("`", "").replace("'", "")
                 .replace(" ", "").split(","))  # fmt: skip
    assert "sigmoid" in listed and "apo_down" in listed
    assert listed == set(PAIR_LOSSES) | set(REFUSED_LOSSES) | {"sft"}
