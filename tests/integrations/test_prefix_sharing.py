"""Prefix sharing (``dpo_fast.integrations.prefix_sharing``) against the computation without sharing.

The oracle is written here, independently of the module: 2P right-padded sequences ``prompt +
completion`` (chosen first) through the model's decoder with its 2D padding mask, labels shifted
onto the completion tokens, ``fused_linear_dpo_loss`` / ``sequence_logps`` on the padded layout;
this is what the trainer and TRL compute today. Both sides run the same float32 model and may
differ only in the order of floating-point summation: log-probs, loss and every parameter's
gradient must agree within 1e-5 relative (elementwise, with an absolute floor of 1e-5 times the
tensor's largest magnitude for entries near zero). The negative controls show that a layout one
step off (rejected positions after chosen, rejected seeing chosen, no sliding window) breaks that.
"""

from __future__ import annotations

import dataclasses

import datasets
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import dpo_fast
from dpo_fast.integrations import hf
from dpo_fast.integrations.prefix_sharing import (
    CHOSEN,
    REJECTED,
    AttentionPlan,
    SharedPrefixBatch,
    check_model,
    collate_shared,
    pairs_from_trl_batch,
    shared_attention_mask,
)
from dpo_fast.trainer import data
from dpo_fast.trainer.config import DEFAULT_DIR

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

IGNORE = -100
VOCAB = 48
MAX_PROMPT = 8
BETA = 0.5
TINY = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 64,
        "initializer_range": 0.2}  # fmt: skip
# (model_type, config overrides); the sliding windows (3 tokens) are shorter than the sequences
FAMILIES = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "gemma": ("gemma", {}),
    "qwen2-sliding": ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}),
    "mistral-sliding": ("mistral", {"sliding_window": 3}),
    "gemma2": ("gemma2", {"sliding_window": 3, "final_logit_softcapping": 5.0, "attn_logit_softcapping": 10.0}),
    "gemma3": ("gemma3_text", {"sliding_window": 3, "layer_types": ["sliding_attention", "full_attention"]}),
}
# (prompt, chosen, rejected) lengths: a prompt at MAX_PROMPT, empty and one-token completions
PAIR_LENGTHS = [(6, 3, 4), (MAX_PROMPT, 1, 2), (3, 0, 2), (5, 2, 0), (MAX_PROMPT, 5, 1)]
# (pairs_per_row, padding_side): one padded row per pair, two pairs per row left-padded, all in one row
LAYOUTS = {"padded-right": (1, "right"), "two-per-row-left": (2, "left"), "packed": (None, "right")}


def tiny_model(family: str, attn_implementation: str = "sdpa", **changes) -> torch.nn.Module:
    model_type, overrides = FAMILIES[family]
    config = AutoConfig.for_model(model_type, **{**TINY, **overrides, **changes})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)


def random_rows(seed: int = 0) -> dict[str, list[list[int]]]:
    """Random token ids of ``PAIR_LENGTHS``, as the trainer's tokenized rows hold them."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(1, VOCAB, (n,), generator=gen).tolist()

    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    return {key: [ids(lengths[i]) for lengths in PAIR_LENGTHS] for i, key in enumerate(keys)}


def head_of(model):
    return model.get_output_embeddings().weight, getattr(model.config, "final_logit_softcapping", None)


def unshared_batch(rows, device="cpu") -> dict[str, torch.Tensor]:
    """The layout without sharing: (2P, T) right-padded prompt + completion, chosen first, shifted labels."""
    prompts, completions = rows["prompt_ids"] * 2, rows["chosen_ids"] + rows["rejected_ids"]
    sequences = [p + c for p, c in zip(prompts, completions)]
    length = max(map(len, sequences))
    labels = [[seq[t + 1] if len(p) <= t + 1 < len(seq) else IGNORE for t in range(length)]
              for p, seq in zip(prompts, sequences)]  # fmt: skip
    return {
        "input_ids": torch.tensor([s + [0] * (length - len(s)) for s in sequences], device=device),
        "attention_mask": torch.tensor([[1] * len(s) + [0] * (length - len(s)) for s in sequences], device=device),
        "labels": torch.tensor(labels, device=device),
    }


def shared_hidden(model, batch: SharedPrefixBatch) -> torch.Tensor:
    """(M, H) the loss rows of the shared layout, as the trainers run it (``hf.head_rows``)."""
    return hf.head_rows(model, shared=batch).hidden


def unshared_hidden(model, batch) -> torch.Tensor:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    return model.get_decoder()(**inputs, use_cache=False).last_hidden_state


def dpo_step(model, hidden, labels, ref, **packed):
    """Loss and log-probs of the fused loss, then every parameter's gradient."""
    weight, softcap = head_of(model)
    pairs = ref.shape[0] // 2
    model.zero_grad()
    out = dpo_fast.fused_linear_dpo_loss(
        hidden, weight, labels, ref_chosen_logps=ref[:pairs], ref_rejected_logps=ref[pairs:], beta=BETA,
        softcap=softcap, backend="torch", **packed,
    )  # fmt: skip
    out.loss.backward()
    values = {"loss": out.loss, "chosen_logps": out.chosen_logps, "rejected_logps": out.rejected_logps}
    return {k: v.detach() for k, v in values.items()}, {n: p.grad.clone() for n, p in model.named_parameters()}


def shared_step(model, rows, ref, **layout):
    batch = collate_shared(rows, pad_id=0, **layout).to(model.device)
    return shared_step_of(model, batch, ref, shared_hidden(model, batch))


def shared_step_of(model, batch: SharedPrefixBatch, ref, hidden):
    return dpo_step(model, hidden, batch.labels, ref, segment_ids=batch.segment_ids, num_pairs=batch.num_pairs)


def unshared_step(model, rows, ref):
    batch = unshared_batch(rows, model.device)
    return dpo_step(model, unshared_hidden(model, batch), batch["labels"], ref)


def reference_logps(pairs: int, device="cpu") -> torch.Tensor:
    return (-20 + 3 * torch.randn(2 * pairs, generator=torch.Generator().manual_seed(1))).to(device)


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equal up to float32 summation order: 1e-5 relative, absolute floor 1e-5 x the largest magnitude."""
    floor = 1e-5 * max(expected.abs().max().item(), 1e-30) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=floor, msg=lambda m: f"{what}: {m}")


def assert_steps_equal(shared, unshared) -> None:
    (values, grads), (expected_values, expected_grads) = shared, unshared
    for name, expected in expected_values.items():
        assert_same(values[name], expected, name)
    for name, expected in expected_grads.items():
        assert_same(grads[name], expected, f"grad of {name}")


# ---------------------------------------------------------------------------------------------- the layout


def test_layout_of_two_pairs_left_padded_and_packed():
    rows = {"prompt_ids": [[1, 2], [3]], "chosen_ids": [[4, 5], []], "rejected_ids": [[6], [7, 8]]}
    padded = collate_shared(rows, pad_id=0, pairs_per_row=1, padding_side="left")
    assert padded.input_ids.tolist() == [[1, 2, 4, 5, 6], [0, 0, 3, 7, 8]]
    assert padded.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 0, 0, 1, 2]]
    assert padded.pair_ids.tolist() == [[0, 0, 0, 0, 0], [-1, -1, 1, 1, 1]]
    assert padded.parts.tolist() == [[0, 0, 1, 1, 2], [-1, -1, 0, 2, 2]]
    # chosen 4, 5 by the rows of 2, 4; rejected 6 by the row of 2 again; pair 1: rejected 7, 8 by 3, 7
    assert padded.target_rows.tolist() == [1, 2, 1, 7, 8]
    assert padded.labels.tolist() == [4, 5, 6, 7, 8]
    assert padded.segment_ids.tolist() == [0, 0, 2, 3, 3]
    packed = collate_shared(rows, pad_id=0, pairs_per_row=None, pad_to_multiple_of=4)
    assert packed.input_ids.tolist() == [[1, 2, 4, 5, 6, 3, 7, 8]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1, 2]]
    assert packed.target_rows.tolist() == [1, 2, 1, 5, 6]
    assert packed.num_pairs == 2


def test_mask_of_a_pair_with_padding_and_a_window():
    rows = {"prompt_ids": [[1, 2, 3]], "chosen_ids": [[4, 5]], "rejected_ids": [[6, 7]]}
    batch = collate_shared(rows, pad_id=0, pad_to_multiple_of=8)  # 7 tokens and one padding
    q, kv = torch.arange(8)[:, None], torch.arange(8)[None, :]
    expected = [
        [1, 0, 0, 0, 0, 0, 0, 0],  # prompt
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],  # chosen: prompt and itself
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0],  # rejected: prompt and itself, never chosen
        [1, 1, 1, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 1],  # padding: itself only
    ]
    assert batch.visible(0, q, kv).int().tolist() == expected
    # a window of 2 positions: rejected's second token (position 4) sees positions 3 and 4, i.e. prompt[2] is out
    windowed = batch.visible(0, q, kv, window=2).int()
    assert windowed[6].tolist() == [0, 0, 0, 0, 0, 1, 1, 0]
    assert windowed[5].tolist() == [0, 0, 1, 0, 0, 1, 0, 0]


def test_the_loss_rows_are_the_unshared_ones():
    """Each label and its hidden state's token are those of the unshared layout, in the same order."""
    rows = random_rows()
    batch = collate_shared(rows, pad_id=0, pairs_per_row=2, padding_side="left")
    unshared = unshared_batch(rows)
    valid = unshared["labels"] != IGNORE
    pairs = len(PAIR_LENGTHS)
    order = torch.tensor([(s % pairs) * 2 + s // pairs for s in range(2 * pairs)])  # by pair, chosen first
    rank = order.repeat_interleave(valid.sum(1))
    keep = torch.argsort(rank, stable=True)
    assert batch.labels.tolist() == unshared["labels"][valid][keep].tolist()
    assert batch.input_ids.flatten()[batch.target_rows].tolist() == unshared["input_ids"][valid][keep].tolist()
    segment_of_row = torch.arange(2 * pairs).repeat_interleave(valid.sum(1))
    assert batch.segment_ids.tolist() == segment_of_row[keep].tolist()


# ---------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma"])
def test_shared_step_equals_the_unshared_step(family, attn, layout):
    model, rows = tiny_model(family, attn), random_rows()
    pairs_per_row, side = LAYOUTS[layout]
    ref = reference_logps(len(PAIR_LENGTHS))
    assert_steps_equal(
        shared_step(model, rows, ref, pairs_per_row=pairs_per_row, padding_side=side), unshared_step(model, rows, ref)
    )


@pytest.mark.parametrize("family", ["qwen2-sliding", "mistral-sliding", "gemma2", "gemma3"])
def test_sliding_windows_are_shared_exactly(family):
    """Windows of 3 positions, shorter than every sequence: the shared mask applies them to positions."""
    model, rows = tiny_model(family, "eager" if family == "gemma2" else "sdpa"), random_rows()
    ref = reference_logps(len(PAIR_LENGTHS))
    for pairs_per_row, side in LAYOUTS.values():
        shared = shared_step(model, rows, ref, pairs_per_row=pairs_per_row, padding_side=side)
        assert_steps_equal(shared, unshared_step(model, rows, ref))


def test_an_empty_prompt_leaves_the_first_tokens_unpredicted_as_without_sharing():
    rows = {"prompt_ids": [[], [5, 6]], "chosen_ids": [[1, 2, 3], [7]], "rejected_ids": [[4], [8, 9]]}
    model, ref = tiny_model("llama"), reference_logps(2)
    assert_steps_equal(shared_step(model, rows, ref, pairs_per_row=None), unshared_step(model, rows, ref))


@pytest.mark.parametrize("average_log_prob", [False, True])
def test_reference_pass_shares_the_prefix(average_log_prob):
    """Forward only, as a reference model runs: per-sequence sums (or means, ipo) of the log-probs."""
    model, rows = tiny_model("qwen3"), random_rows(seed=3)
    weight, softcap = head_of(model)
    options = {"average_log_prob": average_log_prob, "softcap": softcap, "backend": "torch"}
    with torch.no_grad():
        unshared = unshared_batch(rows)
        expected = dpo_fast.sequence_logps(unshared_hidden(model, unshared), weight, unshared["labels"], **options)
        batch = collate_shared(rows, pad_id=0, pairs_per_row=None)
        logps = dpo_fast.sequence_logps(
            shared_hidden(model, batch), weight, batch.labels, segment_ids=batch.segment_ids,
            num_segments=2 * batch.num_pairs, **options,
        )  # fmt: skip
    assert_same(logps, expected, "reference log-probs")


@pytest.mark.slow
def test_flex_attention_reference_pass_on_cpu():
    """flex_attention with a BlockMask per layer type (full and sliding), forward only: PyTorch has no CPU backward.

    Transformers compiles flex_attention: about 30 s of CPU the first time (then inductor's cache).
    """
    model, rows = tiny_model("qwen2-sliding", "flex_attention").eval(), random_rows(seed=4)
    weight, softcap = head_of(model)
    batch = collate_shared(rows, pad_id=0, pairs_per_row=None, pad_to_multiple_of=64)  # one shape to compile
    with torch.no_grad():
        mask = shared_attention_mask(model, batch)
        assert {kind: type(m).__name__ for kind, m in mask.items()} == {
            "full_attention": "BlockMask",
            "sliding_attention": "BlockMask",
        }
        logps = dpo_fast.sequence_logps(shared_hidden(model, batch), weight, batch.labels, softcap=softcap,
                                        segment_ids=batch.segment_ids, num_segments=2 * batch.num_pairs)  # fmt: skip
        model.set_attn_implementation("sdpa")
        unshared = unshared_batch(rows)
        expected = dpo_fast.sequence_logps(
            unshared_hidden(model, unshared), weight, unshared["labels"], softcap=softcap
        )
    assert_same(logps, expected, "reference log-probs through flex_attention")


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["llama", "qwen2-sliding", "gemma2"])
def test_flex_attention_training_on_gpu(family):
    """flex_attention's training path (BlockMask, backward) against the unshared step with eager attention."""
    model, rows = tiny_model(family, "flex_attention", head_dim=16).cuda(), random_rows()  # tl.dot: dims >= 16
    ref = reference_logps(len(PAIR_LENGTHS), "cuda")
    shared = shared_step(model, rows, ref, pairs_per_row=None)
    model.set_attn_implementation("eager")
    assert_steps_equal(shared, unshared_step(model, rows, ref))


# ---------------------------------------------------------------------------------------------- the two inputs


def test_trainer_rows_with_prompts_cut_at_max_prompt_length():
    tokenizer = AutoTokenizer.from_pretrained(str(DEFAULT_DIR / "tokenizer"))
    records = [{"prompt": "reverse abcdefghij:", "chosen": " jihgfedcba", "rejected": " jihgfedcab"},
               {"prompt": "reverse xyz:", "chosen": " zyx", "rejected": " xyz"}]  # fmt: skip
    rows = data.tokenize(datasets.Dataset.from_list(records), tokenizer, max_length=24, max_prompt_length=10,
                         name="test")[:]  # fmt: skip
    assert len(rows["prompt_ids"][0]) == 10
    config = AutoConfig.for_model("llama", **{**TINY, "vocab_size": len(tokenizer)})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    ref = reference_logps(2)
    shared = shared_step(model, rows, ref, pairs_per_row=None)
    assert_steps_equal(shared, unshared_step(model, rows, ref))


def test_trl_collated_batch():
    """TRL 1.16's DataCollatorForPreference output: the pairs come back, and the step equals TRL's unshared one."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = random_rows(seed=5)
    examples = [{key: rows[key][i] for key in rows} for i in range(len(PAIR_LENGTHS))]
    collated = DataCollatorForPreference(pad_token_id=0, pad_to_multiple_of=8)(examples)
    assert pairs_from_trl_batch(collated) == rows
    model = tiny_model("llama")
    ref = reference_logps(len(PAIR_LENGTHS))
    # TRL's (and FastDPOTrainer's) unshared step: labels from the completion mask, shifted by one
    labels = collated["input_ids"].masked_fill(collated["completion_mask"] == 0, IGNORE)[:, 1:]
    hidden = unshared_hidden(model, collated)[:, :-1]
    assert_steps_equal(shared_step(model, pairs_from_trl_batch(collated), ref), dpo_step(model, hidden, labels, ref))


def test_trl_keep_end_truncation_that_cuts_the_prompts_apart_is_refused():
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    examples = [{"prompt_ids": [1, 2, 3, 4], "chosen_ids": [5, 6, 7], "rejected_ids": [8]}]
    collated = DataCollatorForPreference(pad_token_id=0, max_length=5, truncation_mode="keep_end")(examples)
    with pytest.raises(ValueError, match="different prompts.*keep_start"):
        pairs_from_trl_batch(collated)


# ---------------------------------------------------------------------------------------------- plans and refusals


def test_each_family_gets_the_masks_its_decoder_reads():
    assert check_model(tiny_model("llama")) == AttentionPlan("sdpa", {None: None})
    stray = tiny_model("llama")
    stray.config.sliding_window = 3  # Llama's attention ignores the key, so the shared mask must too
    assert check_model(stray).windows == {None: None}
    assert check_model(tiny_model("mistral-sliding")).windows == {None: 3}
    assert check_model(tiny_model("qwen3")).windows == {"full_attention": None}
    assert check_model(tiny_model("gemma2", "eager")) == AttentionPlan(
        "eager", {"full_attention": None, "sliding_attention": 3}
    )


@pytest.mark.parametrize(
    "family, change, match",
    [
        ("llama", {"attn": "flash_attention_2"}, "takes a custom mask"),
        ("llama", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic'"),
        ("gemma3", {"use_bidirectional_attention": True}, "causal attention"),
        ("qwen2", {"layer_types": ["full_attention", "chunked_attention"]}, "chunked_attention"),
        ("qwen2-sliding", {"sliding_window": None}, "no config.sliding_window"),
    ],
)
def test_what_cannot_be_shared_exactly_is_refused(family, change, match):
    model = tiny_model(family)
    for key, value in change.items():
        if key == "attn":
            model.config._attn_implementation_internal = value
        else:
            setattr(model.config, key, value)
    with pytest.raises(ValueError, match=match):
        check_model(model)


def test_unverified_model_types_are_refused():
    config = AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    with pytest.raises(ValueError, match="verified for model types.*'gpt2'"):
        check_model(AutoModelForCausalLM.from_config(config))


def test_flex_attention_training_on_cpu_is_refused():
    model = tiny_model("llama", "flex_attention")
    batch = collate_shared(random_rows(), pad_id=0)
    with pytest.raises(ValueError, match="no backward on CPU"):
        shared_attention_mask(model, batch)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"pad_id": None}, "pad_id"),
        ({"pad_id": 0, "pairs_per_row": 0}, "pairs_per_row"),
        ({"pad_id": 0, "padding_side": "middle"}, "padding_side"),
        ({"pad_id": 0, "pad_to_multiple_of": 0}, "pad_to_multiple_of"),
    ],
)
def test_bad_arguments_are_named(options, match):
    with pytest.raises(ValueError, match=match):
        collate_shared(random_rows(), **options)


def test_bad_rows_are_named():
    with pytest.raises(ValueError, match="rejected_ids"):
        collate_shared({"prompt_ids": [[1]], "chosen_ids": [[2]]}, pad_id=0)
    with pytest.raises(ValueError, match="P >= 1 pairs"):
        collate_shared({"prompt_ids": [[1]], "chosen_ids": [[2]], "rejected_ids": []}, pad_id=0)
    with pytest.raises(ValueError, match=r"\(B, T, H\)"):
        collate_shared(random_rows(), pad_id=0).gather(torch.zeros(1, 2, 3))


# ---------------------------------------------------------------------------------------------- negative controls


@pytest.mark.parametrize("defect", ["rejected positions after chosen", "rejected sees chosen", "no window"])
def test_a_layout_one_step_off_is_caught(defect):
    """The equality above is not vacuous: each of these near misses moves the rejected log-probs far beyond 1e-5."""
    model, rows = tiny_model("qwen2-sliding" if defect == "no window" else "llama"), random_rows()
    ref = reference_logps(len(PAIR_LENGTHS))
    batch = collate_shared(rows, pad_id=0, pairs_per_row=None)
    rejected = batch.parts == REJECTED
    if defect == "rejected positions after chosen":
        chosen_lengths = torch.tensor([len(c) for c in rows["chosen_ids"]])
        shift = chosen_lengths[batch.pair_ids.clamp(min=0)] * rejected
        batch = dataclasses.replace(batch, position_ids=batch.position_ids + shift)
    if defect == "rejected sees chosen":
        batch = dataclasses.replace(batch, parts=batch.parts.masked_fill(rejected, CHOSEN))
    mask = shared_attention_mask(model, batch)
    if defect == "no window":
        mask["sliding_attention"] = mask["full_attention"]
    hidden = model.get_decoder()(
        input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids, use_cache=False
    ).last_hidden_state
    values, _ = shared_step_of(model, batch, ref, batch.gather(hidden))
    expected, _ = unshared_step(model, rows, ref)
    error = (values["rejected_logps"] - expected["rejected_logps"]).abs().max() / expected["rejected_logps"].abs().max()
    assert error > 1e-3
