"""The reference backend against per-token arithmetic written out in Python floats."""

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from dpo_fast.backends import HeadSpec, reference


@given(
    tokens=st.integers(1, 6),
    hidden_dim=st.integers(1, 5),
    vocab=st.integers(2, 7),
    softcap=st.sampled_from([None, 1.5]),
    temperature=st.sampled_from([1.0, 0.6]),
    seed=st.integers(0, 10_000),
)
def test_reference_token_logps_and_entropy_by_hand(tokens, hidden_dim, vocab, softcap, temperature, seed):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hidden_dim, generator=gen, dtype=torch.float64)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[0] = -100
    logp, (entropy, mean_logit, is_top1, log_sum_sq_probs) = reference.token_logps(
        hidden, weight, labels, bias, HeadSpec(softcap, temperature), -100, True
    )
    for n in range(tokens):
        z = [sum(hidden[n, k].item() * weight[v, k].item() for k in range(hidden_dim)) + bias[v].item()
             for v in range(vocab)]  # fmt: skip
        if softcap is not None:
            z = [softcap * math.tanh(x / softcap) for x in z]
        z = [x / temperature for x in z]
        lse = math.log(sum(math.exp(x) for x in z))
        p = [math.exp(x - lse) for x in z]
        if labels[n] == -100:
            assert logp[n].item() == 0 and entropy[n].item() == 0 and mean_logit[n].item() == 0 and not is_top1[n]
            assert log_sum_sq_probs[n].item() == 0
            continue
        assert math.isclose(logp[n].item(), z[labels[n]] - lse, rel_tol=1e-12, abs_tol=1e-12)
        assert math.isclose(entropy[n].item(), -sum(q * math.log(q) for q in p), rel_tol=1e-10, abs_tol=1e-12)
        assert math.isclose(mean_logit[n].item(), sum(z) / vocab, rel_tol=1e-12, abs_tol=1e-12)
        assert bool(is_top1[n]) == (max(range(vocab), key=z.__getitem__) == labels[n])
        assert math.isclose(log_sum_sq_probs[n].item(), math.log(sum(q * q for q in p)), rel_tol=1e-10, abs_tol=1e-12)
