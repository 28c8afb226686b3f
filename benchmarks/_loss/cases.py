"""The problems the benchmark measures: shapes, random inputs, and the float64 reference of each step.

A case is P pairs of 2P rows x T tokens (rows [0, P) chosen, [P, 2P) rejected, TRL's order), the
first ``prompt_fraction`` of every row masked as prompt (label -100), an lm_head of V x H. Every
implementation sees the same inputs, drawn from the case's seed on its device: standard normal
hidden states, a weight scaled to give logits of a few units, uniform random labels, and, for the
per-token mode, a standard normal upstream gradient. Nothing is zero.

The step is the reference-free sigmoid DPO loss (mean over pairs): the reference model's
log-probs are constants of the step, and Liger's API can only take them as a reference model's
hidden states (an extra forward pass), so all implementations run without them. Random sequences
differ in log-prob by tens of nats, so beta is 0.01: the sigmoid is not saturated, every pair's
gradient counts, and the errors measure the kernels rather than the conditioning of a saturated loss.

Two more objectives run on the same batch, beside Liger's fused versions: SimPO (reference-free by
definition: the length-averaged log-probs, ``SIMPO_BETA``, ``SIMPO_GAMMA``, no NLL term) and KTO
(rows [0, P) desirable, [P, 2P) undesirable, as TRL unpairs a preference batch; reference-free, with
a constant KL estimate ``kto_kl(case)`` near the rows' expected log-prob, so that ``x - kl`` is a few
tens of nats and beta 0.01 leaves the sigmoid unsaturated).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

IGNORE = -100
BETA = 0.01

# What each mode computes, and the products on valid tokens its GEMM line holds.
#   dpo:     the full step, gradients for hidden and weight (hW^T, dZ W, dZ^T h)
#   frozen:  lm_head frozen (LoRA): gradient for hidden only (hW^T, dZ W)
#   forward: no gradient at all, e.g. the reference model's sequence log-probs (hW^T)
#   token:   per-token log-probs, backward with a random per-token upstream gradient (3 products)
#   dpo-metrics: the full step that also forms TRL's per-token metrics (entropy, mean logit, target
#            top-1), as a DPO trainer that logs them runs it; the same 3 products
#   simpo, kto: the full step of those objectives (3 products)
GEMM_PRODUCTS = {"dpo": 3, "frozen": 2, "forward": 1, "token": 3, "dpo-metrics": 3, "simpo": 3, "kto": 3}
MODES = tuple(GEMM_PRODUCTS)
# modes whose peers must form TRL's per-token metrics besides the loss
METRICS_MODES = ("dpo-metrics",)
# the modes of an objective other than DPO: run by dpo_fast, the naive step and Liger's fused losses
OBJECTIVE_MODES = ("simpo", "kto")
SIMPO_BETA, SIMPO_GAMMA = 2.0, 0.5


@dataclass(frozen=True)
class Case:
    """One problem shape; ``name`` groups cases in the report (``sweep`` cases vary the tokens)."""

    name: str
    pairs: int
    length: int
    hidden: int
    vocab: int
    prompt_fraction: float
    dtype: str
    modes: tuple[str, ...] = ("dpo",)
    seed: int = 0

    @property
    def tokens(self) -> int:
        return 2 * self.pairs * self.length

    @property
    def prompt_length(self) -> int:
        return int(self.length * self.prompt_fraction)

    @property
    def valid_tokens(self) -> int:
        return 2 * self.pairs * (self.length - self.prompt_length)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def flops(self, mode: str) -> int:
        """Useful FLOPs of the step: 2 per multiply-add of each product the mode needs, on valid tokens."""
        return 2 * GEMM_PRODUCTS[mode] * self.valid_tokens * self.hidden * self.vocab

    def describe(self) -> dict:
        return {**asdict(self), "tokens": self.tokens, "valid_tokens": self.valid_tokens}


def _sweep(tokens: list[int], hidden: int, vocab: int, dtype: str, max_length: int) -> list[Case]:
    cases = []
    for count in tokens:
        length = min(max_length, count // 2)
        cases.append(Case("sweep", count // (2 * length), length, hidden, vocab, 0.5, dtype))
    return cases


HEADLINE = Case("headline", 8, 1024, 4096, 128256, 0.5, "bfloat16", modes=MODES)

SUITES: dict[str, list[Case]] = {
    # H100/H200: the issues' shapes, then tokens from 1k to 64k at the headline head until each runs out of memory
    "gpu": [
        HEADLINE,
        Case("cce_paper", 4, 1024, 2304, 256000, 0.0, "bfloat16"),
        Case("qwen2", 8, 1024, 3584, 152064, 0.5, "bfloat16"),
        *_sweep([2**k * 1024 for k in range(7)], 4096, 128256, "bfloat16", 1024),
    ],
    # CPU: each implementation in its own process, time and peak RSS growth
    "cpu": [Case("cpu", 4, 512, 512, 32000, 0.5, "float32", modes=("dpo", "dpo-metrics", *OBJECTIVE_MODES))],
    # CPU: the cpu case's head, 256 to 4096 tokens (4096: the cpu case itself), for the plots
    "cpu-sweep": _sweep([2**k * 256 for k in range(5)], 512, 32000, "float32", 512),
    # CI: tiny shapes, every mode, a two-point sweep for the plots
    "smoke": [
        Case("smoke", 2, 16, 32, 256, 0.5, "float32", modes=MODES),
        *_sweep([64, 128], 32, 256, "float32", 32),
    ],
}


@dataclass
class Batch:
    """The inputs of one step on one device.

    hidden: (2P, T, H), weight: (V, H), labels: (2P, T) int64 (-100 on the prompt),
    upstream: (2P, T) float32, the per-token mode's upstream gradient,
    valid_index: (N_valid,) int64, flat positions of the labelled tokens (for peers that take
    the valid tokens only, as TRL's trainer gives them).
    """

    case: Case
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    upstream: torch.Tensor
    valid_index: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.valid_index = (self.labels.reshape(-1) != IGNORE).nonzero().squeeze(1)

    def clear_grads(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None


def make_batch(case: Case, device: str | torch.device, mode: str) -> Batch:
    """The case's inputs on ``device``, the same values on every call (drawn from ``case.seed``).

    hidden requires grad except in the forward mode, weight in the dpo and token modes.
    """
    gen = torch.Generator(device=device).manual_seed(case.seed)
    rows, width = 2 * case.pairs, case.hidden
    hidden = torch.randn(rows, case.length, width, device=device, generator=gen).to(case.torch_dtype)
    # logits of a few units: a softmax that is neither flat nor one-hot
    weight = (torch.randn(case.vocab, width, device=device, generator=gen) * (2.0 / width**0.5)).to(case.torch_dtype)
    labels = torch.randint(0, case.vocab, (rows, case.length), device=device, generator=gen)
    labels[:, : case.prompt_length] = IGNORE
    upstream = torch.randn(rows, case.length, device=device, generator=gen)
    hidden.requires_grad_(mode != "forward")
    weight.requires_grad_(GEMM_PRODUCTS[mode] == 3)
    return Batch(case, hidden, weight, labels, upstream)


def kto_kl(case: Case) -> float:
    """The KTO mode's KL estimate: about a row's expected summed log-prob, ``-(valid tokens) * (ln V + 2)``.

    The logits of ``make_batch`` are about ``N(0, 4)`` per entry, so ``log p`` of a random label is about
    ``-(ln V + 2)`` (``logsumexp`` of V such logits is about ``ln V + 2``) with a spread of a couple of nats.
    """
    return -(case.length - case.prompt_length) * (math.log(case.vocab) + 2.0)


def desirable(case: Case, device: str | torch.device) -> torch.Tensor:
    """(2P,) bool: the KTO mode's rows [0, P) desirable, [P, 2P) undesirable (TRL's unpaired preference batch)."""
    return torch.arange(2 * case.pairs, device=device) < case.pairs


def dpo_loss(seq_logps: torch.Tensor) -> torch.Tensor:
    """The reference-free sigmoid DPO loss on (2P,) sequence log-probs: ``mean_p -logsigmoid(beta*(c_p - r_p))``."""
    chosen, rejected = seq_logps.chunk(2)
    return -F.logsigmoid(BETA * (chosen - rejected)).mean()


def reference(batch: Batch, mode: str) -> dict[str, torch.Tensor]:
    """The step's outputs in float64, naive and per pair, kept as float32 on the CPU (out of the
    device memory that the measured implementations get).

    Each pair's loss term depends on its own two rows, so the logits are formed one pair (or, for
    the per-token and KTO modes, one row) at a time, on valid tokens only. Returns the outputs that the mode
    has: ``loss``, ``seq_logps`` (2P,), ``token_logps`` (2P, T), ``grad_hidden`` (2P, T, H),
    ``grad_weight`` (V, H). The simpo mode's ``seq_logps`` are length-averaged (SimPO's and Liger's).
    """
    case = batch.case
    rows, width = 2 * case.pairs, case.hidden
    weight = batch.weight.detach().double().requires_grad_(GEMM_PRODUCTS[mode] == 3)
    grad_hidden = torch.zeros(rows, case.length, width, dtype=torch.float64, device=weight.device)
    seq_logps = torch.zeros(rows, dtype=torch.float64, device=weight.device)
    token_logps = torch.zeros(rows, case.length, dtype=torch.float64, device=weight.device)
    loss = torch.zeros((), dtype=torch.float64, device=weight.device)
    per_row = mode in ("token", "kto")
    groups = [[r] for r in range(rows)] if per_row else [[p, case.pairs + p] for p in range(case.pairs)]
    wanted = desirable(case, "cpu")
    for group in groups:
        labels = batch.labels[group]
        valid = labels != IGNORE
        hidden = batch.hidden.detach()[group].double().requires_grad_(mode != "forward")
        with torch.set_grad_enabled(mode != "forward"):
            logp = torch.log_softmax(hidden[valid] @ weight.t(), dim=-1).gather(1, labels[valid][:, None]).squeeze(1)
            tokens = torch.zeros(valid.shape, dtype=torch.float64, device=logp.device).masked_scatter(valid, logp)
            token_logps[group] = tokens.detach()
            seq_logps[group] = tokens.detach().sum(-1)
            if mode == "forward":
                continue
            if mode == "token":
                term = (tokens * batch.upstream[group].double()).sum()
            elif mode == "kto":
                sign = 1.0 if wanted[group[0]] else -1.0
                term = (1 - torch.sigmoid(sign * BETA * (tokens.sum() - kto_kl(case)))) / rows
            elif mode == "simpo":
                chosen, rejected = tokens.sum(-1) / valid.sum(-1).clamp(min=1)
                seq_logps[group] = torch.stack([chosen, rejected]).detach()
                term = -F.logsigmoid(SIMPO_BETA * (chosen - rejected) - SIMPO_GAMMA) / case.pairs
            else:
                chosen, rejected = tokens.sum(-1)
                term = -F.logsigmoid(BETA * (chosen - rejected)) / case.pairs
            term.backward()
        loss += term.detach()
        grad_hidden[group] = hidden.grad
    out = {"seq_logps": seq_logps} if mode == "forward" else {"loss": loss, "grad_hidden": grad_hidden}
    if mode == "token":
        out = {"token_logps": token_logps, **out}
    elif mode not in ("forward", "kto"):  # Liger's KTO returns sums over the desirable and undesirable rows only
        out["seq_logps"] = seq_logps
    if weight.grad is not None:
        out["grad_weight"] = weight.grad
    return {key: value.float().cpu() for key, value in out.items()}
