"""The token metrics of the fused DPO pass (entropy, mean logit, top-1) against float64, and their cost: none.

The oracle forms the full float64 logits of the same (rounded) inputs; the top-1 flag is compared
wherever the float64 answer is not a near-tie that the float32 logits could resolve either way.
"""

import pytest
import torch
from helpers import BACKENDS, TOLERANCE, Case, device_of, rel_err

import dpo_fast
from dpo_fast import backends, chunking, objectives
from dpo_fast.backends import HeadSpec

# the separation below which a float32 logit may order two entries differently from float64
TIE = 1e-3


def _case(dtype, packed, bias=True, softcap=2.5, seed=11):
    # odd H and V; prompts and scattered padding give ignored tokens
    return Case(pairs=2, length=7, hidden_dim=13, vocab=37, dtype=dtype, bias=bias, softcap=softcap, packed=packed,
                seed=seed)  # fmt: skip


def _with_top1_targets(case, softcap):
    """``case``'s batch on the host, every other valid target made the float64 argmax, so that both
    answers of is_top1 occur."""
    batch = case.build("cpu")
    z = _oracle_logits(batch, softcap)
    labels = batch["labels"].clone()
    valid = (labels != -100).nonzero(as_tuple=True)
    chosen = tuple(index[::2] for index in valid)
    labels[chosen] = z.argmax(-1)[chosen]
    return {**batch, "labels": labels}


def _to(batch, device):
    return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def _oracle_logits(batch, softcap, temperature=1.0):
    hidden, weight = batch["hidden"].double().cpu(), batch["weight"].double().cpu()
    z = hidden @ weight.t()
    if batch["bias"] is not None:
        z = z + batch["bias"].double().cpu()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _oracle_metrics(batch, softcap, temperature=1.0):
    """Float64 entropy, mean logit, top-1 flag, and where the top-1 flag is decidable in float32."""
    z = _oracle_logits(batch, softcap, temperature)
    labels = batch["labels"].cpu()
    valid = labels != -100
    logprobs = torch.log_softmax(z, -1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    target = z.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    top2 = z.topk(2, dim=-1).values
    is_top1 = (z.argmax(-1) == labels) & valid
    # decidable: a clear winner that is the target, or a target clearly below the maximum
    decidable = torch.where(is_top1, top2[..., 0] - top2[..., 1] > TIE, top2[..., 0] - target > TIE)
    zero = torch.zeros((), dtype=torch.float64)
    return {
        "entropy": torch.where(valid, entropy, zero),
        "mean_logit": torch.where(valid, z.mean(-1), zero),
        "is_top1": is_top1,
        "decidable": decidable | ~valid,
    }


def _dpo(batch, backend, softcap, **options):
    return dpo_fast.fused_linear_dpo_loss(
        batch["hidden"], batch["weight"], batch["labels"], bias=batch["bias"], softcap=softcap,
        ref_chosen_logps=batch["ref_chosen_logps"], ref_rejected_logps=batch["ref_rejected_logps"],
        segment_ids=batch.get("segment_ids"), backend=backend, return_token_metrics=True, **options,
    )  # fmt: skip


def _assert_metrics_match(metrics, oracle, labels, dtype):
    tol = TOLERANCE[dtype]["values"]
    assert metrics.entropy.shape == labels.shape and metrics.mean_logit.shape == labels.shape
    assert metrics.entropy.dtype == torch.float32 and metrics.mean_logit.dtype == torch.float32
    assert metrics.is_top1.dtype == torch.bool and metrics.is_top1.shape == labels.shape
    assert not metrics.entropy.requires_grad and not metrics.mean_logit.requires_grad
    ignored = (labels == -100).cpu()
    assert (metrics.entropy.cpu()[ignored] == 0).all() and (metrics.mean_logit.cpu()[ignored] == 0).all()
    assert not metrics.is_top1.cpu()[ignored].any()
    assert rel_err(metrics.entropy, oracle["entropy"]) < tol
    assert rel_err(metrics.mean_logit, oracle["mean_logit"]) < tol
    decidable = oracle["decidable"]
    assert decidable.float().mean() > 0.8  # the comparison below covers most tokens
    assert torch.equal(metrics.is_top1.cpu()[decidable], oracle["is_top1"][decidable])
    assert oracle["is_top1"][decidable].any() and not oracle["is_top1"][decidable].all()


PATHS = ["grads_in_forward", "recompute", "no_grad"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("path", PATHS)
def test_fused_dpo_token_metrics_match_float64(backend, dtype, packed, path):
    softcap = 2.5
    host_batch = _with_top1_targets(_case(dtype, packed), softcap)
    oracle = _oracle_metrics(host_batch, softcap)
    batch = _to(host_batch, device_of(backend))
    hidden = batch["hidden"].clone().requires_grad_(path != "no_grad")
    inputs = {**batch, "hidden": hidden}
    with torch.set_grad_enabled(path != "no_grad"):
        out = _dpo(inputs, backend, softcap, grads_in_forward=path == "grads_in_forward")
    _assert_metrics_match(out.token_metrics, oracle, batch["labels"], dtype)
    if path != "no_grad":
        out.loss.backward()
        assert torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_reference_backend_token_metrics_match_float64(dtype, packed):
    batch = _with_top1_targets(_case(dtype, packed), 2.5)
    out = _dpo(batch, "reference", 2.5)
    _assert_metrics_match(out.token_metrics, _oracle_metrics(batch, 2.5), batch["labels"], dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_metrics_without_bias_or_softcap_and_all_paths_agree(backend):
    host_batch = _with_top1_targets(_case(torch.float32, False, bias=False, softcap=None, seed=4), None)
    oracle = _oracle_metrics(host_batch, None)
    batch = _to(host_batch, device_of(backend))
    results = []
    for grads_in_forward in (True, False):
        hidden = batch["hidden"].clone().requires_grad_(True)
        results.append(_dpo({**batch, "hidden": hidden}, backend, None, grads_in_forward=grads_in_forward))
    results.append(_dpo(batch, "reference", None))
    for out in results:
        _assert_metrics_match(out.token_metrics, oracle, batch["labels"], torch.float32)
    first = results[0].token_metrics
    for out in results[1:]:
        assert rel_err(out.token_metrics.entropy, first.entropy) < 1e-5
        assert torch.equal(out.token_metrics.is_top1, first.is_top1)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_token_logps_entropy_with_temperature_matches_float64(backend):
    batch = _case(torch.bfloat16, False).build(device_of(backend))
    _, entropy = dpo_fast.token_logps(
        batch["hidden"], batch["weight"], batch["labels"], bias=batch["bias"], softcap=2.5, temperature=0.7,
        return_entropy=True, backend=backend,
    )  # fmt: skip
    oracle = _oracle_metrics(batch, 2.5, temperature=0.7)
    assert rel_err(entropy, oracle["entropy"]) < TOLERANCE[torch.bfloat16]["values"]


def test_token_metrics_are_off_by_default():
    batch = _case(torch.float32, False).build("cpu")
    out = dpo_fast.fused_linear_dpo_loss(batch["hidden"], batch["weight"], batch["labels"], reference_free=True,
                                         backend="torch")  # fmt: skip
    assert out.token_metrics is None


class _ProductSpy:
    """Counts the rows that go through a backend's row passes and whether metrics were asked for."""

    def __init__(self, monkeypatch, name):
        self.stats_rows, self.grad_rows, self.with_metrics = 0, 0, []
        module = backends.get(name)
        stats, grad = module.logits_stats, module.logits_grad

        def logits_stats(chunk, with_metrics, keep_logits):
            self.stats_rows += chunk.rows.shape[0]
            self.with_metrics.append(with_metrics)
            return stats(chunk, with_metrics, keep_logits)

        def logits_grad(chunk, *args):
            self.grad_rows += chunk.rows.shape[0]
            return grad(chunk, *args)

        monkeypatch.setattr(module, "logits_stats", logits_stats)
        monkeypatch.setattr(module, "logits_grad", logits_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scratch_kib", [1, 64])
def test_metrics_cost_no_extra_row_pass(monkeypatch, backend, scratch_kib):
    """One forward row pass and one gradient pass per valid token, metrics on or off, at any budget."""
    batch = _case(torch.float32, True).build(device_of(backend))
    valid = int((_case(torch.float32, True).build("cpu")["labels"] != -100).sum())  # the same batch, on the host
    counts = {}
    for metrics in (False, True):
        spy = _ProductSpy(monkeypatch, backend)
        hidden = batch["hidden"].clone().requires_grad_(True)
        weight = batch["weight"].clone().requires_grad_(True)
        out = dpo_fast.fused_linear_dpo_loss(
            hidden, weight, batch["labels"], bias=batch["bias"], segment_ids=batch["segment_ids"],
            ref_chosen_logps=batch["ref_chosen_logps"], ref_rejected_logps=batch["ref_rejected_logps"],
            backend=backend, scratch_mib=scratch_kib / 1024, return_token_metrics=metrics,
        )  # fmt: skip
        out.loss.backward()
        assert all(flag == metrics for flag in spy.with_metrics)
        counts[metrics] = (spy.stats_rows, spy.grad_rows)
        monkeypatch.undo()
    assert counts[True] == counts[False]
    assert counts[True][0] == valid and counts[True][1] == valid


def test_fused_pass_with_metrics_runs_six_products_per_token():
    """FLOPs of the matmuls in the fused DPO pass: ``6*N*H*V`` with a trainable head, metrics on or off.

    The pass is run as the custom op runs it (``chunking.preference_forward_with_grads``): torch's FLOP
    counter does not look inside a custom op, and it is told the in-place ``addmm_`` that accumulates dL/dW.
    """
    from torch.utils.flop_counter import FlopCounterMode

    def addmm_flop(self_shape, a_shape, b_shape, *args, **kwargs):
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    batch = _case(torch.float32, False).build("cpu")
    labels = batch["labels"].reshape(-1)
    valid = int((labels != -100).sum())
    vocab, hidden_dim = batch["weight"].shape
    segment_ids = torch.arange(4).repeat_interleave(batch["labels"].shape[1])
    objective = objectives.dpo_objective("sigmoid")
    flops = {}
    for metrics in (False, True):
        with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_flop}) as counter:
            chunking.preference_forward_with_grads(
                backends.get("torch"), batch["hidden"].reshape(-1, hidden_dim), batch["weight"], batch["bias"],
                labels, segment_ids, objectives.token_weights(objective, labels != -100, segment_ids, 4), None, None,
                objectives.BatchConstants(num_units=2), objective, HeadSpec(2.5), -100,
                chunking.GradsNeeded(True, True, True), metrics, chunking.scratch_bytes(torch.device("cpu"), None),
            )  # fmt: skip
        flops[metrics] = counter.get_total_flops()
    assert flops[True] == flops[False] == 6 * valid * hidden_dim * vocab
