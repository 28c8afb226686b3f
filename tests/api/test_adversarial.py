"""The public API under adversarial input: every backend gives the exact answer or a NaN that shows, never garbage.

- ``-inf`` logits (a masked vocabulary entry) give the exact finite loss, log-probs, entropy and
  gradients, against a float64 oracle that drops those entries; ``+inf``/NaN logits give NaN.
- Out-of-range labels and segment ids inside a compiled graph (no value check can raise there) give
  a NaN loss, never a number read from outside the vocabulary and never an index out of bounds.
- Second-order gradients through the chunked backends raise instead of being dropped.
- The ``reference`` backend: ignored tokens take no part (a NaN hidden state there reaches no
  gradient), float16 logits above 65504 do not overflow.
"""

import math

import pytest
import torch
from helpers import BACKENDS, TOLERANCE, Case, device_of, grads, leaves, rel_err

import dpo_fast

ALL = ["reference", *BACKENDS]
VOCAB = 29
MASKED = [0, 3, 4, 17, 28]  # -inf bias entries: the first and last entry among them


def _batch(device, dtype=torch.float32, packed=False, seed=7):
    return Case(pairs=2, length=6, hidden_dim=11, vocab=VOCAB, dtype=dtype, bias=True, softcap=None, packed=packed,
                seed=seed).build(device)  # fmt: skip


def _masked_batch(device, packed=False):
    """A batch whose bias is -inf on MASKED, with no target there."""
    batch = _batch(device, packed=packed)
    batch["bias"][MASKED] = -math.inf
    labels = batch["labels"]
    targets = labels != -100
    allowed = torch.tensor([v for v in range(VOCAB) if v not in MASKED], device=labels.device)
    labels[targets] = allowed[labels[targets] % allowed.shape[0]]
    return batch


def _drop_masked(batch):
    """The same problem on the finite vocabulary entries only: the float64 oracle of the -inf one."""
    keep = torch.tensor([v for v in range(VOCAB) if v not in MASKED], device=batch["weight"].device)
    column = torch.full((VOCAB,), -1, dtype=torch.long, device=keep.device)
    column[keep] = torch.arange(keep.shape[0], device=keep.device)
    labels = batch["labels"]
    return {
        **batch,
        "weight": batch["weight"][keep],
        "bias": batch["bias"][keep],
        "labels": torch.where(labels == -100, labels, column[labels.clamp(min=0)]),
        "keep": keep,
    }


def _dpo(batch, backend, **options):
    return dpo_fast.fused_linear_dpo_loss(
        batch["hidden"], batch["weight"], batch["labels"], bias=batch["bias"],
        ref_chosen_logps=batch["ref_chosen_logps"], ref_rejected_logps=batch["ref_rejected_logps"],
        segment_ids=batch.get("segment_ids"), backend=backend, **options,
    )  # fmt: skip


def _scatter_grads(reduced_grads, keep):
    """Gradients of the reduced problem laid out on the full vocabulary: 0 on the dropped entries."""
    out = dict(reduced_grads)
    for key in ("weight", "bias"):
        full = reduced_grads[key].new_zeros((VOCAB, *reduced_grads[key].shape[1:]))
        full[keep] = reduced_grads[key]
        out[key] = full
    return out


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("grads_in_forward", [None, False])
def test_minus_inf_bias_gives_the_exact_finite_dpo_loss_and_gradients(backend, packed, grads_in_forward):
    batch = _masked_batch(device_of(backend), packed)
    oracle = leaves(_drop_masked(batch), torch.float64)
    expected = _dpo(oracle, "reference")
    expected.loss.backward()
    expected_grads = _scatter_grads(grads(oracle), oracle["keep"])

    inputs = leaves(batch)
    actual = _dpo(inputs, backend, grads_in_forward=None if backend == "reference" else grads_in_forward,
                  return_token_metrics=True)  # fmt: skip
    actual.loss.backward()
    assert rel_err(actual.loss, expected.loss) < 1e-5
    assert rel_err(actual.chosen_logps, expected.chosen_logps) < 1e-5
    for key, value in grads(inputs).items():
        assert torch.isfinite(value).all(), key
        assert rel_err(value, expected_grads[key], floor=0.1) < 1e-4, key
    assert (inputs["bias"].grad[MASKED] == 0).all() and (inputs["weight"].grad[MASKED] == 0).all()
    assert torch.isfinite(actual.token_metrics.entropy).all()


@pytest.mark.parametrize("backend", ALL)
def test_minus_inf_bias_gives_exact_token_logps_entropy_and_sequence_logps(backend):
    batch = _masked_batch(device_of(backend))
    gen = torch.Generator().manual_seed(3)
    upstream = [
        torch.randn(batch["labels"].shape, generator=gen, dtype=torch.float64).to(device_of(backend)) for _ in range(3)
    ]

    def step(inputs, name):
        logp, entropy = dpo_fast.token_logps(
            inputs["hidden"], inputs["weight"], inputs["labels"], bias=inputs["bias"], softcap=None,
            temperature=0.8, return_entropy=True, backend=name,
        )  # fmt: skip
        seq = dpo_fast.sequence_logps(inputs["hidden"], inputs["weight"], inputs["labels"], bias=inputs["bias"],
                                      temperature=0.8, average_log_prob=True, backend=name)  # fmt: skip
        objective = (logp * upstream[0]).sum() + (entropy * upstream[1]).sum() + (seq * upstream[2][:, 0]).sum()
        objective.backward()
        return logp, entropy, seq, grads(inputs)

    oracle = leaves(_drop_masked(batch), torch.float64)
    expected = step(oracle, "reference")
    expected_grads = _scatter_grads(expected[3], oracle["keep"])
    actual = step(leaves(batch), backend)
    for name, got, want in zip(("logp", "entropy", "sequence_logps"), actual[:3], expected[:3]):
        assert torch.isfinite(got).all(), name
        assert rel_err(got, want) < 1e-5, name
    for key, value in actual[3].items():
        assert torch.isfinite(value).all(), key
        assert rel_err(value, expected_grads[key], floor=0.1) < 1e-4, key


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("poison", [math.inf, math.nan])
def test_plus_inf_or_nan_bias_gives_a_nan_loss(backend, poison):
    batch = _batch(device_of(backend))
    batch["bias"][5] = poison
    inputs = leaves(batch)
    out = _dpo(inputs, backend)
    out.loss.backward()
    assert torch.isnan(out.loss)
    assert torch.isnan(inputs["weight"].grad).any()


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
@pytest.mark.parametrize("scale", [1e2, 1e4])
def test_huge_logits_match_float64(backend, scale):
    """Logits of order 1e3 and 1e5: log-probs of several hundred, a softmax that is all but one-hot."""
    batch = _batch(device_of(backend))
    batch["hidden"] = batch["hidden"] * scale
    expected_inputs = leaves(batch, torch.float64)
    expected = _dpo(expected_inputs, "reference", reference_free=True)
    expected.loss.backward()
    inputs = leaves(batch)
    actual = _dpo(inputs, backend, reference_free=True)
    actual.loss.backward()
    assert rel_err(actual.chosen_logps, expected.chosen_logps) < 1e-5
    assert rel_err(actual.loss, expected.loss) < 1e-4
    for key, value in grads(inputs).items():
        assert rel_err(value, grads(expected_inputs)[key], floor=0.1) < 1e-4, key


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_float16_logits_above_65504_do_not_overflow(backend):
    batch = _batch(device_of(backend))
    # inputs well inside float16's range, logits of order 1e5: beyond its largest value, 65504
    batch["hidden"], batch["weight"] = batch["hidden"] * 2e3, batch["weight"] * 50
    half = leaves(batch, torch.float16)
    expected = _dpo(leaves(half, torch.float64), "reference", reference_free=True)
    actual = _dpo(half, backend, reference_free=True)
    actual.loss.backward()
    assert torch.isfinite(actual.loss) and torch.isfinite(actual.chosen_logps).all()
    assert rel_err(actual.chosen_logps, expected.chosen_logps) < TOLERANCE[torch.float16]["values"]
    assert all(torch.isfinite(value).all() for value in grads(half).values())


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_nan_hidden_state_at_an_ignored_position_reaches_no_gradient(backend):
    batch = _batch(device_of(backend))
    ignored = (_batch("cpu")["labels"] == -100).nonzero()[0].tolist()  # the same batch, read on the host
    clean = leaves(batch)
    _dpo(clean, backend).loss.backward()
    poisoned_batch = dict(batch)
    poisoned_batch["hidden"] = batch["hidden"].clone()
    poisoned_batch["hidden"][tuple(ignored)] = math.nan
    poisoned = leaves(poisoned_batch)
    out = _dpo(poisoned, backend)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for key in ("weight", "bias"):
        assert torch.isfinite(poisoned[key].grad).all(), key
        assert torch.equal(poisoned[key].grad, clean[key].grad), key
    assert (poisoned["hidden"].grad[tuple(ignored)] == 0).all()


# ----------------------------------------------------------------------------------------------
# Values that no check can refuse inside a compiled graph


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("backend", ALL)
def test_out_of_range_label_under_compile_gives_a_nan_loss(backend):
    batch = _batch(device_of(backend))
    labels = batch["labels"].clone()
    labels[0, -1] = VOCAB + 5  # a padded row's last token: a chosen sequence's target
    hidden = batch["hidden"].clone().requires_grad_(True)

    def loss(hidden):
        return _dpo({**batch, "hidden": hidden, "labels": labels}, backend).loss

    value = _compiled(loss)(hidden)
    assert torch.isnan(value)
    value.backward()


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("label", [-1, VOCAB])
def test_out_of_range_label_under_compile_poisons_only_its_token_and_sequence(backend, label):
    batch = _batch(device_of(backend))
    labels = batch["labels"].clone()
    labels[1, 2] = label

    def per_token_and_sequence(hidden):
        logp = dpo_fast.token_logps(hidden, batch["weight"], labels, bias=batch["bias"], backend=backend)
        seq = dpo_fast.sequence_logps(hidden, batch["weight"], labels, bias=batch["bias"], backend=backend)
        return logp, seq

    logp, seq = _compiled(per_token_and_sequence)(batch["hidden"])
    nan = torch.zeros_like(labels, dtype=torch.bool)
    nan[1, 2] = True
    assert torch.isnan(logp[nan]).all() and torch.isfinite(logp[~nan]).all()
    assert torch.isnan(seq[1]) and torch.isfinite(seq[[0, 2, 3]]).all()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("bad_id", [-1, 4, 2**40])
def test_out_of_range_segment_id_under_compile_gives_a_nan_loss(backend, bad_id):
    batch = _batch(device_of(backend), packed=True)
    segment_ids = batch["segment_ids"].clone()
    segment_ids[3] = bad_id  # 2P = 4 sequences
    hidden = batch["hidden"].clone().requires_grad_(True)

    def loss_and_sequences(hidden):
        out = _dpo({**batch, "hidden": hidden, "segment_ids": segment_ids}, backend)
        seq = dpo_fast.sequence_logps(hidden, batch["weight"], batch["labels"], bias=batch["bias"],
                                      segment_ids=segment_ids, num_segments=4, backend=backend)  # fmt: skip
        return out.loss, seq

    loss, seq = _compiled(loss_and_sequences)(hidden)
    assert torch.isnan(loss) and torch.isnan(seq).any()
    loss.backward()
    assert torch.isnan(hidden.grad).any()


def test_sequence_logps_under_compile_reads_num_segments_from_the_ids():
    """Without ``num_segments`` the compiled graph reads it from the segment ids, as eager does."""
    batch = _batch("cpu", packed=True)

    def sequences(hidden):
        return dpo_fast.sequence_logps(hidden, batch["weight"], batch["labels"], segment_ids=batch["segment_ids"],
                                       backend="torch")  # fmt: skip

    assert torch.equal(_compiled(sequences)(batch["hidden"]), sequences(batch["hidden"]))


# ----------------------------------------------------------------------------------------------
# Second-order gradients


def _gradient_penalty(inputs, backend, entry):
    if entry == "dpo":
        loss = _dpo(inputs, backend, reference_free=True).loss
    else:
        loss = dpo_fast.token_logps(inputs["hidden"], inputs["weight"], inputs["labels"], bias=inputs["bias"],
                                    return_entropy=True, backend=backend)[1].sum()  # fmt: skip
    (grad_hidden,) = torch.autograd.grad(loss, inputs["hidden"], create_graph=True)
    # loss + penalty: before the check, the penalty's dW term was silently 0 (0.0000 where the
    # reference gives 0.0511 for the fused loss on this batch)
    return loss + grad_hidden.square().sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", ["dpo", "token"])
def test_double_backward_through_a_chunked_backend_raises(backend, entry):
    inputs = leaves(_batch(device_of(backend)))
    with pytest.raises(RuntimeError, match="create_graph=True"):
        _gradient_penalty(inputs, backend, entry).backward()


def test_reference_backend_gives_second_order_gradients_of_per_token_values():
    """Per-token log-probs and entropies on the reference backend are plain autograd (the losses are first-order on
    every backend: tests/api/test_user_setups.py)."""
    inputs = leaves(_batch("cpu"), torch.float64)
    _gradient_penalty(inputs, "reference", "token").backward()
    with_penalty = inputs["weight"].grad
    inputs = leaves(_batch("cpu"), torch.float64)
    dpo_fast.token_logps(inputs["hidden"], inputs["weight"], inputs["labels"], bias=inputs["bias"],
                         return_entropy=True, backend="reference")[1].sum().backward()  # fmt: skip
    assert (with_penalty - inputs["weight"].grad).norm() > 1e-3  # the penalty's dW term, not a dropped 0


def test_first_order_gradients_still_work_under_enable_grad():
    """Only create_graph=True is refused: a plain backward inside torch.enable_grad() runs."""
    inputs = leaves(_batch("cpu"))
    with torch.enable_grad():
        _dpo(inputs, "torch").loss.backward()
    assert torch.isfinite(inputs["weight"].grad).all()
