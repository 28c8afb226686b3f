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
from torch.ops import aten  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from dpo_fast.integrations.trl import FastDPOTrainer  # noqa: E402
from dpo_fast.objectives import DPO_LOSS_TYPES  # noqa: E402

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


def train(trainer_class, tmp_path, *, steps=3, peft_config=None, trainer_kwargs=None, base=None, **options):
    """Train from ``base``'s weights (default BASE); return the log history, the evaluation metrics, and each
    trainable parameter's update (after - before).

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
    return train_from(base, trainer_class, args, TRAIN, EVAL, peft_config=peft_config, trainer_kwargs=trainer_kwargs)


def train_from(base, trainer_class, args, train_dataset, eval_dataset, *, peft_config=None, trainer_kwargs=None):
    """``trainer_class`` (a TRL trainer or its drop-in) from ``base``'s weights (default BASE), with a frozen copy as
    the reference unless PEFT or precomputed log-probs stand in for it; return the log history, the evaluation
    metrics, and each trainable parameter's update."""
    base = BASE if base is None else base
    ref_model = None if peft_config is not None or args.precompute_ref_log_probs else copy.deepcopy(base)
    trainer = trainer_class(
        model=copy.deepcopy(base), ref_model=ref_model, args=args, train_dataset=train_dataset,
        eval_dataset=eval_dataset, processing_class=TOKENIZER, peft_config=peft_config, **(trainer_kwargs or {}),
    )  # fmt: skip
    updates = applied_sgd_updates(trainer)
    trainer.train()
    return list(trainer.state.log_history), trainer.evaluate(), updates


def applied_sgd_updates(trainer) -> dict[str, torch.Tensor]:
    """Each trainable parameter's update as the optimizer applies it, summed over the steps in float64:
    ``-lr * grad`` at every SGD step (filled in while ``trainer.train()`` runs).

    Not ``weights after - weights before``: float32 weights near 1 (the norm layers) resolve an update only to
    their ulp, 1.2e-7, a relative error of about 1e-4 on a 1e-3 update that neither trainer made."""
    trainer.create_optimizer()  # train() keeps an optimizer it is given
    names = {p: name for name, p in trainer.model.named_parameters() if p.requires_grad}
    updates = {name: torch.zeros(p.shape, dtype=torch.float64) for p, name in names.items()}

    def record(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            assert group.get("momentum", 0) == 0 and group.get("weight_decay", 0) == 0, "plain SGD expected"
            for p in group["params"]:
                if p.grad is not None and p in names:
                    updates[names[p]] -= group["lr"] * p.grad.double()

    trainer.optimizer.register_step_pre_hook(record)
    return updates


def rel_diff(actual: float, expected: float, floor: float = 1e-2) -> float:
    return abs(actual - expected) / max(abs(expected), floor)


def assert_logs_match(fast_logs: list[dict], stock_logs: list[dict], beta: float,
                      tolerance: float = TOLERANCE) -> float:  # fmt: skip
    """Every logged metric of every step within ``tolerance``; returns the largest relative difference.

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
            if key.endswith("kl"):
                # KTO's KL estimate: a mean of differences of summed log-probs, each rounded at ~1e-7 of |logps|
                floor = 1e-2 * max(abs(stock[f"{key[:-2]}logps/chosen"]), abs(stock[f"{key[:-2]}logps/rejected"]))
            if "rewards/" in key:
                prefix = key.split("rewards/")[0]
                floor = beta * max(abs(stock[f"{prefix}logps/chosen"]), abs(stock[f"{prefix}logps/rejected"]))
                if key.endswith("accuracies") and abs(stock[f"{prefix}rewards/margins"]) <= tolerance * floor:
                    # policy == reference (the first step): the margins are rounding noise, so is their sign
                    continue
            error = rel_diff(fast[key], expected, floor)
            worst = max(worst, error)
            assert error <= tolerance, f"{key}: {fast[key]} vs {expected}"
    return worst


def assert_updates_match(fast_updates: dict, stock_updates: dict, tolerance: float = TOLERANCE) -> float:
    """Each trainable parameter's update within ``tolerance`` of the other's, by norm; returns the largest error."""
    assert fast_updates.keys() == stock_updates.keys() and stock_updates
    worst = 0.0
    for name, stock in stock_updates.items():
        error = ((fast_updates[name] - stock).norm() / stock.norm()).item()
        worst = max(worst, error)
        assert error <= tolerance, f"{name}: update differs by {error:.2e} relative"
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


# Issue 17: what FastDPOTrainer refused before (each raised a ValueError naming the option)
FORMERLY_REFUSED = {
    "forward_kl": dict(f_divergence_type="forward_kl"),
    "js_divergence": dict(f_divergence_type="js_divergence", loss_type=["sigmoid_norm"]),
    "alpha_divergence": dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    "ld_alpha": dict(ld_alpha=0.5),
    "ld_alpha-ipo-precompute": dict(ld_alpha=0.3, loss_type=["ipo"], precompute_ref_log_probs=True),
    "use_weighting": dict(use_weighting=True, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5]),
    "aot": dict(loss_type=["aot"], label_smoothing=0.1),
    # sorted within each micro-batch of 2 pairs, as TRL sorts
    "aot_unpaired-accumulation": dict(loss_type=["aot_unpaired"], per_device_train_batch_size=2,
                                      gradient_accumulation_steps=2),
    "discopop": dict(loss_type=["discopop"], discopop_tau=0.2),
    # TRL reads label_smoothing in robust, not in sigmoid
    "two-pairwise-types": dict(loss_type=["sigmoid", "robust"], loss_weights=[1.0, 0.5], label_smoothing=0.1),
    "sft-alone": dict(loss_type=["sft"]),
}  # fmt: skip


@pytest.mark.parametrize("case", FORMERLY_REFUSED)
def test_formerly_refused_options_match_trl(case, tmp_path):
    options = FORMERLY_REFUSED[case]
    fast_logs, fast_eval, fast_updates = train(FastDPOTrainer, tmp_path, steps=2, **options)
    stock_logs, stock_eval, stock_updates = train(DPOTrainer, tmp_path, steps=2, **options)
    logs = assert_logs_match(fast_logs + [fast_eval], stock_logs + [stock_eval], beta=0.1)
    updates = assert_updates_match(fast_updates, stock_updates)
    print(f"{case}: max relative difference: logs {logs:.1e}, weight updates {updates:.1e}")


def tiny_moe(model_type: str):
    """A 2-layer MoE causal LM of 4 experts, 2 per token, built from a config (no hub)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, num_experts_per_tok=2,
                 tie_word_embeddings=False, router_aux_loss_coef=0.3)  # fmt: skip
    experts = {"mixtral": dict(num_local_experts=4), "qwen3_moe": dict(num_experts=4, moe_intermediate_size=16)}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes, **experts[model_type])).float()


@pytest.mark.parametrize("model_type, coef", [("mixtral", None), ("qwen3_moe", 0.05)])
def test_moe_router_aux_loss_matches_trl(model_type, coef, tmp_path):
    """The MoE load-balancing loss, weighted by the config's router_aux_loss_coef (None) or DPOConfig's, is added
    to the loss and logged as ``aux_loss``, as TRL does."""
    base = tiny_moe(model_type)
    fast_logs, fast_eval, fast_updates = train(FastDPOTrainer, tmp_path, steps=2, base=base, router_aux_loss_coef=coef)
    stock_logs, stock_eval, stock_updates = train(DPOTrainer, tmp_path, steps=2, base=base, router_aux_loss_coef=coef)
    assert "aux_loss" in stock_logs[0] and "eval_aux_loss" in stock_eval
    logs = assert_logs_match(fast_logs + [fast_eval], stock_logs + [stock_eval], beta=0.1)
    updates = assert_updates_match(fast_updates, stock_updates)
    gate = next(name for name in stock_updates if "gate" in name and "experts" not in name)
    assert stock_updates[gate].norm() > 0  # the router trains
    print(f"{model_type}: max relative difference: logs {logs:.1e}, weight updates {updates:.1e}")


# the loss types no other case covers
OTHER_LOSS_TYPES = sorted(set(DPO_LOSS_TYPES) - {"sigmoid", "robust", "hinge", "ipo", "sft", "aot", "aot_unpaired",
                                                 "discopop"})  # fmt: skip


@pytest.mark.parametrize("loss_type", OTHER_LOSS_TYPES)
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


def test_a_logit_scaled_model_matches_trl(tmp_path):
    """Granite divides its logits by ``logits_scaling``; TRL's fused head and FastDPOTrainer both apply it."""
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(0)
    base = GraniteForCausalLM(GraniteConfig(vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=128, logits_scaling=0.25))  # fmt: skip
    fast_logs, fast_eval, fast_updates = train(FastDPOTrainer, tmp_path, steps=2, base=base)
    stock_logs, stock_eval, stock_updates = train(DPOTrainer, tmp_path, steps=2, base=base)
    assert_logs_match(fast_logs + [fast_eval], stock_logs + [stock_eval], beta=0.1)
    assert_updates_match(fast_updates, stock_updates)


# Prefix sharing against the same trainer without it: float32 rounding apart (measured: within 5e-6)
SHARING_TOLERANCE = 1e-5
SHARING_CASES = {
    "sigmoid": {},
    "ipo-precompute": {"loss_type": ["ipo"], "precompute_ref_log_probs": True},
    "sigmoid+sft-checkpointing": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5],
                                  "gradient_checkpointing": True},
    # LD-DPO's weights by position within each completion, WPO's from the same pass, in the shared layout
    "ld_alpha-use_weighting": {"loss_type": ["sigmoid", "ipo"], "ld_alpha": 0.5, "use_weighting": True},
}  # fmt: skip


@pytest.mark.parametrize("case", [*SHARING_CASES, "lora"])
def test_prefix_sharing_matches_the_trainer_without_it(case, tmp_path):
    """FastDPOTrainer(prefix_sharing=True): every logged metric (TRL's token count included), the evaluation and
    each parameter's update are those of FastDPOTrainer without sharing, within float32 rounding."""
    options, peft_config = SHARING_CASES.get(case, {}), None
    if case == "lora":
        peft = pytest.importorskip("peft")
        peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    shared = train(FastDPOTrainer, tmp_path / "shared", steps=2, peft_config=peft_config,
                   trainer_kwargs={"prefix_sharing": True}, **options)  # fmt: skip
    plain = train(FastDPOTrainer, tmp_path / "plain", steps=2, peft_config=peft_config, **options)
    beta = options.get("beta", 0.1)
    logs = assert_logs_match(shared[0] + [shared[1]], plain[0] + [plain[1]], beta, SHARING_TOLERANCE)
    updates = assert_updates_match(shared[2], plain[2], SHARING_TOLERANCE)
    print(f"prefix sharing, {case}: max relative difference: logs {logs:.1e}, weight updates {updates:.1e}")


def test_prefix_sharing_refuses_what_it_cannot_share(tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, truncation_mode="keep_end", max_length=64)
    with pytest.raises(ValueError, match="truncation_mode='keep_start'"):
        FastDPOTrainer(model=None, args=args, prefix_sharing=True)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(TOKENIZER), n_embd=16, n_layer=1, n_head=2, n_positions=64))
    with pytest.raises(ValueError, match="verified for model types.*'gpt2'"):
        train(FastDPOTrainer, tmp_path, steps=1, base=gpt2, trainer_kwargs={"prefix_sharing": True})
    # the router would see each prompt once, not twice as in TRL: its load-balancing loss would differ
    with pytest.raises(ValueError, match=r"router_aux_loss_coef=0\.3"):
        train(FastDPOTrainer, tmp_path, steps=1, base=tiny_moe("mixtral"), trainer_kwargs={"prefix_sharing": True})


def test_every_trl_loss_type_is_supported():
    """The loss types TRL's DPOConfig lists, read from the installed TRL: FastDPOTrainer refuses none."""
    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    listed = set(help_text.split("Possible values are:")[1].split(". If multiple")[0].replace("`", "").replace("'", "")
                 .replace(" ", "").split(","))  # fmt: skip
    assert "sigmoid" in listed and "apo_down" in listed
    assert listed == set(DPO_LOSS_TYPES)


# ---------------------------------------------------------------------------------------------- products per step


class VocabProducts(TorchDispatchMode):
    """The FLOPs (2 per multiply-add) of every product over the vocabulary while the mode is on.

    A product over the vocabulary is a matmul with V among its dimensions. Those that run as ATen ops
    (a second pass over the vocabulary for the metrics, the lm_head module) are seen by the dispatch
    mode; dpo_fast's custom ops are opaque to it, so the chunk products inside them are counted where
    the torch backend forms them (``install``): ``logits_stats`` (``h W^T``), ``logits_grad`` when it
    recomputes the logits, and ``chunking._GradAccumulator.add`` (``dL/dx W`` and ``dL/dx^T h``).
    """

    PRODUCTS = (aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm)

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.flops = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.PRODUCTS:
            left, right = args[-2:]  # (..., M, K) @ (..., K, N); addmm's bias comes first
            dims = (*left.shape, right.shape[-1])
            if self.vocab in dims:
                self.flops += 2 * math.prod(dims)
        return func(*args, **(kwargs or {}))

    def chunk_product(self, tokens: int, width: int, vocab: int, times: int = 1) -> None:
        self.flops += 2 * times * tokens * width * vocab

    def install(self, monkeypatch) -> None:
        from dpo_fast import chunking
        from dpo_fast.backends import torch_chunked

        stats_fn, grad_fn, add_fn = torch_chunked.logits_stats, torch_chunked.logits_grad, chunking._GradAccumulator.add

        def logits_stats(chunk, *args):
            self.chunk_product(chunk.rows.shape[0], chunk.hidden.shape[1], chunk.vocab)
            return stats_fn(chunk, *args)

        def logits_grad(chunk, stats, *args):
            if stats.logits is None:  # recomputed, not kept from the log-prob pass
                self.chunk_product(chunk.rows.shape[0], chunk.hidden.shape[1], chunk.vocab)
            return grad_fn(chunk, stats, *args)

        def add(grads, rows, grad_logits):
            products = (grads.grad_hidden is not None) + (grads.grad_weight is not None)
            self.chunk_product(rows.shape[0], grads.hidden.shape[1], grads.weight.shape[0], products)
            return add_fn(grads, rows, grad_logits)

        monkeypatch.setattr(torch_chunked, "logits_stats", logits_stats)
        monkeypatch.setattr(torch_chunked, "logits_grad", logits_grad)
        monkeypatch.setattr(chunking._GradAccumulator, "add", add)


PRODUCT_CASES = {
    # (DPOConfig options, LoRA, FLOPs per completion token per H*V: training step, evaluation step)
    "trainable head, reference copy": ({}, False, 6 + 2, 2 + 2),
    "frozen head (LoRA), base as reference": ({}, True, 4 + 2, 2 + 2),
    "precomputed reference": ({"precompute_ref_log_probs": True}, False, 6, 2),
}


@pytest.mark.parametrize("case", PRODUCT_CASES)
def test_one_product_pass_per_step_with_trl_metrics(case, tmp_path, monkeypatch):
    """Issue 15: with TRL's token metrics on (the default), a step is one pass over the vocabulary: 6*N*H*V
    FLOPs for the policy with a trainable head, 4 frozen, 2 for a live reference (N completion tokens);
    the metrics add no product."""
    options, lora, train_flops, eval_flops = PRODUCT_CASES[case]
    vocab, width = 97, 32  # a vocabulary size no other dimension of the model or the batches has
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        tie_word_embeddings=False))  # fmt: skip
    peft_config = None
    if lora:
        peft = pytest.importorskip("peft")
        peft_config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    counter = VocabProducts(vocab)
    counter.install(monkeypatch)
    steps = []  # (mode, FLOPs, completion tokens)

    class Counted(FastDPOTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            return self._counted("train", inputs, super().training_step, model, inputs, *args, **kwargs)

        def prediction_step(self, model, inputs, *args, **kwargs):
            return self._counted("eval", inputs, super().prediction_step, model, inputs, *args, **kwargs)

        def _counted(self, mode, inputs, step, *args, **kwargs):
            counter.flops = 0
            with counter:
                result = step(*args, **kwargs)
            steps.append((mode, counter.flops, int(inputs["completion_mask"][:, 1:].sum())))
            return result

    logs, evals, _ = train(Counted, tmp_path, steps=2, base=base, peft_config=peft_config,
                           trainer_kwargs={"backend": "torch"}, **options)  # fmt: skip
    assert [mode for mode, _, _ in steps] == ["train", "train", "eval"]
    for mode, flops, tokens in steps:
        per_token = train_flops if mode == "train" else eval_flops
        assert flops == per_token * tokens * width * vocab, f"{mode}: {flops / (tokens * width * vocab)} N*H*V"
    metrics = {"entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"}
    assert metrics <= logs[0].keys() and {"eval_" + name for name in metrics} <= evals.keys()


def test_return_outputs_gives_the_models_full_logits_with_trls_warning(tmp_path):
    """``compute_loss(return_outputs=True)`` (for ``compute_metrics``): the same loss, and the model's own outputs
    from an extra forward pass, as TRL returns them, with its deprecation warning."""
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, report_to=[], bf16=False, max_length=64)
    trainer = FastDPOTrainer(model=copy.deepcopy(BASE), ref_model=copy.deepcopy(BASE), args=args, train_dataset=TRAIN,
                             processing_class=TOKENIZER)  # fmt: skip
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, batch)
    with pytest.warns(FutureWarning, match="return_outputs=True"):
        loss_again, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    assert torch.equal(loss, loss_again)
    assert outputs.logits.shape == (*batch["input_ids"].shape, BASE.config.vocab_size)
