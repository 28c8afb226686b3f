"""The DPO family of pairwise objectives on per-sequence log-probabilities.

Everything here works on ``(P,)`` float32 tensors and is pure PyTorch: the cost of DPO is in the
language-model head, not here. Formulas and names follow TRL's ``DPOTrainer``. With
``chosen_logratios = chosen_logps - ref_chosen_logps`` (likewise rejected) and
``u = chosen_logratios - rejected_logratios``:

- ``sigmoid``: ``-(1-ls)*logsigmoid(beta*u) - ls*logsigmoid(-beta*u)`` (cDPO when ``ls > 0``)
- ``robust``:  ``(-(1-ls)*logsigmoid(beta*u) + ls*logsigmoid(-beta*u)) / (1-2*ls)``
- ``hinge``:   ``relu(1 - beta*u)``
- ``ipo``:     ``(u - 1/(2*beta))**2`` (on length-averaged log-probs; see ``default_average_log_prob``)

The loss is the mean over pairs. Each pair's term depends on that pair alone, so the gradient of
the loss with respect to a pair's two log-probs is known as soon as that pair's log-probs are:
``pair_loss_grads`` gives it in closed form, which is what lets the fused path form the LM-head
gradients during the forward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")


def default_average_log_prob(loss_type: str) -> bool:
    """IPO is defined on length-averaged log-probs (as TRL computes it); the others on sums."""
    return loss_type == "ipo"


def pair_losses(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair DPO loss terms, differentiable.

    Args:
        chosen_logratios: (P,) float32, policy minus reference log-prob of each chosen completion.
        rejected_logratios: (P,) float32, the same for the rejected completions.
    Returns:
        (P,) float32 loss terms; the DPO loss is their mean.
    """
    u = chosen_logratios - rejected_logratios
    ls = label_smoothing
    if loss_type == "sigmoid":
        return -(1 - ls) * F.logsigmoid(beta * u) - ls * F.logsigmoid(-beta * u)
    if loss_type == "robust":
        return (-(1 - ls) * F.logsigmoid(beta * u) + ls * F.logsigmoid(-beta * u)) / (1 - 2 * ls)
    if loss_type == "hinge":
        return torch.relu(1 - beta * u)
    if loss_type == "ipo":
        return (u - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def pair_loss_grads(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ``d pair_losses / d chosen_logratios`` (and rejected), elementwise.

    Every loss here is a function of ``u`` alone, so the rejected gradient is the negated chosen
    one. ``hinge`` takes the subgradient 0 at the kink, as ``torch.relu`` does.

    Returns:
        (grad_chosen, grad_rejected): (P,) float32 each.
    """
    u = chosen_logratios - rejected_logratios
    ls = label_smoothing
    if loss_type == "sigmoid":
        du = -(1 - ls) * beta * torch.sigmoid(-beta * u) + ls * beta * torch.sigmoid(beta * u)
    elif loss_type == "robust":
        du = (-(1 - ls) * beta * torch.sigmoid(-beta * u) - ls * beta * torch.sigmoid(beta * u)) / (1 - 2 * ls)
    elif loss_type == "hinge":
        du = -beta * (1 - beta * u > 0).to(u.dtype)
    elif loss_type == "ipo":
        du = 2 * (u - 1 / (2 * beta))
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return du, -du
