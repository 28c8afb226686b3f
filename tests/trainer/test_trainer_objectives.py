"""``dpo-fast train``'s objectives: DPO with TRL 1.16's options, CPO / SimPO / AlphaPO, ORPO (``trainer.objective``).

For each family: the model's fused loss against the naive full-logits step (loss and every parameter's gradient,
float32, every layout the trainer collates), the reference pass in the objective's units, a tiny run end to end
with TRL's metric names, and the bad combinations refused in one line (exit status 2).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import datasets
from accelerate.state import AcceleratorState
from trainer_helpers import TINY_LLAMA, flags, logged, run, run_values, train_records, write_tiny_files
from transformers import AutoConfig, AutoModelForCausalLM

from dpo_fast import objectives
from dpo_fast.trainer import TrainConfig, cli, data
from dpo_fast.trainer.model import DPOModel


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_files(tmp_path_factory.mktemp("tiny"), train_rows=32, eval_rows=8)


# ---------------------------------------------------------------------------------------------- the naive step


def naive_sums(model, batch, ld_alpha=None):
    """From the full (2P, T, V) logits: per-token log-probs (2P, T), the completion mask, and per sequence the
    LD-DPO-weighted log-prob sums (TRL 1.16: the first min(c, r) completion tokens of a pair weigh 1, the rest
    ``ld_alpha``) and the completion token counts; and the log-softmax itself."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"]
    valid = labels != data.IGNORE_INDEX
    log_probs = logits.log_softmax(-1)
    token_logps = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    counts = valid.sum(-1)
    weights = valid.float()
    if ld_alpha is not None:
        shared = torch.minimum(*counts.chunk(2)).repeat(2)
        position = valid.long().cumsum(-1)
        weights = torch.where(valid & (position > shared[:, None]), ld_alpha, weights)
    return (token_logps * weights).sum(-1), counts.float(), token_logps, valid, log_probs


def chosen_nll(token_logps, valid):
    """The mean NLL of the chosen completion tokens (TRL's sft / CPO NLL)."""
    chosen = valid.clone()
    chosen[chosen.shape[0] // 2 :] = False
    return -(token_logps * chosen).sum() / chosen.sum()


def naive_dpo_mixed(model, batch, ref):
    """``loss_type: [sigmoid_norm, sft]``, ``loss_weights: [1, 0.5]``, ``ld_alpha: 0.5`` (TRL 1.16's formulas):
    sigmoid on length-averaged LD-weighted log-ratios, plus half the chosen NLL (unweighted by LD-DPO)."""
    logps, counts, token_logps, valid, _ = naive_sums(model, batch, ld_alpha=0.5)
    ratios = logps / counts - ref  # the reference in the objective's units: averaged too
    chosen, rejected = ratios.chunk(2)
    return -F.logsigmoid(0.5 * (chosen - rejected)).mean() + 0.5 * chosen_nll(token_logps, valid)


def naive_dpo_aot(model, batch, ref):
    """``loss_type: aot``, ``label_smoothing: 0.1``: cDPO's sigmoid of the sorted policy margins minus the sorted
    reference margins, across the micro-batch."""
    logps, *_ = naive_sums(model, batch)
    margins = torch.sort(torch.sub(*logps.chunk(2))).values - torch.sort(torch.sub(*ref.chunk(2))).values
    return (-0.9 * F.logsigmoid(0.5 * margins) - 0.1 * F.logsigmoid(-0.5 * margins)).mean()


def naive_dpo_wpo_js(model, batch, ref):
    """``use_weighting`` (WPO) with ``f_divergence_type: js_divergence``: the core's formula (tested against TRL's
    own code in tests/api/test_objectives_dpo.py) on per-token values from the full logits."""
    _, _, token_logps, valid, log_probs = naive_sums(model, batch)
    rows, length = valid.shape
    segment_ids = torch.arange(rows).repeat_interleave(length)
    objective = objectives.dpo_objective("sigmoid", beta=0.5, use_weighting=True, f_divergence_type="js_divergence")
    weights = objectives.token_weights(objective, valid.reshape(-1), segment_ids, rows)
    seqs = objectives.sequence_inputs(
        token_logps.reshape(-1), segment_ids, rows, weights, ref_logps=ref,
        log_sum_sq_probs=torch.logsumexp(2 * log_probs, -1).reshape(-1),
    )  # fmt: skip
    return objectives.objective_loss(objective, seqs, objectives.BatchConstants(num_units=rows // 2)).float()


def naive_simpo_alpha(model, batch, ref):
    """``objective: cpo``, ``loss_type: simpo``, ``simpo_gamma: 0.5``, ``alpha: 0.3`` (AlphaPO), ``cpo_alpha: 0.5``:
    TRL's CPOTrainer.cpo_loss on averaged log-probs, plus 0.5 times the chosen NLL."""
    logps, counts, token_logps, valid, _ = naive_sums(model, batch)
    probs = torch.exp(logps / counts)
    rewards = (1 - probs.pow(-0.3)) / 0.3
    margin = torch.sub(*rewards.chunk(2)) - 0.5 / 0.5
    return -F.logsigmoid(0.5 * margin).mean() + 0.5 * chosen_nll(token_logps, valid)


def naive_orpo(model, batch, ref):
    """TRL's ORPOTrainer: cross-entropy of the chosen rows over every next token (prompt and completion), minus
    ``beta`` times the mean logsigmoid of the log odds ratio of the averaged completion log-probs."""
    logps, counts, _, _, log_probs = naive_sums(model, batch)
    chosen, rejected = (logps / counts).chunk(2)
    log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
    pairs = batch["input_ids"].shape[0] // 2
    targets = batch["input_ids"][:pairs, 1:]
    has_next = batch["attention_mask"][:pairs, 1:].bool()
    next_logps = log_probs[:pairs, :-1].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    nll = -next_logps[has_next].mean()
    return nll - 0.5 * F.logsigmoid(log_odds).mean()


# name: (config keys, naive step, the reference's units as (averaged, ld_alpha) or None without a reference)
CASES = {
    "dpo-sigmoid_norm+sft-ld_alpha": (
        {"loss_type": "sigmoid_norm,sft", "loss_weights": "1,0.5", "ld_alpha": 0.5}, naive_dpo_mixed, (True, 0.5)
    ),
    "dpo-aot": ({"loss_type": "aot", "label_smoothing": 0.1}, naive_dpo_aot, (False, None)),
    "dpo-wpo-js": ({"use_weighting": True, "f_divergence_type": "js_divergence"}, naive_dpo_wpo_js, (False, None)),
    "simpo-alphapo": (
        {"objective": "cpo", "loss_type": "simpo", "simpo_gamma": 0.5, "alpha": 0.3, "cpo_alpha": 0.5},
        naive_simpo_alpha, None,
    ),
    "orpo": ({"objective": "orpo"}, naive_orpo, None),
}  # fmt: skip


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**TINY_LLAMA, "tie_word_embeddings": False}))


def tokenized(tokenizer, files, count=4):
    records = [json.loads(line) for line in (files / "train.jsonl").read_text().splitlines()[:count]]
    options = {"max_length": None, "max_prompt_length": None}
    return data.tokenize(datasets.Dataset.from_list(records), tokenizer, name="test", **options)[:]


@pytest.mark.parametrize("case", CASES)
def test_the_fused_loss_of_each_objective_equals_the_naive_step(tokenizer, files, case):
    """Loss and every parameter's gradient (float32) in every layout the trainer collates: padded (the reference
    backend and torch), packed, and the prefix shared (padded and packed) where the objective allows it."""
    keys, naive, _ = CASES[case]
    rows = tokenized(tokenizer, files)
    padded = data.collate(rows, padding_free=False, pad_id=tokenizer.pad_token_id)
    layouts = [("reference", padded), ("torch", padded), ("torch", data.collate(rows, True, tokenizer.pad_token_id))]
    if keys.get("objective") != "orpo":  # ORPO refuses prefix sharing (its NLL covers the prompt)
        layouts += [("torch", data.collate(rows, free, tokenizer.pad_token_id, prefix_sharing=True))
                    for free in (False, True)]  # fmt: skip
    model = tiny_llama()
    averaged, ld_alpha = CASES[case][2] or (False, None)
    with torch.no_grad():  # reference sums near the policy's, so that every term acts; the naive step's units
        logps, counts, *_ = naive_sums(model, padded, ld_alpha)
        ref = logps + 0.5 * torch.randn(8, generator=torch.Generator().manual_seed(1))
        naive_ref = ref / counts if averaged else ref

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    expected_loss, expected_grads = loss_and_grads(lambda: naive(model, padded, naive_ref))
    for backend, batch in layouts:
        policy = DPOModel(model, TrainConfig(model="m", dataset="d", backend=backend, beta=0.5, **keys))
        loss, grads = loss_and_grads(lambda policy=policy, batch=batch: policy(**batch, ref_logps=ref).loss)
        layout = f"{backend} {sorted(batch)}"
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6, msg=layout)
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"{layout} {name}")


@pytest.mark.parametrize("case", [case for case, (_, _, units) in CASES.items() if units is not None])
def test_the_reference_pass_gives_the_objectives_sums(tokenizer, files, case):
    """The reference is the policy's sums as the objective takes them: LD-DPO-weighted with ``ld_alpha``, plain
    otherwise (the averaged losses divide by the counts themselves); in every layout."""
    keys, _, (_averaged, ld_alpha) = CASES[case]
    rows = tokenized(tokenizer, files)
    padded = data.collate(rows, padding_free=False, pad_id=tokenizer.pad_token_id)
    model = tiny_llama()
    with torch.no_grad():
        expected, *_ = naive_sums(model, padded, ld_alpha)
        for layout in (padded, data.collate(rows, True, tokenizer.pad_token_id),
                       data.collate(rows, False, tokenizer.pad_token_id, prefix_sharing=True)):  # fmt: skip
            got = DPOModel(model, TrainConfig(model="m", dataset="d", backend="torch", **keys))(**layout)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=str(sorted(layout)))


def naive_kto(model, batch, ref, kl, beta=0.5, desirable_weight=1.5):
    """TRL's KTOTrainer._compute_loss on the 2P completions (the P chosen desirable), summed log-probs."""
    logps, *_ = naive_sums(model, batch)
    chosen, rejected = (logps - ref).chunk(2)
    losses = torch.cat([desirable_weight * (1 - torch.sigmoid(beta * (chosen - kl))),
                        1 - torch.sigmoid(beta * (kl - rejected))])  # fmt: skip
    return losses.mean()


def test_the_fused_kto_loss_equals_the_naive_step(tokenizer, files):
    rows = tokenized(tokenizer, files)
    padded = data.collate(rows, padding_free=False, pad_id=tokenizer.pad_token_id)
    model = tiny_llama()
    with torch.no_grad():
        ref = naive_sums(model, padded)[0] + 0.5 * torch.randn(8, generator=torch.Generator().manual_seed(1))
    kl = torch.tensor(0.3, dtype=torch.float64)

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    expected_loss, expected_grads = loss_and_grads(lambda: naive_kto(model, padded, ref, kl.float()))
    for backend, batch in [("reference", padded), ("torch", padded),
                           ("torch", data.collate(rows, True, tokenizer.pad_token_id))]:  # fmt: skip
        keys = {"objective": "kto", "desirable_weight": 1.5, "backend": backend, "beta": 0.5}
        policy = DPOModel(model, TrainConfig(model="m", dataset="d", **keys))
        loss, grads = loss_and_grads(lambda policy=policy, batch=batch: policy(**batch, ref_logps=ref, kl=kl).loss)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6, msg=backend)
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"{backend} {name}")
        with torch.no_grad():  # KTO's reference: summed log-probs
            torch.testing.assert_close(policy(**batch), naive_sums(model, padded)[0], rtol=1e-5, atol=1e-5)


def test_kto_mismatched_rows_rotate_the_completions_as_trl():
    """TRL's ``add_kl_completion_ids`` on the unpaired batch (chosen completions, then rejected):
    ``[c[-1]] + c[:-1]``; each sequence keeps its own prompt."""
    rows = {"prompt_ids": [[1], [2, 2]], "chosen_ids": [[10], [11]], "rejected_ids": [[20], [21, 21, 21]]}
    kl_rows = data.mismatched(rows, max_length=4)
    assert kl_rows["prompt_ids"] == [[1], [2, 2]]
    unpaired = rows["chosen_ids"] + rows["rejected_ids"]
    trl_rotated = [unpaired[-1]] + unpaired[:-1]
    assert kl_rows["chosen_ids"] == [trl_rotated[0][:3], trl_rotated[1]]  # cut to max_length - len(prompt)
    assert kl_rows["rejected_ids"] == trl_rotated[2:]


# ---------------------------------------------------------------------------------------------- whole runs

PAIR_KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"}  # fmt: skip


def finite_records(out):
    records = logged(out)
    for record in records:
        assert all(math.isfinite(value) for value in record.values()), record
    return train_records(records), [r for r in records if "eval_loss" in r]


def test_dpo_options_from_a_yaml_list_run_end_to_end(files, tmp_path, capsys):
    """``loss_type: [sigmoid, sft]`` with ``loss_weights``, ``ld_alpha`` and an f-divergence, as a YAML file."""
    config = tmp_path / "run.yaml"
    values = run_values(files, tmp_path / "out", max_steps=4, eval_steps=2)
    config.write_text("\n".join(f"{key}: {json.dumps(value)}" for key, value in values.items()) + "\n"
                      "loss_type: [sigmoid, sft]\nloss_weights: [1.0, 0.25]\nld_alpha: 0.7\n"
                      "f_divergence_type: alpha_divergence\nf_alpha_divergence_coef: 0.3\n")  # fmt: skip
    try:
        assert cli.main(["train", "--config", str(config)]) == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    steps, evals = finite_records(tmp_path / "out")
    assert PAIR_KEYS <= set(steps[0]) and [r["step"] for r in evals] == [2, 4]
    # step 1 runs the initial policy, which the precomputed reference is: the sigmoid term is log 2, the sft term > 0
    assert abs(steps[0]["rewards/margins"]) < 1e-6 and steps[0]["loss"] > math.log(2) + 0.1
    saved = json.loads((tmp_path / "out" / "checkpoint-4" / "trainer_state.json").read_text())["config"]
    assert (saved["loss_type"], saved["loss_weights"], saved["ld_alpha"]) == ("sigmoid,sft", "1.0,0.25", 0.7)


def test_sft_alone_and_aot_run_without_a_reference(files, tmp_path):
    """``sft`` alone reads no reference (none is computed or cached); ``aot`` sorts across the micro-batch with
    ``reference: none`` (reference-free)."""
    sft = run(files, tmp_path / "sft", loss_type="sft", max_steps=4)
    steps = train_records(sft)
    assert steps[-1]["loss"] < steps[0]["loss"]  # the NLL of the chosen completions falls
    assert not (tmp_path / "cache").exists()
    aot = train_records(run(files, tmp_path / "aot", loss_type="aot", reference="none", max_steps=4))
    beta = TrainConfig.default("beta")
    for record in aot:  # reference-free: the rewards are beta times the policy's log-probs
        assert record["rewards/chosen"] == pytest.approx(beta * record["logps/chosen"], rel=1e-5)
        assert math.isfinite(record["loss"])


@pytest.mark.parametrize(
    "keys, extra",
    [
        ({"objective": "cpo"}, {"nll_loss"}),
        ({"objective": "cpo", "loss_type": "simpo", "cpo_alpha": 0.0}, set()),
        ({"objective": "orpo", "padding_free": True}, {"nll_loss", "log_odds_ratio", "log_odds_chosen"}),
    ],
)
def test_reference_free_objectives_run_end_to_end_with_trls_metric_names(files, tmp_path, keys, extra):
    run(files, tmp_path / "out", max_steps=4, eval_steps=4, **keys)
    steps, evals = finite_records(tmp_path / "out")
    assert set(steps[0]) - {"step", "epoch", "learning_rate", "grad_norm"} == PAIR_KEYS | extra
    assert set(evals[0]) - {"step", "epoch"} == {"eval_" + key for key in PAIR_KEYS | extra}
    assert not (tmp_path / "cache").exists()  # no reference pass
    beta = TrainConfig.default("beta")
    for record in steps:  # CPO's and ORPO's rewards are beta times the policy's (averaged for SimPO, ORPO) log-probs
        assert record["rewards/chosen"] == pytest.approx(beta * record["logps/chosen"], rel=1e-5)
        if keys["objective"] == "orpo":  # TRL's loss = nll_loss - beta * log_odds_ratio, each a batch mean
            assert record["loss"] == pytest.approx(record["nll_loss"] - beta * record["log_odds_ratio"], rel=1e-5)


@pytest.mark.parametrize("reference", ["model", "adapters"])
def test_kto_logs_trls_kl_estimate_of_the_steps_mismatched_batch(files, tokenizer, tmp_path, reference):
    """The logged ``kl`` of steps 2 and 3 is TRL's estimate recomputed from full logits: the previous step's policy
    (its checkpoint) and the initial model on the step's rows with the completions rotated by one, mean
    difference clamped at 0."""
    lora = {"lora_r": 4, "lora_alpha": 8} if reference == "adapters" else {}
    out = tmp_path / "kto"
    # desirable_weight 4 pulls the completions' log-probs up, so that the KL estimate leaves its clamp at 0
    records = run(files, out, objective="kto", reference=reference, max_steps=3, save_steps=1, learning_rate=3e-2,
                  desirable_weight=4.0, save_total_limit=0, **lora)  # fmt: skip
    steps, evals = train_records(records), [r for r in records if "eval_loss" in r]
    keys = {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl",
            "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"}  # fmt: skip
    assert set(steps[0]) - {"step", "epoch", "learning_rate", "grad_norm"} == keys
    assert set(evals[0]) - {"step", "epoch"} == {"eval_" + key for key in keys}
    # step 1: the policy is its reference, so every log-ratio and the KL estimate are 0, the loss the mean weight
    # (4 desirable, 1 undesirable) times 1 - sigmoid(0)
    assert steps[0]["kl"] == 0 and steps[0]["loss"] == pytest.approx(0.5 * (4 + 1) / 2, abs=1e-6)

    cfg = TrainConfig(**run_values(files, out))
    train_rows = data.tokenize(data.load_rows(cfg.dataset, "train"), tokenizer, cfg.max_length,
                               cfg.max_prompt_length, "train")  # fmt: skip
    torch.manual_seed(0)  # the run's random init, as its seed made it
    initial = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_LLAMA))

    def summed_logps(model, prompts, sequences):
        total = []
        with torch.no_grad():
            for prompt, sequence in zip(prompts, sequences):
                logits = model(input_ids=torch.tensor([sequence])).logits[0, :-1].float()
                token_logps = logits.log_softmax(-1).gather(-1, torch.tensor(sequence[1:])[:, None])[:, 0]
                total.append(token_logps[len(prompt) - 1 :].sum())
        return torch.stack(total)

    estimates = []
    for step in (2, 3):
        rows = train_rows[data.epoch_batches(len(train_rows), cfg.per_device_train_batch_size, cfg.seed, 0)[step - 1]]
        prompts = rows["prompt_ids"] * 2
        unpaired = rows["chosen_ids"] + rows["rejected_ids"]
        rotated = [unpaired[-1]] + unpaired[:-1]  # TRL's KL_completion_ids
        sequences = [p + c[: cfg.max_length - len(p)] for p, c in zip(prompts, rotated)]
        if lora:
            from peft import AutoPeftModelForCausalLM

            policy = AutoPeftModelForCausalLM.from_pretrained(out / f"checkpoint-{step - 1}" / "model")
        else:
            policy = AutoModelForCausalLM.from_pretrained(out / f"checkpoint-{step - 1}" / "model")
        difference = summed_logps(policy, prompts, sequences) - summed_logps(initial, prompts, sequences)
        estimates.append(difference.mean().clamp(min=0).item())
        assert steps[step - 1]["kl"] == pytest.approx(estimates[-1], rel=1e-4, abs=1e-6), step
    assert max(estimates) > 1e-3  # the steps moved the policy: not only the trivial 0 is checked


def test_kto_without_its_kl_and_reference_free_runs(files, tmp_path):
    """``apo_zero_unpaired`` needs no KL (its reference is precomputed by default) and logs kl 0, as TRL;
    ``reference: none`` trains KTO reference-free."""
    apo = train_records(run(files, tmp_path / "apo", objective="kto", loss_type="apo_zero_unpaired", max_steps=3))
    assert all(record["kl"] == 0 for record in apo) and len(list((tmp_path / "cache").glob("*.pt"))) == 2
    free = train_records(run(files, tmp_path / "free", objective="kto", reference="none", max_steps=3))
    beta = TrainConfig.default("beta")
    for record in free:
        assert record["rewards/chosen"] == pytest.approx(beta * record["logps/chosen"], rel=1e-5)


# ---------------------------------------------------------------------------------------------- bad combinations


def test_reference_auto_picks_what_the_objective_reads_and_none_stays_a_mode():
    def mode(**keys):
        return TrainConfig(model="m", dataset="d", **keys).reference_mode

    assert mode() == mode(loss_type="hinge,sft") == "precompute"
    assert mode(loss_type="sft") == mode(objective="cpo") == mode(objective="orpo") == "none"
    assert mode(reference="none") == "none"  # reference-free DPO ('none' is a mode here, not null)
    assert mode(reference="model") == "model"
    # KTO's KL estimate needs its reference live: a frozen copy, or the adapters disabled
    assert mode(objective="kto") == "model" and mode(objective="kto", lora_r=4) == "adapters"
    assert mode(objective="kto", loss_type="apo_zero_unpaired") == "precompute"


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"objective": "cpo", "reference": "model"},
         ("reference='model' conflicts with objective='cpo', which reads no reference: remove reference (or set it "
          "to auto or none)")),
        ({"reference": "ref"}, "reference must be one of auto | precompute | model | adapters | none, got 'ref'"),
        ({"loss_type": "sft", "reference": "precompute"}, "reference='precompute' conflicts with loss_type='sft' alone"),
        ({"objective": "orpo", "loss_type": "sigmoid"}, "objective='orpo' has one loss and takes no loss_type"),
        ({"objective": "kto", "reference": "precompute"}, ("reference='precompute' cannot serve objective='kto' with "
         "loss_type='kto': its KL estimate pairs each prompt with another completion of the same micro-batch")),
        ({"objective": "kto", "prefix_sharing": True}, "prefix_sharing: objective='kto' runs single completions"),
        ({"objective": "kto", "loss_type": "sigmoid"}, "loss_type must be one of ('kto', 'apo_zero_unpaired')"),
        ({"objective": "cpo", "desirable_weight": 2.0}, "desirable_weight applies to objective kto, not 'cpo'"),
        ({"loss_type": "kto"}, "loss_type 'kto' is KTO's (unpaired): set objective to 'kto'"),
        ({"objective": "cpo", "ld_alpha": 0.5}, "ld_alpha applies to objective dpo, not 'cpo'"),
        ({"objective": "orpo", "label_smoothing": 0.1}, "label_smoothing applies to objective dpo | cpo, not 'orpo'"),
        ({"objective": "dpo", "simpo_gamma": 1.0}, "simpo_gamma applies to objective cpo, not 'dpo'"),
        ({"objective": "cpo", "loss_type": "simpo,hinge"}, "objective='cpo' takes one loss_type"),
        ({"objective": "cpo", "loss_type": "robust"}, "loss_type must be one of ('sigmoid', 'hinge', 'ipo', 'simpo')"),
        ({"objective": "ppo"}, "objective must be one of dpo | cpo | orpo | kto, got 'ppo'"),
        ({"loss_type": "sigmoid,sft", "loss_weights": "1"}, "loss_weights must have one weight per loss_type"),
        ({"loss_type": "sigmoid,sft", "loss_weights": "1,x"}, "loss_weights must be numbers separated by commas"),
        ({"loss_type": "apo_zero", "f_divergence_type": "js_divergence"}, "f_divergence_type='js_divergence' applies"),
        ({"loss_type": "aot", "use_weighting": True}, "use_weighting=True (WPO) cannot weight ['aot']"),
        ({"ld_alpha": 1.5}, "ld_alpha must lie in [0, 1]"),
        ({"objective": "orpo", "prefix_sharing": True}, "prefix_sharing: objective='orpo' takes its NLL over"),
    ],
)  # fmt: skip
def test_bad_objective_combinations_are_one_line_exit_2(files, tmp_path, capsys, keys, message):
    values = {**run_values(files, tmp_path / "out"), **keys}
    try:
        status = cli.main(["train", *flags(values)])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert status == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr
    assert message in errors[0]
    assert not (tmp_path / "out").exists()
