"""Random DPO batches and the comparisons the tests share."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

IGNORE = -100

# The chunked backends that can run on this machine (the triton one in its interpreter on CPU).
# The C++ kernel of the device is always among them: where its extension cannot be built, the tests
# fail with the reason rather than skip it.
BACKENDS = ["torch"]
if importlib.util.find_spec("triton") is not None and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
):
    BACKENDS.append("triton")
BACKENDS.append("cuda" if torch.cuda.is_available() else "cpp")

# DPO_FAST_DEVICE_CHECK=1 declares the meta device for every backend (tests/tools/test_devices.py runs the suite so): a test
# whose tensors come from device_of(backend) hands meta tensors to dpo_fast, one that builds them anywhere else is
# caught at its first call into dpo_fast (tests/conftest.py).
DEVICE_CHECK = os.environ.get("DPO_FAST_DEVICE_CHECK") == "1"


def device_of(backend: str) -> torch.device:
    """The device a test of ``backend`` (a chunked backend or ``reference``) builds its tensors on.

    ``cuda``: CUDA. ``cpp``: CPU. ``torch``, ``triton`` and ``reference``: CUDA on a machine with a GPU, else CPU
    (``triton`` in its interpreter). Under the device check, meta for every backend.
    """
    if DEVICE_CHECK:
        return torch.device("meta")
    on_gpu = backend == "cuda" or (backend != "cpp" and torch.cuda.is_available())
    return torch.device("cuda" if on_gpu else "cpu")


# DESIGN.md's tolerances, relative error by norm against the float64 reference
TOLERANCE = {
    torch.float32: {"values": 1e-4, "grads": 1e-4},
    torch.bfloat16: {"values": 1e-2, "grads": 2e-2},
    torch.float16: {"values": 1e-2, "grads": 2e-2},
}


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-2) -> float:
    """``||actual - expected|| / max(||expected||, floor)``.

    The floor keeps near-zero references meaningful: a float32 log-prob of a near-certain token
    is 0 to within ulp(logsumexp), and a saturated loss underflows; those are measured against the
    floor, i.e. as absolute errors of ``tol * floor``.
    """
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return (actual - expected).norm().item() / max(expected.norm().item(), floor)


@dataclass(frozen=True)
class Case:
    """Shape and options of one random batch of P pairs (2P sequences of T tokens)."""

    pairs: int
    length: int
    hidden_dim: int
    vocab: int
    dtype: torch.dtype
    bias: bool
    softcap: float | None
    packed: bool
    seed: int

    def build(self, device: str | torch.device) -> dict:
        """hidden, weight, bias, labels (and segment_ids when packed), ref log-probs, all on ``device``."""
        gen = torch.Generator().manual_seed(self.seed)
        rows, length, width = 2 * self.pairs, self.length, self.hidden_dim
        hidden = torch.randn(rows, length, width, generator=gen)
        # logits of a few units: a softmax that is neither flat nor one-hot
        weight = torch.randn(self.vocab, width, generator=gen) * (2.0 / width**0.5)
        bias = torch.randn(self.vocab, generator=gen) if self.bias else None
        labels = torch.randint(0, self.vocab, (rows, length), generator=gen)
        prompt = torch.randint(0, length + 1, (rows,), generator=gen)  # prompt_len == length: no completion
        positions = torch.arange(length)
        labels[positions[None, :] < prompt[:, None]] = IGNORE
        labels[torch.rand(rows, length, generator=gen) < 0.15] = IGNORE  # scattered padding
        batch = {
            "hidden": hidden,
            "weight": weight,
            "bias": bias,
            "labels": labels,
            "ref_chosen_logps": torch.randn(self.pairs, generator=gen) * 3 - 5,
            "ref_rejected_logps": torch.randn(self.pairs, generator=gen) * 3 - 5,
        }
        if self.packed:
            # drop the padding columns after each sequence, shuffle the token order: ids say it all
            keep = positions[None, :] < torch.randint(1, length + 1, (rows,), generator=gen)[:, None]
            seg = torch.arange(rows)[:, None].expand(rows, length)[keep]
            order = torch.randperm(seg.shape[0], generator=gen)
            batch["hidden"] = hidden[keep][order]
            batch["labels"] = labels[keep][order]
            batch["segment_ids"] = seg[order]
        for key in ("hidden", "weight", "bias"):
            if batch[key] is not None:
                batch[key] = batch[key].to(self.dtype)
        return {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


@st.composite
def cases(draw, dtypes=(torch.float32, torch.bfloat16), max_pairs=3, max_length=9, max_hidden=40, max_vocab=80):
    dtype = draw(st.sampled_from(dtypes))
    # A 16-bit dL/dz (0.4% rounding) makes each gradient's error relative to the sum of its terms'
    # sizes; when a gradient has only a handful of elements, one sum that cancels (V = 2, H = 1)
    # dominates the norm and measures the problem's conditioning rather than the kernel. 16-bit
    # cases therefore start at H = 8 and V = 16; float32 cases take any H >= 1 and V >= 2.
    wide = dtype not in (torch.float32, torch.float64)
    return Case(
        pairs=draw(st.integers(1, max_pairs)),
        length=draw(st.integers(1, max_length)),
        hidden_dim=draw(st.integers(8 if wide else 1, max_hidden)),
        vocab=draw(st.integers(16 if wide else 2, max_vocab)),
        dtype=dtype,
        bias=draw(st.booleans()),
        softcap=draw(st.sampled_from([None, None, 2.5])),
        packed=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def leaves(batch: dict, dtype: torch.dtype | None = None) -> dict:
    """Copies of hidden, weight and bias that require grad (cast to ``dtype`` when given)."""
    out = dict(batch)
    for key in ("hidden", "weight", "bias"):
        if batch[key] is not None:
            value = batch[key].detach().clone()
            out[key] = (value if dtype is None else value.to(dtype)).requires_grad_(True)
    return out


def grads(batch: dict) -> dict:
    return {key: batch[key].grad for key in ("hidden", "weight", "bias") if batch[key] is not None}
