"""Memory on CPU: each chunked CPU backend's extra memory for a real-size step is a small fraction of the naive step's.

Each step runs in a fresh process. Just before the step the kernel's high-water mark of resident
memory (``VmHWM``) is reset to the current resident set through ``/proc/self/clear_refs``; its growth
by the end is the step's extra memory (the gradients included, for both). (``ru_maxrss`` would not
do: a child process starts with its parent's peak.) A tiny warm-up call first takes the one-time
costs (imports, library buffers). glibc's mmap threshold is fixed at its 128 KiB default: left
dynamic, it rises after the first large free and keeps chunk-sized blocks in the heap, and the
peak then varies by +-50 MiB from run to run with the heap's fragmentation, not with the tensors.
"""

import json
import os
import subprocess
import sys

import pytest

PROBE = r"""
import json, sys
import torch
import dpo_fast

def peak_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

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
with open("/proc/self/clear_refs", "w") as clear_refs:
    clear_refs.write("5")
before = peak_mib()
out = dpo_fast.fused_linear_dpo_loss(hidden, weight, labels, ref_chosen_logps=ref, ref_rejected_logps=ref,
                                     backend=backend)
out.loss.backward()
print(json.dumps({"extra_mib": peak_mib() - before, "loss": out.loss.item()}))
"""


def _extra_memory(backend: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    result = subprocess.run([sys.executable, "-c", PROBE, backend], capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.cpu_only(reason="measures the resident memory of a CPU process")
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_chunked_cpu_backend_extra_memory_is_a_small_fraction_of_naive(backend):
    naive = _extra_memory("reference")
    chunked = _extra_memory(backend)
    assert chunked["loss"] == pytest.approx(naive["loss"], rel=1e-4)
    assert naive["extra_mib"] > 1000, naive  # the naive step holds several 4096 x 32000 float32 buffers
    assert chunked["extra_mib"] < 0.1 * naive["extra_mib"], (chunked, naive)
