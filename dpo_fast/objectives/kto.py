"""KTO: unpaired desirable / undesirable completions, as TRL 1.16's ``KTOTrainer`` defines it.

Each sequence is a unit. With the log-ratio ``x = logps - ref_logps`` and the batch's KL estimate ``kl``
(a constant: TRL computes it under ``no_grad`` from mismatched (prompt, completion) pairs)::

    kto:                desirable: 1 - sigmoid(beta * (x - kl))     undesirable: 1 - sigmoid(beta * (kl - x))
    apo_zero_unpaired:  desirable: 1 - sigmoid(beta * x)            undesirable: sigmoid(beta * x)

    loss = mean over all B sequences of (desirable_weight or undesirable_weight) * term

Liger's fused KTO loss is the same with weights 1 and ``kl`` passed in (it does not clamp it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import checks
from .elementwise import sigmoid_slope
from .interface import BatchConstants, Needs, ObjectiveValue, SequenceInputs

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_kl_estimate(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """TRL's KL estimate on one process: ``mean(kl_logps - ref_kl_logps)`` clamped at 0, detached.

    Args:
        kl_logps, ref_kl_logps: (B,) summed log-probs of the mismatched completions under the policy
            (computed under ``no_grad``) and the reference. Across processes TRL gathers the per-process
            means and clamps their mean: do the same before passing ``BatchConstants(kl=...)``.
    Returns:
        () float, detached.
    """
    return (kl_logps.detach().double() - ref_kl_logps.detach().double()).mean().clamp(min=0)


@dataclass(frozen=True)
class KTOObjective:
    """KTO and APO-zero-unpaired.

    Attributes:
        beta: temperature; loss_type: one of ``KTO_LOSS_TYPES``.
        desirable_weight, undesirable_weight: weights of the two kinds of completion (TRL's names).
    """

    beta: float = 0.1
    loss_type: str = "kto"
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    paired = False
    local = True
    ld_alpha = None
    averaged = False

    def __post_init__(self):
        if not isinstance(self.loss_type, str) or self.loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {KTO_LOSS_TYPES}, got {self.loss_type!r}")
        checks.store(self, "beta", checks.positive("beta", self.beta))
        for name in ("desirable_weight", "undesirable_weight"):
            checks.store(self, name, checks.non_negative(name, getattr(self, name)))

    @property
    def needs(self) -> Needs:
        return Needs(reference=True, kl=self.loss_type == "kto")

    def rewards(self, logps: torch.Tensor, ref_logps: torch.Tensor | None) -> torch.Tensor:
        """TRL's rewards ``beta * (logps - ref_logps)`` (reference-free: ``beta * logps``), detached."""
        logps = logps.detach()
        return self.beta * (logps if ref_logps is None else logps - ref_logps.detach().to(logps))

    def evaluate(self, seqs: SequenceInputs, batch: BatchConstants) -> ObjectiveValue:
        if seqs.desirable is None:
            raise ValueError("KTO needs SequenceInputs.desirable: (S,) bool, True for a desirable completion")
        logps = seqs.logps.detach().double()
        logratios = logps if seqs.ref_logps is None else logps - seqs.ref_logps.detach().double()
        desirable = seqs.desirable.to(device=logps.device, dtype=torch.bool)
        kl = torch.as_tensor(batch.kl, dtype=torch.float64, device=logps.device) if self.needs.kl else 0.0
        # both types are 1 - sigmoid(sign * beta * (x - kl)), sign -1 for undesirable; apo_zero_unpaired has kl = 0
        sign = torch.where(desirable, 1.0, -1.0).to(logps)
        x = sign * self.beta * (logratios - kl)
        values = 1 - torch.sigmoid(x)
        slopes = -sign * self.beta * sigmoid_slope(x)
        weights = torch.where(desirable, torch.full_like(logps, self.desirable_weight), self.undesirable_weight)
        return ObjectiveValue(
            loss=(weights * values).sum() / batch.num_units, grad_logps=weights * slopes / batch.num_units
        )
