"""Memory on CPU: the torch backend's extra memory for a real-size step is a small fraction of the naive step's.

Each step runs in a fresh process, so the peak resident set size (``ru_maxrss``) measures that step
alone: its growth from just before the step to the end is the step's extra memory (the gradients
included, for both). A tiny warm-up call first takes the one-time costs (imports, library buffers).
"""

import json
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys
import torch
import dpo_fast

backend = sys.argv[1]
torch.manual_seed(0)
pairs, length, width, vocab = 4, 512, 256, 32000
hidden = torch.randn(2 * pairs, length, width, requires_grad=True)
weight = (torch.randn(vocab, width) * 0.05).requires_grad_(True)
labels = torch.randint(0, vocab, (2 * pairs, length))
labels[:, : length // 2] = -100  # half of every row is prompt
ref = torch.randn(pairs) - 200
# warm up on a tiny batch: imports and one-time library buffers are not the step's memory
tiny = hidden[:2, :4].detach().requires_grad_(True)
dpo_fast.fused_linear_dpo_loss(tiny, weight, labels[:2, -4:], reference_free=True, backend=backend).loss.backward()
weight.grad = None
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = dpo_fast.fused_linear_dpo_loss(hidden, weight, labels, ref_chosen_logps=ref, ref_rejected_logps=ref,
                                     backend=backend)
out.loss.backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"extra_mib": (after - before) / 1024, "loss": out.loss.item()}))
"""


def _extra_memory(backend: str) -> dict:
    result = subprocess.run([sys.executable, "-c", PROBE, backend], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_torch_backend_extra_memory_is_a_small_fraction_of_naive():
    naive = _extra_memory("reference")
    chunked = _extra_memory("torch")
    assert chunked["loss"] == pytest.approx(naive["loss"], rel=1e-4)
    assert naive["extra_mib"] > 1000, naive  # the naive step holds several 4096 x 32000 float32 buffers
    assert chunked["extra_mib"] < 0.1 * naive["extra_mib"], (chunked, naive)
