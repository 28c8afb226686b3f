"""Autograd behaviour: gradcheck, partial gradients, forward-only under no_grad, the custom ops."""

import pytest
import torch
from helpers import BACKENDS, Case, device_of, leaves, rel_err

import dpo_fast
from dpo_fast import autograd, chunking, objectives
from dpo_fast.backends import HeadSpec

SMALL = Case(pairs=2, length=4, hidden_dim=5, vocab=7, dtype=torch.float64, bias=True, softcap=None, packed=False,
             seed=3)  # fmt: skip


def _dpo(hidden, weight, bias, batch, **options):
    return dpo_fast.fused_linear_dpo_loss(
        hidden, weight, batch["labels"], bias=bias, ref_chosen_logps=batch["ref_chosen_logps"].double(),
        ref_rejected_logps=batch["ref_rejected_logps"].double(), segment_ids=batch.get("segment_ids"),
        backend="torch", **options,
    )  # fmt: skip


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("loss_type", dpo_fast.LOSS_TYPES)
def test_gradcheck_fused_dpo_loss(packed, loss_type):
    """Every loss type, the loss and the log-probs (whose gradient takes the op's recompute path). Fast mode
    (a random projection of the Jacobian): a full gradcheck of each of the 30 cases takes ~10 s on CI's CPU."""
    batch = Case(**{**SMALL.__dict__, "packed": packed}).build("cpu")
    inputs = leaves(batch)

    def loss_and_logps(hidden, weight, bias):
        out = _dpo(hidden, weight, bias, batch, loss_type=loss_type, label_smoothing=0.1, softcap=2.0)
        return out.loss, out.chosen_logps, out.rejected_logps

    assert torch.autograd.gradcheck(
        loss_and_logps, (inputs["hidden"], inputs["weight"], inputs["bias"]), fast_mode=True
    )


@pytest.mark.parametrize("return_entropy", [False, True])
def test_gradcheck_token_logps(return_entropy):
    inputs = leaves(SMALL.build("cpu"))
    labels = inputs["labels"]

    def fn(hidden, weight, bias):
        return dpo_fast.token_logps(
            hidden, weight, labels, bias=bias, softcap=1.5, temperature=0.8, return_entropy=return_entropy,
            backend="torch",
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, (inputs["hidden"], inputs["weight"], inputs["bias"]))


@pytest.mark.parametrize("average_log_prob", [False, True])
def test_gradcheck_sequence_logps(average_log_prob):
    batch = Case(**{**SMALL.__dict__, "packed": True}).build("cpu")
    inputs = leaves(batch)

    def fn(hidden, weight, bias):
        return dpo_fast.sequence_logps(
            hidden, weight, batch["labels"], bias=bias, segment_ids=batch["segment_ids"], num_segments=4,
            average_log_prob=average_log_prob, temperature=1.2, backend="torch",
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, (inputs["hidden"], inputs["weight"], inputs["bias"]))


class _WorkSpy:
    """Records the GradsNeeded of every gradient pass and the logits products run."""

    def __init__(self, monkeypatch):
        self.needs, self.weight_products = [], 0
        spy = self
        original_init, original_add = chunking._GradAccumulator.__init__, chunking._GradAccumulator.add

        def init(self, hidden, weight, bias, needs, **options):
            spy.needs.append(needs)
            original_init(self, hidden, weight, bias, needs, **options)

        def add(self, rows, grad_logits):
            spy.weight_products += self.grad_weight is not None
            original_add(self, rows, grad_logits)

        monkeypatch.setattr(chunking._GradAccumulator, "__init__", init)
        monkeypatch.setattr(chunking._GradAccumulator, "add", add)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", ["dpo", "token"])
def test_frozen_weight_runs_no_weight_gradient_work(monkeypatch, backend, entry):
    batch = Case(**{**SMALL.__dict__, "dtype": torch.float32}).build(device_of(backend))
    spy = _WorkSpy(monkeypatch)
    hidden = batch["hidden"].clone().requires_grad_(True)
    weight = batch["weight"].clone()  # frozen, as a LoRA policy's lm_head
    if entry == "dpo":
        loss = dpo_fast.fused_linear_dpo_loss(
            hidden, weight, batch["labels"], ref_chosen_logps=batch["ref_chosen_logps"],
            ref_rejected_logps=batch["ref_rejected_logps"], backend=backend,
        ).loss  # fmt: skip
    else:
        loss = dpo_fast.token_logps(hidden, weight, batch["labels"], backend=backend).sum()
    loss.backward()
    assert spy.needs and all(n.hidden and not n.weight and not n.bias for n in spy.needs)
    assert spy.weight_products == 0
    assert weight.grad is None and hidden.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_weight_requires_grad(backend):
    batch = Case(**{**SMALL.__dict__, "dtype": torch.float32}).build(device_of(backend))
    weight = batch["weight"].clone().requires_grad_(True)
    out = dpo_fast.fused_linear_dpo_loss(batch["hidden"], weight, batch["labels"], reference_free=True, backend=backend)
    out.loss.backward()
    reference_weight = batch["weight"].double().requires_grad_(True)
    dpo_fast.fused_linear_dpo_loss(
        batch["hidden"].double(), reference_weight, batch["labels"], reference_free=True, backend="reference"
    ).loss.backward()
    assert rel_err(weight.grad, reference_weight.grad) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entry", ["dpo", "sequence", "token"])
def test_no_grad_runs_forward_only_and_saves_nothing(monkeypatch, backend, entry):
    batch = Case(**{**SMALL.__dict__, "dtype": torch.float32}).build(device_of(backend))
    hidden = batch["hidden"].clone().requires_grad_(True)
    weight = batch["weight"].clone().requires_grad_(True)
    spy = _WorkSpy(monkeypatch)
    saved = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        if entry == "dpo":
            out = dpo_fast.fused_linear_dpo_loss(hidden, weight, batch["labels"], reference_free=True,
                                                 backend=backend).loss  # fmt: skip
        elif entry == "sequence":
            out = dpo_fast.sequence_logps(hidden, weight, batch["labels"], backend=backend)
        else:
            out = dpo_fast.token_logps(hidden, weight, batch["labels"], backend=backend)
    assert out.grad_fn is None and not out.requires_grad
    assert saved == [] and spy.needs == []


@pytest.mark.parametrize("grad_output", [1.0, 0.5])
def test_retained_graph_runs_backward_twice(grad_output):
    """Gradients formed in the forward pass are not consumed by the first backward."""
    batch = Case(**{**SMALL.__dict__, "dtype": torch.float32}).build("cpu")
    hidden = batch["hidden"].clone().requires_grad_(True)
    weight = batch["weight"].clone().requires_grad_(True)
    out = dpo_fast.fused_linear_dpo_loss(hidden, weight, batch["labels"], reference_free=True, backend="torch")
    (out.loss * grad_output).backward(retain_graph=True)
    once = hidden.grad.clone(), weight.grad.clone()
    (out.loss * grad_output).backward()
    assert rel_err(hidden.grad, 2 * once[0]) < 1e-6 and rel_err(weight.grad, 2 * once[1]) < 1e-6


def test_dpo_fused_path_equals_general_composition():
    """The grads-in-forward path against sequence_logps + the objective through autograd."""
    batch = Case(**{**SMALL.__dict__, "dtype": torch.float32, "packed": True}).build("cpu")
    fused_inputs, general_inputs = leaves(batch), leaves(batch)
    fused = dpo_fast.fused_linear_dpo_loss(
        fused_inputs["hidden"], fused_inputs["weight"], batch["labels"], bias=fused_inputs["bias"],
        segment_ids=batch["segment_ids"], ref_chosen_logps=batch["ref_chosen_logps"],
        ref_rejected_logps=batch["ref_rejected_logps"], loss_type="robust", label_smoothing=0.1, backend="torch",
    )  # fmt: skip
    fused.loss.backward()
    seq = dpo_fast.sequence_logps(
        general_inputs["hidden"], general_inputs["weight"], batch["labels"], bias=general_inputs["bias"],
        segment_ids=batch["segment_ids"], num_segments=4, backend="torch",
    )  # fmt: skip
    ref = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
    counts = torch.zeros(4).index_add_(0, batch["segment_ids"], (batch["labels"] != -100).float())
    general = objectives.objective_loss(
        objectives.dpo_objective("robust", label_smoothing=0.1),
        objectives.SequenceInputs(logps=seq, token_counts=counts, ref_logps=ref),
        objectives.BatchConstants(num_units=2),
    )
    general.backward()
    assert rel_err(fused.loss, general) < 1e-6
    for key in ("hidden", "weight", "bias"):
        assert rel_err(fused_inputs[key].grad, general_inputs[key].grad) < 1e-5


def _preference_args(hidden, weight, bias, labels, backend, metrics, objective, nll=False):
    """``preference_loss_forward``'s positional arguments for 2 pairs of 4 tokens each (rows of ``labels`` (16,))."""
    device = hidden.device
    segment_ids = torch.arange(4, device=device).repeat_interleave(4)
    completion = labels != -100
    weights = objectives.token_weights(objective, completion, segment_ids, 4)
    nll_weights = weights.nll if nll else None
    return (
        hidden, weight, bias, labels, segment_ids, weights.logps, nll_weights, completion,
        torch.randn(4, dtype=torch.float64, device=device), None, torch.tensor(0.0, dtype=torch.float64, device=device),
        2, objectives.encode_objective(objective), -100, None, 1.0, True, True, bias is not None, metrics, backend,
        chunking.scratch_bytes(device, None),
    )  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ops_pass_opcheck(backend):
    dtype = torch.float32 if backend in ("triton", "cuda") else torch.float64
    batch = Case(**{**SMALL.__dict__, "dtype": dtype}).build(device_of(backend))
    hidden, weight, bias, labels = batch["hidden"], batch["weight"], batch["bias"], batch["labels"].reshape(-1)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1]).clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(True)
    scratch = chunking.scratch_bytes(flat_hidden.device, None)
    torch.library.opcheck(autograd.token_logps_forward,
                          (flat_hidden, weight, bias, labels, -100, 2.0, 0.9, True, backend, scratch))  # fmt: skip
    logp, entropy, _mean_logit, _is_top1, _log_sum_sq_probs, normalizer = autograd.token_logps(
        flat_hidden.detach(), weight.detach(), bias, labels, ignore_index=-100, head=HeadSpec(), with_metrics=True,
        backend=backend, scratch_bytes=scratch,
    )  # fmt: skip
    grad_args = (torch.randn_like(logp), torch.randn_like(logp), flat_hidden.detach(), weight.detach(), bias, labels,
                 normalizer, entropy, -100, None, 1.0, True, True, True, backend, scratch)  # fmt: skip
    torch.library.opcheck(autograd.token_logps_backward, grad_args)
    # inputs that require grad: opcheck then traces the op's autograd formula too (test_aot_dispatch_dynamic)
    objective = objectives.dpo_objective(["sigmoid", "sft"], ld_alpha=0.5)
    preference_args = _preference_args(
        flat_hidden, weight, bias.clone().requires_grad_(True), labels, backend, True, objective, nll=True
    )
    torch.library.opcheck(autograd.preference_loss_forward, preference_args)


def test_op_schemas_are_written_out():
    """Each op's schema names its arguments and outputs, in the order its Python wrapper passes them."""
    names = {
        op: ([a.name for a in op._opoverload._schema.arguments], [r.name for r in op._opoverload._schema.returns])
        for op in (autograd.token_logps_forward, autograd.preference_loss_forward)
    }  # fmt: skip
    metrics = ["entropy", "mean_logit", "is_top1", "log_sum_sq_probs"]
    assert names[autograd.token_logps_forward] == (
        ["hidden", "weight", "bias", "labels", "ignore_index", "softcap", "temperature", "with_metrics", "backend",
         "scratch_bytes", "vocab_group", "vocab_size"],
        ["logp", *metrics, "normalizer"],
    )  # fmt: skip
    assert names[autograd.preference_loss_forward] == (
        ["hidden", "weight", "bias", "targets", "segment_ids", "logp_weights", "nll_weights", "completion", "ref_sums",
         "desirable", "kl", "num_units", "objective", "ignore_index", "softcap", "temperature", "need_hidden",
         "need_weight", "need_bias", "with_metrics", "backend", "scratch_bytes", "vocab_group", "vocab_size"],
        ["loss", "logps", "nll_logps", "normalizer", *metrics, "grad_hidden", "grad_weight", "grad_bias"],
    )  # fmt: skip
    assert list(autograd.PreferencePass._fields) == names[autograd.preference_loss_forward][1][:8]
    assert list(autograd.TokenPass._fields) == names[autograd.token_logps_forward][1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_fast_path_equals_general_path(backend):
    """Frozen lm_head: the grads-in-forward path (4*N*H*V) against the recompute path."""
    batch = Case(**{**SMALL.__dict__, "dtype": torch.float32, "packed": True}).build(device_of(backend))
    results = []
    for grads_in_forward in (True, False):
        hidden = batch["hidden"].clone().requires_grad_(True)
        out = dpo_fast.fused_linear_dpo_loss(
            hidden, batch["weight"], batch["labels"], bias=batch["bias"], segment_ids=batch["segment_ids"],
            ref_chosen_logps=batch["ref_chosen_logps"], ref_rejected_logps=batch["ref_rejected_logps"],
            loss_type="ipo", backend=backend, grads_in_forward=grads_in_forward,
        )  # fmt: skip
        out.loss.backward()
        results.append((out.loss.detach(), out.chosen_logps.detach(), hidden.grad))
    for fast, general in zip(*results):
        assert rel_err(fast, general) < 1e-5


def test_unit_grad_output_returns_the_saved_gradients_in_eager(monkeypatch):
    """Eager backward with grad_output 1 reads it (no (V, H) copy); traced graphs never read it."""
    seen = []
    original = autograd._holds_values
    monkeypatch.setattr(autograd, "_holds_values", lambda tensor: seen.append(original(tensor)) or seen[-1])
    batch = Case(**{**SMALL.__dict__, "dtype": torch.float32}).build("cpu")
    weight = batch["weight"].clone().requires_grad_(True)
    dpo_fast.fused_linear_dpo_loss(batch["hidden"], weight, batch["labels"], reference_free=True,
                                   backend="torch").loss.backward()  # fmt: skip
    assert seen == [True]
