"""torch.compile(fullgraph=True) traces through every entry point: no graph break, same results."""

import pytest
import torch
from helpers import Case, rel_err

import dpo_fast

BATCH = Case(pairs=2, length=5, hidden_dim=8, vocab=13, dtype=torch.float32, bias=True, softcap=2.0, packed=False,
             seed=5).build("cpu")  # fmt: skip


def _dpo(hidden, weight, bias):
    out = dpo_fast.fused_linear_dpo_loss(
        hidden, weight, BATCH["labels"], bias=bias, softcap=2.0, ref_chosen_logps=BATCH["ref_chosen_logps"],
        ref_rejected_logps=BATCH["ref_rejected_logps"], backend="torch",
    )  # fmt: skip
    return out.loss * 1.5 + 0.1 * out.chosen_logps.sum(), out.reward_accuracy


def _tokens(hidden, weight, bias):
    logp, entropy = dpo_fast.token_logps(hidden, weight, BATCH["labels"], bias=bias, return_entropy=True,
                                         backend="torch")  # fmt: skip
    return (logp * 2 + entropy).sum(), logp.detach()


def _sequences(hidden, weight, bias):
    seq = dpo_fast.sequence_logps(hidden, weight, BATCH["labels"], bias=bias, average_log_prob=True, backend="torch")
    return seq.sum(), seq.detach()


@pytest.mark.parametrize("fn", [_dpo, _tokens, _sequences])
def test_fullgraph_compile_matches_eager(fn):
    def run(f):
        leaves = [BATCH[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
        objective, value = f(*leaves)
        objective.backward()
        return value, [leaf.grad for leaf in leaves]

    torch._dynamo.reset()
    compiled = run(torch.compile(fn, fullgraph=True, backend="aot_eager"))
    eager = run(fn)
    assert rel_err(compiled[0], eager[0]) < 1e-6
    for got, want in zip(compiled[1], eager[1]):
        assert rel_err(got, want) < 1e-6


def test_fused_dpo_loss_under_inductor_matches_eager():
    """The fused path with the default backend, compiled by inductor (on CPU it generates and compiles C++)."""

    def step(hidden, weight, bias):
        out = dpo_fast.fused_linear_dpo_loss(
            hidden, weight, BATCH["labels"], bias=bias, softcap=2.0, ref_chosen_logps=BATCH["ref_chosen_logps"],
            ref_rejected_logps=BATCH["ref_rejected_logps"], return_token_metrics=True,
        )  # fmt: skip
        return out.loss * 2 - 0.1 * out.chosen_logps.sum(), out.token_metrics.entropy.sum()

    def run(f):
        leaves = [BATCH[k].clone().requires_grad_(True) for k in ("hidden", "weight", "bias")]
        objective, entropy = f(*leaves)
        objective.backward()
        return [objective.detach(), entropy] + [leaf.grad for leaf in leaves]

    torch._dynamo.reset()
    compiled = run(torch.compile(step, fullgraph=True, backend="inductor"))
    for got, want in zip(compiled, run(step)):
        assert rel_err(got, want) < 1e-5
