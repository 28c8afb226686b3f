"""Elementwise pieces the objectives are built from, each returning its value and its slope together.

Every function here maps a tensor to ``(value, slope)`` of the same shape, where ``slope`` is the
derivative of ``value`` with respect to the argument named first. The objectives chain these slopes
by hand into the gradients the fused pass needs (autograd cannot run inside a custom op; see
``dpo_fast.objectives``), so each formula is written once, next to its derivative.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LN2 = math.log(2.0)

# TRL 1.16 clamps the alpha-divergence exponent at 80 for float32 (and bfloat16) log-ratios so that
# exp() stays finite; the objectives work on float32 or float64 sums, so 80 is the clamp that matches.
ALPHA_DIVERGENCE_CLAMP = 80.0

MARGIN_LOSSES = ("sigmoid", "robust", "hinge", "ipo", "exo_pair", "discopop")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def sigmoid_slope(x: torch.Tensor) -> torch.Tensor:
    """``d sigmoid(x) / dx = sigmoid(x) * sigmoid(-x)``, without cancellation in either tail."""
    return torch.sigmoid(x) * torch.sigmoid(-x)


def log1mexp(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log(1 - exp(x))`` for ``x <= 0`` (TRL's ORPO branch at ``-ln 2``) and its slope ``-1/expm1(-x)``."""
    value = torch.where(x < -LN2, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
    return value, -1.0 / torch.expm1(-x)


def margin_loss(
    kind: str, margin: torch.Tensor, beta: float, label_smoothing: float = 0.0, discopop_tau: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pairwise loss of one margin ``m`` (chosen score minus rejected score), with ``x = beta * m``.

    - ``sigmoid``:  ``-(1-ls)*logsigmoid(x) - ls*logsigmoid(-x)`` (cDPO; TRL's aot, CPO's and SimPO's form)
    - ``robust``:   ``(-(1-ls)*logsigmoid(x) + ls*logsigmoid(-x)) / (1-2*ls)``
    - ``hinge``:    ``relu(1 - x)`` (subgradient 0 at the kink, as ``torch.relu``)
    - ``ipo``:      ``(m - 1/(2*beta))**2``
    - ``exo_pair``: ``s(x)*(logsigmoid(x) - log(1-ls)) + s(-x)*(logsigmoid(-x) - log(ls))``
    - ``discopop``: ``-logsigmoid(x)*(1-s(x/tau)) + exp(-x)*s(x/tau)`` (the second product taken as
      ``exp(-x + logsigmoid(x/tau))``: finite where TRL's ``inf * 0`` is NaN, equal elsewhere)

    Returns:
        (value, d value / d margin), both shaped like ``margin``.
    """
    x, ls = beta * margin, label_smoothing
    if kind == "sigmoid":
        value = -(1 - ls) * F.logsigmoid(x) - ls * F.logsigmoid(-x)
        return value, beta * (-(1 - ls) * torch.sigmoid(-x) + ls * torch.sigmoid(x))
    if kind == "robust":
        value = (-(1 - ls) * F.logsigmoid(x) + ls * F.logsigmoid(-x)) / (1 - 2 * ls)
        return value, beta * (-(1 - ls) * torch.sigmoid(-x) - ls * torch.sigmoid(x)) / (1 - 2 * ls)
    if kind == "hinge":
        return torch.relu(1 - x), -beta * (1 - x > 0).to(x.dtype)
    if kind == "ipo":
        offset = margin - 1 / (2 * beta)
        return offset**2, 2 * offset
    if kind == "exo_pair":
        value = torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-ls)) + torch.sigmoid(-x) * (
            F.logsigmoid(-x) - math.log(ls)
        )
        # with logsigmoid(x) - logsigmoid(-x) = x, the four terms' derivatives collapse to one product
        return value, beta * sigmoid_slope(x) * (x - math.log1p(-ls) + math.log(ls))
    if kind == "discopop":
        mix = torch.sigmoid(x / discopop_tau)
        exp_part = torch.exp(-x + F.logsigmoid(x / discopop_tau))  # exp(-x) * mix
        value = -F.logsigmoid(x) * (1 - mix) + exp_part
        slope = (
            -torch.sigmoid(-x) * (1 - mix)
            + F.logsigmoid(x) * sigmoid_slope(x / discopop_tau) / discopop_tau
            + exp_part * (torch.sigmoid(-x / discopop_tau) / discopop_tau - 1)
        )
        return value, beta * slope
    raise ValueError(f"margin loss must be one of {MARGIN_LOSSES}, got {kind!r}")


def f_divergence_score(kind: str, logratio: torch.Tensor, alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """f-DPO's score ``f'(t)`` at ``t = pi/pi_ref = exp(logratio)``, as TRL 1.16 computes it.

    - ``reverse_kl``:       ``logratio`` (standard DPO)
    - ``forward_kl``:       ``1 - exp(-logratio)``
    - ``js_divergence``:    ``log 2 + logsigmoid(logratio)``
    - ``alpha_divergence``: ``(exp(min((alpha-1)*logratio, 80)) - 1) / (alpha-1)``; ``reverse_kl`` when
      ``|alpha - 1| < 1e-6``. The clamp is TRL's: past it the score is flat and its slope 0.

    Returns:
        (score, d score / d logratio), both shaped like ``logratio``.
    """
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):
        return logratio, torch.ones_like(logratio)
    if kind == "forward_kl":
        return -torch.expm1(-logratio), torch.exp(-logratio)
    if kind == "js_divergence":
        return LN2 + F.logsigmoid(logratio), torch.sigmoid(-logratio)
    if kind == "alpha_divergence":
        exponent = (alpha - 1.0) * logratio
        clamped = exponent.clamp(max=ALPHA_DIVERGENCE_CLAMP)
        return torch.expm1(clamped) / (alpha - 1.0), torch.exp(clamped) * (exponent <= ALPHA_DIVERGENCE_CLAMP)
    raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {kind!r}")
