"""What the public losses return, formed from a ``core.PreferenceResult`` in the objective's units."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import objectives
from .core import PreferenceResult, TokenMetrics

__all__ = ["DPOOutput", "KTOOutput", "TokenMetrics", "kto_output", "pair_output"]


@dataclass
class DPOOutput:
    """What the pairwise losses (``fused_linear_dpo_loss``, ``fused_linear_cpo_loss``, ``fused_linear_orpo_loss``)
    return. Float32 tensors (float64 for float64 inputs); P is the number of pairs.

    Attributes:
        loss: () the objective; differentiable w.r.t. hidden, weight and bias.
        chosen_logps, rejected_logps: (P,) policy log-probs: the objective's sums (LD-DPO-weighted with
            ``ld_alpha``), length-averaged when the objective averages (``average_log_prob``); differentiable.
        chosen_rewards, rejected_rewards: (P,) TRL's rewards, detached: ``beta * (logps - ref_logps)`` for DPO,
            ``beta * logps`` for CPO (AlphaPO: ``beta`` times its reward) and ORPO.
        reward_accuracy: () fraction of pairs whose chosen reward beats the rejected one, detached.
        reward_margin: () mean of ``chosen_rewards - rejected_rewards``, detached.
        token_metrics: with ``return_token_metrics=True``, the policy's ``TokenMetrics`` (labels'
            shape) from the same pass as the log-probs; None otherwise.
        nll_loss: () the NLL of the chosen tokens (TRL's ``nll_loss``: mean over those tokens, before any
            weight), detached; None for an objective without one.
    """

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    reward_accuracy: torch.Tensor
    reward_margin: torch.Tensor
    token_metrics: TokenMetrics | None = None
    nll_loss: torch.Tensor | None = None


@dataclass
class KTOOutput:
    """What ``fused_linear_kto_loss`` returns. Float32 tensors (float64 for float64 inputs); B completions.

    Attributes:
        loss: () the KTO loss; differentiable w.r.t. hidden, weight and bias.
        logps: (B,) summed policy log-probs of the completions; differentiable.
        rewards: (B,) ``beta * (logps - ref_logps)``, detached (TRL logs their means over the desirable and
            the undesirable completions as ``rewards/chosen`` and ``rewards/rejected``).
        kl: () the KL estimate the loss used (0 for ``apo_zero_unpaired``), detached.
        token_metrics: as ``DPOOutput.token_metrics``.
    """

    loss: torch.Tensor
    logps: torch.Tensor
    rewards: torch.Tensor
    kl: torch.Tensor
    token_metrics: TokenMetrics | None = None


def pair_output(objective: objectives.Objective, result: PreferenceResult,
                ref_logps: torch.Tensor | None) -> DPOOutput:  # fmt: skip
    """``DPOOutput`` of a paired objective's result.

    Args:
        ref_logps: (2P,) the reference's log-probs in the objective's units (``objectives.reported_logps``),
            chosen first; None for a reference-free objective.
    """
    logps = objectives.reported_logps(objective, result.logps, result.counts)
    rewards = objective.rewards(logps, ref_logps)
    chosen_rewards, rejected_rewards = rewards.chunk(2)
    chosen_logps, rejected_logps = logps.chunk(2)
    return DPOOutput(
        loss=result.loss,
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        reward_accuracy=(chosen_rewards > rejected_rewards).to(rewards.dtype).mean(),
        reward_margin=(chosen_rewards - rejected_rewards).mean(),
        token_metrics=result.token_metrics,
        nll_loss=result.nll_loss,
    )


def kto_output(objective: objectives.KTOObjective, result: PreferenceResult,
               ref_logps: torch.Tensor | None) -> KTOOutput:  # fmt: skip
    """``KTOOutput`` of a KTO result; ``ref_logps``: (B,) the reference's summed log-probs, or None."""
    return KTOOutput(
        loss=result.loss, logps=result.logps, rewards=objective.rewards(result.logps, ref_logps), kl=result.kl,
        token_metrics=result.token_metrics,
    )  # fmt: skip
