"""Reference-free pairwise objectives: CPO (and SimPO, AlphaPO) and ORPO, as TRL 1.16 defines them.

Both add the NLL of the chosen tokens, ``-sum nll_logps(chosen) / nll_tokens`` (TRL's cross-entropy
mean over the chosen rows' tokens), so the fused pass forms its gradient from the same log-probs.

**CPO** (``trl.experimental.cpo.CPOTrainer.cpo_loss``), on the policy's log-probs ``lp`` (averaged over
the completion for ``ipo`` and ``simpo``, summed otherwise): with the reward ``rho(lp) = lp``, or
AlphaPO's ``(1 - exp(-alpha*lp)) / alpha`` when ``alpha != 0``, the margin ``m = rho(lp_c) - rho(lp_r)``
(minus ``simpo_gamma / beta`` for ``simpo``) goes through ``sigmoid`` (with ``label_smoothing``; also
``simpo``), ``hinge`` or ``ipo`` (``elementwise.margin_loss``)::

    loss = mean_pairs(term) + nll_weight * NLL            (nll_weight: TRL's cpo_alpha, Liger's alpha)

**ORPO** (``trl.experimental.orpo.ORPOTrainer.odds_ratio_loss``), on the averaged log-probs::

    log_odds = (lp_c - lp_r) - (log(1 - exp(lp_c)) - log(1 - exp(lp_r)))
    loss = NLL - beta * mean_pairs(logsigmoid(log_odds))

TRL's ORPO takes the NLL over the chosen prompt *and* completion tokens (Liger's over the completion,
unless given ``nll_target``): which tokens is the caller's choice (``interface.token_weights``'s ``nll_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import checks
from .elementwise import log1mexp, margin_loss
from .interface import BatchConstants, Needs, ObjectiveValue, SequenceInputs, chosen_nll

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
_AVERAGED = ("ipo", "simpo")


@dataclass(frozen=True)
class CPOObjective:
    """CPO, SimPO and AlphaPO (TRL 1.16's ``CPOTrainer``; Liger's fused CPO and SimPO losses).

    Attributes:
        beta: temperature; loss_type: one of ``CPO_LOSS_TYPES``.
        label_smoothing: conservative sigmoid (``sigmoid``, ``simpo``); ``hinge`` and ``ipo`` ignore it.
        nll_weight: weight of the chosen NLL (TRL's ``cpo_alpha``, default 1.0; 0 for SimPO as in its paper).
        simpo_gamma: SimPO's target margin ``gamma`` (the sigmoid sees ``beta*m - gamma``).
        alpha: AlphaPO's reward shape; 0 for log-prob rewards.
        average_log_prob: None: True for ``ipo`` and ``simpo``, as TRL.
    """

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    nll_weight: float = 1.0
    simpo_gamma: float = 0.5
    alpha: float = 0.0
    average_log_prob: bool | None = None

    paired = True
    local = True
    ld_alpha = None

    def __post_init__(self):
        if not isinstance(self.loss_type, str) or self.loss_type not in CPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {CPO_LOSS_TYPES}, got {self.loss_type!r}")
        checks.store(self, "beta", checks.positive("beta", self.beta))
        label_smoothing = checks.number("label_smoothing", self.label_smoothing, "a number in [0, 1]")
        if not 0 <= label_smoothing <= 1:
            raise ValueError(f"label_smoothing must lie in [0, 1], got {self.label_smoothing!r}")
        checks.store(self, "label_smoothing", label_smoothing)
        for name in ("nll_weight", "simpo_gamma", "alpha"):
            checks.store(self, name, checks.number(name, getattr(self, name)))
        if not (self.average_log_prob is None or isinstance(self.average_log_prob, bool)):
            raise ValueError(f"average_log_prob must be True or False or None, got {self.average_log_prob!r}")

    @property
    def averaged(self) -> bool:
        """The log-probs are length-averaged (``average_log_prob``, or by default for ``ipo`` and ``simpo``)."""
        return self.loss_type in _AVERAGED if self.average_log_prob is None else self.average_log_prob

    @property
    def needs(self) -> Needs:
        return Needs(nll=self.nll_weight != 0)

    def rewards(self, logps: torch.Tensor, ref_logps: torch.Tensor | None = None) -> torch.Tensor:
        """TRL's logged rewards ``beta * rho(logps)`` of (already averaged, where ``averaged``) log-probs, detached;
        reference-free, so ``ref_logps`` is not read."""
        return self.beta * self._reward(logps.detach())[0]

    def _reward(self, logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``rho(logps)``: the log-probs, or AlphaPO's ``(1 - exp(-alpha * lp)) / alpha``; and its slope."""
        if self.alpha == 0:
            return logps, torch.ones_like(logps)
        return -torch.expm1(-self.alpha * logps) / self.alpha, torch.exp(-self.alpha * logps)

    def evaluate(self, seqs: SequenceInputs, batch: BatchConstants) -> ObjectiveValue:
        logps = seqs.logps.detach().double()
        scale = 1.0 / seqs.token_counts.detach().double().clamp(min=1) if self.averaged else torch.ones_like(logps)
        rewards, slopes = self._reward(logps * scale)
        reward_c, reward_r = rewards.chunk(2)
        margin = reward_c - reward_r
        if self.loss_type == "simpo":
            margin = margin - self.simpo_gamma / self.beta
        kind = "sigmoid" if self.loss_type == "simpo" else self.loss_type
        values, slope = margin_loss(kind, margin, self.beta, self.label_smoothing)
        slope_c, slope_r = (slopes * scale).chunk(2)
        loss = values.sum() / batch.num_units
        grad_logps = torch.cat([slope * slope_c, -slope * slope_r]) / batch.num_units
        grad_nll = None
        if self.needs.nll:
            nll, grad_nll = chosen_nll(seqs, batch, self.nll_weight)
            loss = loss + nll
        return ObjectiveValue(loss=loss, grad_logps=grad_logps, grad_nll_logps=grad_nll)


@dataclass(frozen=True)
class ORPOObjective:
    """ORPO (TRL 1.16's ``ORPOTrainer``; Liger's fused ORPO loss): ``NLL - beta * mean logsigmoid(log_odds)``.

    Attributes:
        beta: the odds-ratio term's weight (the paper's lambda).
    """

    beta: float = 0.1

    paired = True
    local = True
    ld_alpha = None
    needs = Needs(nll=True)

    averaged = True

    def __post_init__(self):
        checks.store(self, "beta", checks.positive("beta", self.beta))

    def rewards(self, logps: torch.Tensor, ref_logps: torch.Tensor | None = None) -> torch.Tensor:
        """TRL's logged rewards ``beta * logps`` of the averaged log-probs, detached (``ref_logps`` is not read)."""
        return self.beta * logps.detach()

    def evaluate(self, seqs: SequenceInputs, batch: BatchConstants) -> ObjectiveValue:
        """An empty completion (average log-prob 0, probability 1) has infinite odds: the loss is NaN, on every path
        (the public entry refuses it in eager mode)."""
        counts = seqs.token_counts.detach().double()
        scale = 1.0 / counts.clamp(min=1)
        chosen, rejected = (seqs.logps.detach().double() * scale).chunk(2)
        log1mexp_c, slope_c = log1mexp(chosen)
        log1mexp_r, slope_r = log1mexp(rejected)
        log_odds = (chosen - rejected) - (log1mexp_c - log1mexp_r)
        # d(-beta * logsigmoid(L)) / dL, then dL/dc = 1 - log1mexp'(c), dL/dr = log1mexp'(r) - 1
        outer = -self.beta * torch.sigmoid(-log_odds) / batch.num_units
        scale_c, scale_r = scale.chunk(2)
        grad_logps = torch.cat([outer * (1 - slope_c) * scale_c, outer * (slope_r - 1) * scale_r])
        nll, grad_nll = chosen_nll(seqs, batch, 1.0)
        loss = nll - self.beta * F.logsigmoid(log_odds).sum() / batch.num_units
        loss = torch.where((counts == 0).any(), torch.nan, loss)
        return ObjectiveValue(loss=loss, grad_logps=grad_logps, grad_nll_logps=grad_nll)
