"""The trainer (``dpo_fast.trainer``) on tiny random models, on CPU.

Units first (rows -> tokens -> batches, bad rows, config and flags, the model's fused loss against
the naive full-logits step), then whole runs: end to end, resume, the reference modes, LoRA.
Elsewhere: the output folder (test_trainer_output.py), errors, help and the keys table (test_trainer_errors.py),
several processes (test_trainer_distributed.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import datasets
from accelerate.state import AcceleratorState
from trainer_helpers import TINY_LLAMA, logged, run, train_records, weights, write_tiny_files
from transformers import AutoConfig, AutoModelForCausalLM

from dpo_fast.integrations import hf
from dpo_fast.trainer import TrainConfig, cli, data, load_config, train
from dpo_fast.trainer.config import DEFAULT_DIR
from dpo_fast.trainer.model import DPOModel


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model config and 64 train / 24 eval rows of the bundled data, as files."""
    return write_tiny_files(tmp_path_factory.mktemp("tiny"))


def rows_of(tokenizer, records, **truncation):
    options = {"max_length": None, "max_prompt_length": None, **truncation}
    return data.tokenize(datasets.Dataset.from_list(records), tokenizer, name="test", **options)


# ---------------------------------------------------------------------------------------------- data


def test_collate_shifts_labels_onto_completion_tokens_padded_and_packed(tokenizer):
    rows = rows_of(tokenizer, [{"prompt": "reverse abc:", "chosen": " cba", "rejected": " cab"},
                               {"prompt": "reverse de:", "chosen": " ed", "rejected": " de"}])[:]  # fmt: skip
    prompt = tokenizer("reverse abc:")["input_ids"]
    chosen = tokenizer(" cba", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert rows["prompt_ids"][0] == prompt and rows["chosen_ids"][0] == chosen
    padded = data.collate(rows, padding_free=False, pad_id=tokenizer.pad_token_id)
    assert padded["input_ids"].shape == (4, len(prompt) + len(chosen))  # sequences: c0, c1, r0, r1
    first = padded["labels"][0]
    assert (first[: len(prompt) - 1] == data.IGNORE_INDEX).all()
    assert first[len(prompt) - 1 : -1].tolist() == chosen and first[-1] == data.IGNORE_INDEX
    valid = padded["labels"] != data.IGNORE_INDEX
    assert torch.equal(padded["labels"][:, :-1][valid[:, :-1]], padded["input_ids"][:, 1:][valid[:, :-1]])
    lengths = [len(p) + len(c) for p, c in zip(rows["prompt_ids"] * 2, rows["chosen_ids"] + rows["rejected_ids"])]
    assert padded["attention_mask"].sum(1).tolist() == lengths

    packed = data.collate(rows, padding_free=True, pad_id=tokenizer.pad_token_id)
    keep = padded["attention_mask"].bool()
    assert torch.equal(packed["input_ids"][0], padded["input_ids"][keep])
    assert torch.equal(packed["labels"], padded["labels"][keep])
    assert torch.equal(packed["segment_ids"], torch.arange(4)[:, None].expand_as(keep)[keep])
    assert torch.equal(packed["position_ids"][0], torch.arange(keep.shape[1]).expand_as(keep)[keep])


def test_truncation_keeps_the_prompt_end_and_the_completion_start(tokenizer):
    rows = rows_of(tokenizer, [{"prompt": "reverse abcdefgh:", "chosen": " hgfedcba", "rejected": " abcdefgh"}],
                   max_length=12, max_prompt_length=5)  # fmt: skip
    full_prompt = tokenizer("reverse abcdefgh:")["input_ids"]
    assert rows[0]["prompt_ids"] == full_prompt[-5:]
    assert rows[0]["chosen_ids"] == tokenizer(" hgfedcb", add_special_tokens=False)["input_ids"][:7]
    assert len(rows[0]["prompt_ids"]) + len(rows[0]["rejected_ids"]) == 12


def test_conversational_rows_use_the_chat_template(tokenizer):
    rows = rows_of(tokenizer, [{"prompt": [{"role": "user", "content": "abc"}],
                                "chosen": [{"role": "assistant", "content": "cba"}],
                                "rejected": [{"role": "assistant", "content": "abc"}]}])  # fmt: skip
    assert tokenizer.decode(rows[0]["prompt_ids"]) == "user: abc\nassistant:"
    assert tokenizer.decode(rows[0]["chosen_ids"]) == " cba\n"
    assert tokenizer.decode(rows[0]["rejected_ids"]) == " abc\n"


@pytest.mark.parametrize(
    "row, match",
    [
        ({"prompt": "reverse ab:", "chosen": None, "rejected": " ab"}, "row 2: field 'chosen' is missing"),
        ({"prompt": "reverse ab:", "chosen": " ba", "rejected": "  "}, "row 2: field 'rejected' is empty"),
        ({"prompt": "", "chosen": " ba", "rejected": " ab"}, "row 2: field 'prompt' is empty"),
        ({"prompt": [{"role": "user", "content": "ab"}], "chosen": [{"role": "assistant", "content": ""}],
          "rejected": [{"role": "assistant", "content": "ab"}]}, "row 2: field 'chosen' is empty"),
    ],
)  # fmt: skip
def test_bad_rows_are_named_with_their_field(tokenizer, row, match):
    # the bad row is the second: rows count from 1
    good = {"prompt": "reverse cd:", "chosen": " dc", "rejected": " cd"}
    if isinstance(row["prompt"], list):
        good = {key: [{"role": "user" if key == "prompt" else "assistant", "content": "cd"}] for key in good}
    with pytest.raises(ValueError, match=match):
        rows_of(tokenizer, [good, row])


def test_rows_mixing_text_and_messages_are_rejected(tokenizer):
    row = {"prompt": "reverse ab:", "chosen": [{"role": "assistant", "content": "ba"}],
           "rejected": [{"role": "assistant", "content": "ab"}]}  # fmt: skip
    with pytest.raises(ValueError, match="row 1: fields mix text and message lists"):
        rows_of(tokenizer, [row])


def test_json_jsonl_and_parquet_files_give_the_same_rows(tmp_path):
    records = [{"prompt": "reverse ab:", "chosen": " ba", "rejected": " ab"},
               {"prompt": "reverse cde:", "chosen": " edc", "rejected": " ecd"}]  # fmt: skip
    (tmp_path / "rows.json").write_text(json.dumps(records))
    datasets.Dataset.from_list(records).to_json(tmp_path / "rows.jsonl")
    datasets.Dataset.from_list(records).to_parquet(tmp_path / "rows.parquet")
    for name in ("rows.json", "rows.jsonl", "rows.parquet"):
        assert data.load_rows(str(tmp_path / name), "train").to_list() == records


def test_a_dataset_without_a_column_is_rejected(tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "reverse ab:", "chosen": " ba"}) + "\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['rejected'\]"):
        data.tokenize(data.load_rows(str(path), "train"), tokenizer, None, None, str(path))
    missing = tmp_path / "rows.parquet"
    with pytest.raises(ValueError, match="rows.parquet' not found: no such file or folder"):
        data.load_rows(str(missing), "train")


def test_epoch_batches_are_a_seeded_permutation_and_shards_cover_every_batch():
    first, again, other = (data.epoch_batches(10, 3, seed, epoch) for seed, epoch in ((0, 0), (0, 0), (0, 1)))
    assert first == again and first != other and len(first) == 3
    assert len({i for batch in first for i in batch}) == 9

    class Procs:  # the two attributes of an Accelerator that shard() reads
        def __init__(self, rank):
            self.num_processes, self.process_index = 2, rank

    batches = data.eval_batches(7, 2)  # 4 batches, the last of one row
    shares = [data.shard(batches[:3], Procs(rank)) for rank in (0, 1)]
    assert [len(share) for share in shares] == [2, 2]  # padded to as many forwards on each process
    counted = sorted(i for share in shares for rows, keep in share if keep for i in rows)
    assert counted == list(range(6))


# ---------------------------------------------------------------------------------------------- config and CLI


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m.json\ndataset: d.jsonl\nmax_steps: 5\nbf16: true\n")
    (tmp_path / "m.json").write_text("{}")
    args = vars(cli.parser().parse_args(
        ["train", "--config", str(path), "--max-steps", "7", "--no-bf16", "--max_prompt_length", "8",
         "--eval-dataset", "e.jsonl", "--max-length", "null", "--learning-rate", "1e-4"]
    ))  # fmt: skip
    args.pop("command")
    cfg = load_config(args.pop("config"), **args)
    assert (cfg.max_steps, cfg.bf16, cfg.max_prompt_length, cfg.max_length) == (7, False, 8, None)
    assert cfg.learning_rate == 1e-4
    assert cfg.model == str((tmp_path / "m.json").resolve())  # relative to the config file: it exists there
    assert cfg.dataset == "d.jsonl" and cfg.eval_dataset == "e.jsonl"  # kept: no such file beside the config
    default = load_config()
    assert Path(default.model) == DEFAULT_DIR / "model.json" and Path(default.eval_dataset).is_file()


@pytest.mark.parametrize(
    "values, match",
    [
        ({"max_stepz": 3}, r"unknown config key\(s\) \['max_stepz'\]"),
        ({"reference": "adapters"}, "needs a LoRA policy"),
        ({"loss_type": "kto"}, "is KTO's \\(unpaired\\): set objective to 'kto'"),
        ({"loss_type": "simpo"}, "loss_type must be one of"),
        ({"max_length": 8, "max_prompt_length": 8}, "max_prompt_length must be set and in"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size must be >= 1"),
    ],
)
def test_bad_config_values_are_named(tmp_path, values, match):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": "m", "dataset": "d", **values}))
    with pytest.raises(ValueError, match=match):
        load_config(path)


# ---------------------------------------------------------------------------------------------- the model's loss


def tiny_model(kind: str) -> torch.nn.Module:
    """float32 random models: tied Llama; untied Llama whose head has a bias; Gemma-2 with a softcap; Granite,
    whose logits are divided by ``logits_scaling``."""
    torch.manual_seed(0)
    if kind == "gemma2-softcap":
        config = AutoConfig.for_model("gemma2", vocab_size=40, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      final_logit_softcapping=3.0, attn_implementation="eager")  # fmt: skip
        return AutoModelForCausalLM.from_config(config)
    if kind == "granite-scaled":
        config = AutoConfig.for_model(**{**TINY_LLAMA, "model_type": "granite", "logits_scaling": 0.25})
        return AutoModelForCausalLM.from_config(config)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(**{**TINY_LLAMA, "tie_word_embeddings": kind == "llama-tied"})
    )
    if kind == "llama-bias":
        model.lm_head = torch.nn.Linear(32, 40, bias=True)
        torch.nn.init.normal_(model.lm_head.bias)
    return model


def naive_step(model, batch, ref_logps, beta):
    """The step the fused loss replaces: full (2P, T, V) logits from the HF model, log-softmax, gather.

    Returns the loss and TRL's token metrics (entropy over the completion tokens, mean logit over the chosen
    and the rejected ones, top-1 accuracy over the chosen ones)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"]
    valid = labels != data.IGNORE_INDEX
    log_probs = logits.log_softmax(-1)
    token_logps = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    seq_logps = (token_logps * valid).sum(-1) - ref_logps
    chosen_logratios, rejected_logratios = seq_logps.chunk(2)
    loss = -torch.nn.functional.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()  # TRL's sigmoid
    chosen = valid.clone()
    chosen[chosen.shape[0] // 2 :] = False
    with torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        metrics = {
            "entropy": entropy[valid].mean().item(),
            "logits/chosen": logits.mean(-1)[chosen].mean().item(),
            "logits/rejected": logits.mean(-1)[valid & ~chosen].mean().item(),
            "mean_token_accuracy": (logits.argmax(-1) == labels)[chosen].float().mean().item(),
        }
    return loss, metrics


@pytest.mark.parametrize("kind", ["llama-tied", "llama-bias", "gemma2-softcap", "granite-scaled"])
def test_fused_loss_equals_the_naive_step_in_loss_gradients_and_token_metrics(tokenizer, files, kind):
    """Every layout the trainer collates (padded, packed, the prefix shared) against the full-logits step."""
    records = [json.loads(line) for line in (files / "train.jsonl").read_text().splitlines()[:4]]
    rows = rows_of(tokenizer, records)[:]
    padded = data.collate(rows, padding_free=False, pad_id=tokenizer.pad_token_id)
    layouts = [("reference", padded), ("torch", padded), ("torch", data.collate(rows, True, tokenizer.pad_token_id))]
    if kind != "granite-scaled":  # granite is not among the model types prefix sharing verifies
        layouts += [("torch", data.collate(rows, padding_free, tokenizer.pad_token_id, prefix_sharing=True))
                    for padding_free in (False, True)]  # fmt: skip
    ref_logps = -30 + 5 * torch.randn(8, generator=torch.Generator().manual_seed(1))
    model = tiny_model(kind)
    if kind == "llama-bias":  # EOS the argmax at most tokens: the top-1 metric counts some hits, not none
        with torch.no_grad():
            model.lm_head.bias[tokenizer.eos_token_id] += 6.0

    def loss_and_grads(compute):
        model.zero_grad()
        loss, metrics = compute()
        loss.backward()
        return loss.detach(), metrics, {name: p.grad.clone() for name, p in model.named_parameters()}

    def fused(backend, batch):
        def step():
            out = DPOModel(model, TrainConfig(model="m", dataset="d", backend=backend, beta=0.5))(
                **batch, ref_logps=ref_logps
            )
            return out.loss, hf.token_metric_means(out.token_sums)

        return step

    expected_loss, expected_metrics, expected_grads = loss_and_grads(
        lambda: naive_step(model, padded, ref_logps, beta=0.5)
    )
    if kind == "llama-bias":
        assert 0 < expected_metrics["mean_token_accuracy"] < 1
    for backend, batch in layouts:
        loss, metrics, grads = loss_and_grads(fused(backend, batch))
        layout = f"{backend} {sorted(batch)}"
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6, msg=layout)
        assert metrics == pytest.approx(expected_metrics, rel=1e-5, abs=1e-6), layout
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"{layout} {name}")


# ---------------------------------------------------------------------------------------------- whole runs


def test_a_run_logs_trl_metrics_learns_and_saves_a_loadable_model(files, tmp_path):
    # two epochs of the 64 rows, evaluated on those rows: the loss on them must fall
    records = run(files, tmp_path / "run", max_steps=16, per_device_train_batch_size=8, eval_steps=8, save_steps=8,
                  padding_free=True, eval_dataset=str(files / "train.jsonl"))  # fmt: skip
    steps = train_records(records)
    assert [r["step"] for r in steps] == list(range(1, 17))
    keys = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "learning_rate",
            "grad_norm", "epoch"}  # fmt: skip
    assert keys <= set(steps[0])
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [8, 16]
    assert {"eval_" + key for key in keys - {"learning_rate", "grad_norm", "epoch"}} <= set(evals[0])
    # step 1 runs the initial policy, which the precomputed reference is: rewards 0, loss log 2
    assert abs(steps[0]["rewards/chosen"]) < 1e-5 and abs(steps[0]["rewards/rejected"]) < 1e-5
    assert steps[0]["loss"] == pytest.approx(0.6931472, abs=1e-5)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < 0.6931472
    assert evals[-1]["eval_rewards/accuracies"] > 0.5
    for record in (steps[0], evals[-1]):  # the token metrics' ranges (their values: the fused-loss test above)
        prefix = "eval_" if "eval_loss" in record else ""
        assert 0 < record[prefix + "entropy"] <= math.log(TINY_LLAMA["vocab_size"])
        assert 0 <= record[prefix + "mean_token_accuracy"] <= 1

    final = tmp_path / "run" / "checkpoint-16"
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint-16", "checkpoint-8", "metrics.jsonl"]
    model = AutoModelForCausalLM.from_pretrained(final / "model")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    state = json.loads((final / "trainer_state.json").read_text())
    assert (state["step"], state["steps_per_epoch"], state["epoch"]) == (16, 8, 1)


def test_resume_continues_exactly_as_an_uninterrupted_run(files, tmp_path):
    # 20 steps: one epoch is 16 steps, so the resumed part crosses an epoch boundary
    full = run(files, tmp_path / "full", max_steps=20, save_steps=10, gradient_accumulation_steps=1)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    resumed = run(files, resumed_dir, max_steps=20, save_steps=10,
                  resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-10"))  # fmt: skip
    assert train_records(resumed) == train_records(full)[10:]
    assert [r for r in resumed if "eval_loss" in r] == [r for r in full if "eval_loss" in r]
    expected = weights(tmp_path / "full" / "checkpoint-20")
    got = weights(resumed_dir / "checkpoint-20")
    assert expected.keys() == got.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_auto_resume_rewrites_the_log_after_the_checkpoint_bf16_checkpointed(files, tmp_path):
    out = tmp_path / "run"
    options = {"max_steps": 8, "save_steps": 4, "bf16": True, "gradient_checkpointing": True, "padding_free": True}
    first = run(files, out, save_total_limit=0, **options)
    (out / "checkpoint-8").rename(out / "lost")  # as if the run died after step 8's log, before its checkpoint
    again = run(files, out, resume_from_checkpoint="auto", **options)
    assert again == first


def test_precomputed_reference_equals_the_live_frozen_copy(files, tmp_path):
    precomputed = train_records(run(files, tmp_path / "pre", reference="precompute"))
    live = train_records(run(files, tmp_path / "live", reference="model"))
    for a, b in zip(precomputed, live, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    cached = list((tmp_path / "cache").glob("*.pt"))
    assert len(cached) == 2  # train and eval tables, keyed by model and data
    again = train_records(run(files, tmp_path / "again", reference="precompute"))  # read from the cache
    assert again == precomputed


def test_lora_reference_is_the_base_model_with_adapters_disabled(files, tokenizer, tmp_path):
    lora = {"lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-2}
    adapters = train_records(run(files, tmp_path / "adapters", reference="adapters", **lora))
    precomputed = train_records(run(files, tmp_path / "pre", reference="precompute", **lora))
    for a, b in zip(adapters, precomputed, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert adapters[-1]["rewards/margins"] != 0  # the adapters did train

    from peft import PeftModel

    torch.manual_seed(0)  # the run's random init, as its seed made it
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA))
    policy = PeftModel.from_pretrained(base, tmp_path / "adapters" / "checkpoint-6" / "model")
    model = DPOModel(policy, TrainConfig(model="m", dataset="d"))
    records = [json.loads(line) for line in (files / "train.jsonl").read_text().splitlines()[:4]]
    batch = data.collate(rows_of(tokenizer, records, max_length=32, max_prompt_length=16)[:], False, 0)
    with torch.no_grad():
        trained = model(**batch)
        with policy.disable_adapter():
            disabled = model(**batch)
    torch.manual_seed(0)
    fresh_base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA))
    with torch.no_grad():
        base_logps = DPOModel(fresh_base, TrainConfig(model="m", dataset="d"))(**batch)
    assert not torch.allclose(trained, base_logps)
    torch.testing.assert_close(disabled, base_logps)


@pytest.mark.slow
def test_prefix_sharing_gives_the_unshared_runs_held_out_metrics_on_the_bundled_example(tmp_path):
    """The bundled run (its model, tokenizer, config and 400 held-out pairs; the first 256 training pairs, 8 steps,
    evaluated at 4 and 8) without sharing, with it, and with it packed (``padding_free``): every held-out metric
    (loss, rewards, log-probs, token metrics) within float32 rounding, and so are the final weights (measured:
    metrics within 1.5e-6 relative, weights within 2e-7 by norm)."""
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("\n".join((DEFAULT_DIR / "train.jsonl").read_text().splitlines()[:256]) + "\n")
    runs = {}
    for name, options in {"plain": {}, "shared": {"prefix_sharing": True},
                          "shared-packed": {"prefix_sharing": True, "padding_free": True}}.items():  # fmt: skip
        try:
            train(load_config(None, dataset=str(train_file), max_steps=8, eval_steps=4, warmup_steps=2,
                              output_dir=str(tmp_path / name), reference_cache_dir=str(tmp_path / "cache"),
                              **options))  # fmt: skip
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
        runs[name] = [r for r in logged(tmp_path / name) if "eval_loss" in r]
    beta = load_config().beta
    for name in ("shared", "shared-packed"):
        assert [r["step"] for r in runs[name]] == [r["step"] for r in runs["plain"]] == [4, 8]
        for got, expected in zip(runs[name], runs["plain"]):
            assert got.keys() == expected.keys()
            scale = beta * max(abs(expected["eval_logps/chosen"]), abs(expected["eval_logps/rejected"]))
            for key, value in expected.items():
                floor = scale if "rewards/" in key else 1e-2  # a reward is beta times a difference of log-probs
                assert abs(got[key] - value) <= 1e-5 * max(abs(value), floor), f"{name} {key}: {got[key]} vs {value}"
        final, expected = weights(tmp_path / name / "checkpoint-8"), weights(tmp_path / "plain" / "checkpoint-8")
        for key, value in expected.items():
            assert ((final[key] - value).norm() / value.norm()).item() < 1e-5, f"{name} {key}"


def test_the_reference_cache_key_follows_the_objectives_weights(files, tokenizer):
    """Reference log-probs are the objective's sums (the averaged losses divide them themselves), plain or
    LD-DPO-weighted; each weighting has its own cache entry."""
    from dpo_fast.trainer import reference

    rows = rows_of(tokenizer, [{"prompt": "reverse ab:", "chosen": " ba", "rejected": " ab"}])
    keys = [reference._cache_key(TrainConfig(model=str(files / "model.json"), dataset="d", **options), rows, None)
            for options in ({}, {"loss_type": "hinge"}, {"loss_type": "ipo"}, {"loss_type": "sigmoid_norm"},
                            {"ld_alpha": 0.5}, {"use_weighting": True})]  # fmt: skip
    assert keys[0] == keys[1] == keys[2] == keys[3] == keys[5]  # the same sums
    assert keys[4] != keys[0]  # LD-DPO-weighted
