"""The DPO family of pairwise objectives on per-sequence log-probabilities.

Everything here works on ``(P,)`` float32 tensors and is pure PyTorch: the cost of DPO is in the
language-model head, not here. Formulas and names follow TRL's ``DPOTrainer`` (1.16). With
``c = chosen_logps - ref_chosen_logps``, ``r = rejected_logps - ref_rejected_logps``, ``u = c - r``,
``ls = label_smoothing`` and ``s = sigmoid``:

- ``sigmoid``:   ``-(1-ls)*logsigmoid(beta*u) - ls*logsigmoid(-beta*u)`` (cDPO when ``ls > 0``)
- ``robust``:    ``(-(1-ls)*logsigmoid(beta*u) + ls*logsigmoid(-beta*u)) / (1-2*ls)``, ``0 <= ls < 1/2``
- ``hinge``:     ``relu(1 - beta*u)``
- ``ipo``:       ``(u - 1/(2*beta))**2`` (on length-averaged log-probs; see ``default_average_log_prob``)
- ``exo_pair``:  ``s(x)*(logsigmoid(x) - log(1-ls)) + s(-x)*(logsigmoid(-x) - log(ls))``, ``x = beta*u``,
  ``0 < ls < 1`` (EXO's epsilon)
- ``nca_pair``:  ``-logsigmoid(beta*c) - logsigmoid(-beta*c)/2 - logsigmoid(-beta*r)/2``
- ``bco_pair``:  ``-logsigmoid(beta*c) - logsigmoid(-beta*r)`` (TRL 1.16's form: no running reward mean)
- ``sppo_hard``: ``(c - 1/(2*beta))**2 + (r + 1/(2*beta))**2``
- ``apo_zero``:  ``1 - s(beta*c) + s(beta*r)``
- ``apo_down``:  ``s(beta*c) + 1 - s(beta*u)``

``label_smoothing`` enters ``sigmoid``, ``robust`` and ``exo_pair`` only; the others ignore it.
The loss is the mean over pairs. Each pair's term depends on that pair alone, so the gradient of
the loss with respect to a pair's two log-probs is known as soon as that pair's log-probs are:
``pair_loss_grads`` gives it in closed form, which is what lets the fused path form the LM-head
gradients during the forward pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = (
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
)  # fmt: skip


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
    c, r, ls = chosen_logratios, rejected_logratios, label_smoothing
    u = c - r
    if loss_type == "sigmoid":
        return -(1 - ls) * F.logsigmoid(beta * u) - ls * F.logsigmoid(-beta * u)
    if loss_type == "robust":
        return (-(1 - ls) * F.logsigmoid(beta * u) + ls * F.logsigmoid(-beta * u)) / (1 - 2 * ls)
    if loss_type == "hinge":
        return torch.relu(1 - beta * u)
    if loss_type == "ipo":
        return (u - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        x = beta * u
        return torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-ls)) + torch.sigmoid(-x) * (
            F.logsigmoid(-x) - math.log(ls)
        )
    if loss_type == "nca_pair":
        return -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)
    if loss_type == "sppo_hard":
        return (c - 1 / (2 * beta)) ** 2 + (r + 1 / (2 * beta)) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * u)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def _sigmoid_slope(x: torch.Tensor) -> torch.Tensor:
    """``d sigmoid(x) / dx = sigmoid(x) * sigmoid(-x)``, without cancellation in either tail."""
    return torch.sigmoid(x) * torch.sigmoid(-x)


def pair_loss_grads(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form ``d pair_losses / d chosen_logratios`` (and rejected), elementwise.

    For the losses of ``u`` alone the rejected gradient is the negated chosen one. ``hinge`` takes
    the subgradient 0 at the kink, as ``torch.relu`` does.

    Returns:
        (grad_chosen, grad_rejected): (P,) float32 each.
    """
    c, r, ls = chosen_logratios, rejected_logratios, label_smoothing
    u = c - r
    if loss_type == "sigmoid":
        du = -(1 - ls) * beta * torch.sigmoid(-beta * u) + ls * beta * torch.sigmoid(beta * u)
    elif loss_type == "robust":
        du = (-(1 - ls) * beta * torch.sigmoid(-beta * u) - ls * beta * torch.sigmoid(beta * u)) / (1 - 2 * ls)
    elif loss_type == "hinge":
        du = -beta * (1 - beta * u > 0).to(u.dtype)
    elif loss_type == "ipo":
        du = 2 * (u - 1 / (2 * beta))
    elif loss_type == "exo_pair":
        # with logsigmoid(x) - logsigmoid(-x) = x, the four terms' derivatives collapse to one product
        x = beta * u
        du = beta * _sigmoid_slope(x) * (x - math.log1p(-ls) + math.log(ls))
    elif loss_type == "nca_pair":
        return (
            -beta * torch.sigmoid(-beta * c) + 0.5 * beta * torch.sigmoid(beta * c),
            0.5 * beta * torch.sigmoid(beta * r),
        )
    elif loss_type == "bco_pair":
        return -beta * torch.sigmoid(-beta * c), beta * torch.sigmoid(beta * r)
    elif loss_type == "sppo_hard":
        return 2 * (c - 1 / (2 * beta)), 2 * (r + 1 / (2 * beta))
    elif loss_type == "apo_zero":
        return -beta * _sigmoid_slope(beta * c), beta * _sigmoid_slope(beta * r)
    elif loss_type == "apo_down":
        slope_u = beta * _sigmoid_slope(beta * u)
        return beta * _sigmoid_slope(beta * c) - slope_u, slope_u
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return du, -du
