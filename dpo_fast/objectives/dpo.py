"""The DPO family: every pairwise loss of TRL 1.16's ``DPOTrainer``, on per-sequence sums.

With ``c = logps_chosen - ref_chosen`` and ``r = logps_rejected - ref_rejected`` (the log-ratios), a
``DPOObjective`` is TRL's ``_compute_loss``::

    loss = sum_k weight_k * mean_pairs(omega * term_k)           (omega: WPO's pair weight, else 1)

where each term is one of

- margin losses on ``m = score(c)/n_c - score(r)/n_r`` (``score``: the f-divergence's ``f'``, the
  identity for ``reverse_kl``; ``n``: the token count for the length-averaged types, else 1), see
  ``elementwise.margin_loss``: ``sigmoid`` (cDPO with ``label_smoothing``; TRL's own ``sigmoid``
  has none), ``sigmoid_norm`` (sigmoid, averaged), ``robust``, ``hinge``, ``ipo`` (averaged),
  ``exo_pair``, ``discopop``;
- losses of ``c`` and ``r`` apart: ``nca_pair``, ``bco_pair``, ``sppo_hard``, ``apo_zero``, ``apo_down``;
- ``aot``: sigmoid (with ``label_smoothing``) of ``sort(c_logps - r_logps) - sort(ref_c - ref_r)``,
  and ``aot_unpaired``: of ``sort(c) - sort(r)`` (sorted across the batch: not pair-local);
- ``sft``: the mean NLL of the chosen completion tokens over the batch (unweighted by LD-DPO).

``ld_alpha`` (LD-DPO) changes the sums themselves (``interface.token_weights``), for the policy and the
reference alike. ``use_weighting`` (WPO) multiplies each pair's terms by
``exp(mean_t(logp - log sum_v p_v^2) of chosen) * exp(... of rejected)``, detached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import checks
from .elementwise import F_DIVERGENCES, f_divergence_score, margin_loss, sigmoid_slope
from .interface import BatchConstants, Needs, ObjectiveValue, SequenceInputs, chosen_nll

SORTED_LOSSES = ("aot", "aot_unpaired")
DPO_LOSS_TYPES = (
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down",
    "sigmoid_norm", "discopop", *SORTED_LOSSES, "sft",
)  # fmt: skip
AVERAGED_BY_DEFAULT = ("ipo", "sigmoid_norm")
TAKES_LABEL_SMOOTHING = ("sigmoid", "sigmoid_norm", "robust", "exo_pair", "aot", "aot_unpaired")
# TRL 1.16 reads label_smoothing in these only (its sigmoid has no cDPO term)
TRL_TAKES_LABEL_SMOOTHING = ("robust", "exo_pair", "aot", "aot_unpaired")
# TRL 1.16: the losses built on the chosen-rejected score difference, the only ones f-DPO generalizes
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
_MARGIN_KIND = {
    "sigmoid": "sigmoid", "sigmoid_norm": "sigmoid", "robust": "robust", "hinge": "hinge", "ipo": "ipo",
    "exo_pair": "exo_pair", "discopop": "discopop",
}  # fmt: skip


def default_average_log_prob(loss_type: str) -> bool:
    """IPO and sigmoid_norm are defined on length-averaged log-ratios (as TRL computes them); the others on sums."""
    return loss_type in AVERAGED_BY_DEFAULT


@dataclass(frozen=True)
class PairTerm:
    """One loss of a ``DPOObjective``.

    Attributes:
        loss_type: one of ``DPO_LOSS_TYPES``.
        weight: its weight in the sum (TRL's ``loss_weights``).
        label_smoothing: cDPO's / robust's flip rate, EXO's epsilon; read by ``TAKES_LABEL_SMOOTHING`` only.
    """

    loss_type: str
    weight: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self):
        kind = self.loss_type
        if not isinstance(kind, str) or kind not in DPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {kind!r}")
        checks.store(self, "weight", checks.number(f"the weight of loss_type={kind!r}", self.weight))
        ls = checks.number("label_smoothing", self.label_smoothing, "a number in [0, 1]")
        checks.store(self, "label_smoothing", ls)
        if kind in ("sigmoid", "sigmoid_norm") and not 0 <= ls <= 0.5:
            raise ValueError(
                f"label_smoothing must lie in [0, 0.5] for loss_type={kind!r} (cDPO's probability that a pair's "
                f"preference is flipped; above 0.5 the loss prefers the rejected completion), got {ls!r}"
            )
        if kind == "robust" and not 0 <= ls < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5) for loss_type='robust', got {ls!r}")
        if kind == "exo_pair" and not 0 < ls < 1:
            raise ValueError(
                f"label_smoothing must lie in (0, 1) for loss_type='exo_pair' (it is EXO's epsilon; the paper uses "
                f"1e-3), got {ls!r}"
            )
        if not 0 <= ls <= 1:
            raise ValueError(f"label_smoothing must lie in [0, 1], got {ls!r}")


@dataclass(frozen=True)
class DPOObjective:
    """A weighted sum of pairwise losses (TRL 1.16's ``DPOTrainer``), with its options.

    Attributes:
        beta: the temperature of every term.
        terms: the losses and their weights (None: sigmoid alone, weight 1).
        f_divergence_type, f_alpha_divergence_coef: f-DPO's score (``elementwise.f_divergence_score``).
        discopop_tau: DiscoPOP's temperature.
        use_weighting: WPO's pair weights (needs ``log sum_v p_v^2`` per token).
        ld_alpha: LD-DPO's weight of the tokens past a pair's shared completion length, or None.
        average_log_prob: divide each log-ratio (or score) by its sequence's token count; None: per term,
            True for ``ipo`` and ``sigmoid_norm`` only.
    """

    beta: float = 0.1
    terms: tuple[PairTerm, ...] | None = None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    use_weighting: bool = False
    ld_alpha: float | None = None
    average_log_prob: bool | None = None

    paired = True

    def __post_init__(self):
        checks.store(self, "beta", checks.positive("beta", self.beta))
        if self.terms is None:
            checks.store(self, "terms", (PairTerm("sigmoid"),))
        if isinstance(self.terms, PairTerm) or not all(isinstance(term, PairTerm) for term in self.terms):
            raise ValueError(f"terms must be a sequence of PairTerm, got {self.terms!r}")
        checks.store(self, "terms", tuple(self.terms))
        if not self.terms:
            raise ValueError("terms must hold at least one PairTerm, e.g. (PairTerm('sigmoid'),)")
        types = [term.loss_type for term in self.terms]
        if not isinstance(self.f_divergence_type, str) or self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {self.f_divergence_type!r}")
        checks.store(
            self, "f_alpha_divergence_coef", checks.number("f_alpha_divergence_coef", self.f_alpha_divergence_coef)
        )
        if self.f_divergence_type != "reverse_kl" and not set(types) <= set(F_DIVERGENCE_LOSS_TYPES):
            raise ValueError(
                f"f_divergence_type={self.f_divergence_type!r} applies only to the loss types "
                f"{F_DIVERGENCE_LOSS_TYPES} (as in TRL 1.16), got {types}; use f_divergence_type='reverse_kl'"
            )
        checks.store(self, "discopop_tau", checks.positive("discopop_tau", self.discopop_tau))
        for name, optional in (("use_weighting", False), ("average_log_prob", True)):
            value = getattr(self, name)
            if not (isinstance(value, bool) or (optional and value is None)):
                raise ValueError(f"{name} must be True or False{' or None' if optional else ''}, got {value!r}")
        if self.use_weighting and set(types) & {"aot", "aot_unpaired", "sft"}:
            raise ValueError(
                f"use_weighting=True (WPO) cannot weight {sorted(set(types) & {'aot', 'aot_unpaired', 'sft'})}: aot "
                "and aot_unpaired sort pairs across the batch (TRL 1.16 refuses them too), and TRL 1.16 fails on "
                "'sft' with weighting (an in-place product on an expanded tensor), so its meaning is undefined"
            )
        if self.ld_alpha is not None:
            ld_alpha = checks.number("ld_alpha", self.ld_alpha, "a number in [0, 1] (LD-DPO) or None")
            if not 0.0 <= ld_alpha <= 1.0:
                raise ValueError(f"ld_alpha must lie in [0, 1] (LD-DPO) or be None, got {self.ld_alpha!r}")
            checks.store(self, "ld_alpha", ld_alpha)

    @property
    def averaged(self) -> bool:
        """Every pairwise term sees length-averaged log-probs (with ``average_log_prob=None``: every one of them
        is ``ipo`` or ``sigmoid_norm``): the units in which a caller reports log-probs and rewards."""
        pairwise = [term.loss_type for term in self.terms if term.loss_type != "sft"]
        if self.average_log_prob is not None:
            return self.average_log_prob and bool(pairwise)
        return bool(pairwise) and all(default_average_log_prob(kind) for kind in pairwise)

    @property
    def local(self) -> bool:
        return not any(term.loss_type in SORTED_LOSSES for term in self.terms)

    @property
    def needs(self) -> Needs:
        types = {term.loss_type for term in self.terms}
        return Needs(reference=bool(types - {"sft"}), nll="sft" in types, wpo=self.use_weighting)

    def rewards(self, logps: torch.Tensor, ref_logps: torch.Tensor | None) -> torch.Tensor:
        """TRL's rewards ``beta * (logps - ref_logps)`` (reference-free: ``beta * logps``), detached."""
        logps = logps.detach()
        return self.beta * (logps if ref_logps is None else logps - ref_logps.detach().to(logps))

    def evaluate(self, seqs: SequenceInputs, batch: BatchConstants) -> ObjectiveValue:
        """Loss share and gradients of ``G`` whole pairs (``seqs`` of ``2G`` sequences, chosen first)."""
        logps = seqs.logps.detach().double()
        ref = torch.zeros_like(logps) if seqs.ref_logps is None else seqs.ref_logps.detach().double()
        counts = seqs.token_counts.detach().double().clamp(min=1)
        logratios = logps - ref
        pair_weight = None if not self.use_weighting else _wpo_pair_weights(seqs.wpo_logps, counts)
        loss = logps.new_zeros(())
        grad_logps = torch.zeros_like(logps)
        grad_nll = None
        for term in self.terms:
            if term.loss_type == "sft":
                nll, grad = chosen_nll(seqs, batch, term.weight)
                loss = loss + nll
                grad_nll = grad if grad_nll is None else grad_nll + grad
                continue
            average = (
                default_average_log_prob(term.loss_type) if self.average_log_prob is None else self.average_log_prob
            )
            scale = 1.0 / counts if average else torch.ones_like(counts)
            values, grad_chosen, grad_rejected = self._term(term, logps * scale, ref * scale, logratios, scale)
            if pair_weight is not None:
                values, grad_chosen, grad_rejected = (t * pair_weight for t in (values, grad_chosen, grad_rejected))
            factor = term.weight / batch.num_units
            loss = loss + factor * values.sum()
            grad_logps = grad_logps + factor * torch.cat([grad_chosen, grad_rejected])
        return ObjectiveValue(loss=loss, grad_logps=grad_logps, grad_nll_logps=grad_nll)

    def _term(self, term, logps, ref, logratios, scale):
        """One term's (G,) values and their gradients w.r.t. the chosen and rejected log-ratio sums."""
        kind, beta, ls = term.loss_type, self.beta, term.label_smoothing
        scale_c, scale_r = scale.chunk(2)
        if kind in _MARGIN_KIND:
            scores, slopes = f_divergence_score(self.f_divergence_type, logratios, self.f_alpha_divergence_coef)
            score_c, score_r = (scores * scale).chunk(2)
            slope_c, slope_r = (slopes * scale).chunk(2)
            values, slope = margin_loss(_MARGIN_KIND[kind], score_c - score_r, beta, ls, self.discopop_tau)
            return values, slope * slope_c, -slope * slope_r
        if kind in SORTED_LOSSES:
            return _sorted_term(kind, logps, ref, beta, ls, scale_c, scale_r)
        chosen, rejected = (logratios * scale).chunk(2)
        values, grad_chosen, grad_rejected = _two_sided_term(kind, chosen, rejected, beta)
        return values, grad_chosen * scale_c, grad_rejected * scale_r


def _two_sided_term(kind: str, c: torch.Tensor, r: torch.Tensor, beta: float):
    """Losses of the chosen and rejected log-ratios apart: (values, d/dc, d/dr), (G,) each."""
    if kind == "nca_pair":
        value = -F.logsigmoid(beta * c) - 0.5 * F.logsigmoid(-beta * c) - 0.5 * F.logsigmoid(-beta * r)
        return (
            value,
            -beta * torch.sigmoid(-beta * c) + 0.5 * beta * torch.sigmoid(beta * c),
            0.5 * beta * torch.sigmoid(beta * r),
        )
    if kind == "bco_pair":
        value = -F.logsigmoid(beta * c) - F.logsigmoid(-beta * r)
        return value, -beta * torch.sigmoid(-beta * c), beta * torch.sigmoid(beta * r)
    if kind == "sppo_hard":
        high, low = c - 1 / (2 * beta), r + 1 / (2 * beta)
        return high**2 + low**2, 2 * high, 2 * low
    if kind == "apo_zero":
        value = 1 - torch.sigmoid(beta * c) + torch.sigmoid(beta * r)
        return value, -beta * sigmoid_slope(beta * c), beta * sigmoid_slope(beta * r)
    if kind == "apo_down":
        slope_margin = beta * sigmoid_slope(beta * (c - r))
        value = torch.sigmoid(beta * c) + 1 - torch.sigmoid(beta * (c - r))
        return value, beta * sigmoid_slope(beta * c) - slope_margin, slope_margin
    raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {kind!r}")


def _sorted_term(kind, logps, ref, beta, ls, scale_c, scale_r):
    """TRL's aot / aot_unpaired: the sigmoid loss of sorted margins; gradients go back to each pair's place."""
    logps_c, logps_r = logps.chunk(2)
    ref_c, ref_r = ref.chunk(2)
    if kind == "aot":
        margins, order = torch.sort(logps_c - logps_r)
        values, slope = margin_loss("sigmoid", margins - torch.sort(ref_c - ref_r).values, beta, ls)
        grad_margin = torch.zeros_like(slope).index_copy_(0, order, slope)
        return values, grad_margin * scale_c, -grad_margin * scale_r
    chosen, order_c = torch.sort(logps_c - ref_c)
    rejected, order_r = torch.sort(logps_r - ref_r)
    values, slope = margin_loss("sigmoid", chosen - rejected, beta, ls)
    grad_chosen = torch.zeros_like(slope).index_copy_(0, order_c, slope)
    grad_rejected = torch.zeros_like(slope).index_copy_(0, order_r, -slope)
    return values, grad_chosen * scale_c, grad_rejected * scale_r


def _wpo_pair_weights(wpo_logps: torch.Tensor | None, counts: torch.Tensor) -> torch.Tensor:
    """(G,) WPO's ``exp(mean aligned logp of chosen) * exp(... of rejected)``, detached (TRL: under no_grad)."""
    if wpo_logps is None:
        raise ValueError(
            "use_weighting=True needs SequenceInputs.wpo_logps (sum over completion tokens of logp - log sum_v p_v^2)"
        )
    chosen, rejected = torch.exp(wpo_logps.detach().double() / counts).chunk(2)
    return chosen * rejected


def dpo_objective(
    loss_type: str | Sequence[str],
    *,
    beta: float = 0.1,
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    use_weighting: bool = False,
    ld_alpha: float | None = None,
    average_log_prob: bool | None = None,
    smoothed: tuple[str, ...] = TAKES_LABEL_SMOOTHING,
) -> DPOObjective:
    """The ``DPOObjective`` of ``fused_linear_dpo_loss``'s options (TRL 1.16's names and defaults).

    Args:
        loss_type: one of ``DPO_LOSS_TYPES``, or several (summed with ``loss_weights``, default 1 each).
        smoothed: the loss types that read ``label_smoothing``: every type of ``TAKES_LABEL_SMOOTHING`` (``sigmoid``
            with it is cDPO), or ``TRL_TAKES_LABEL_SMOOTHING`` (``trl_dpo_objective``).
    """
    return DPOObjective(
        beta=beta, terms=_terms(loss_type, loss_weights, label_smoothing, smoothed),
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        discopop_tau=discopop_tau, use_weighting=use_weighting, ld_alpha=ld_alpha, average_log_prob=average_log_prob,
    )  # fmt: skip


def trl_dpo_objective(loss_type: str | Sequence[str], **options) -> DPOObjective:
    """The ``DPOObjective`` of TRL 1.16's ``DPOConfig`` fields (``dpo_objective``'s keywords but
    ``average_log_prob``), read as TRL reads them: ``label_smoothing`` applies to ``robust``, ``exo_pair``, ``aot``
    and ``aot_unpaired`` only (TRL's ``sigmoid`` has no cDPO term); the length-averaged types are ``ipo`` and
    ``sigmoid_norm``. ``FastDPOTrainer`` and ``dpo-fast train`` both read their configs through it."""
    if "average_log_prob" in options or "smoothed" in options:
        raise ValueError("TRL's DPOConfig has no average_log_prob: the loss types decide it")
    return dpo_objective(loss_type, smoothed=TRL_TAKES_LABEL_SMOOTHING, **options)


def _terms(loss_type, loss_weights, label_smoothing, smoothed: tuple[str, ...]) -> tuple[PairTerm, ...]:
    """One ``PairTerm`` per loss type, with its weight, and ``label_smoothing`` where ``smoothed`` takes it."""
    if isinstance(loss_type, str):
        loss_types = [loss_type]
    elif isinstance(loss_type, (list, tuple)) and loss_type:
        loss_types = list(loss_type)
    else:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES} or a non-empty list of them, got {loss_type!r}")
    if loss_weights is None:
        weights = [1.0] * len(loss_types)
    elif isinstance(loss_weights, (list, tuple)):
        weights = list(loss_weights)
    else:
        raise ValueError(f"loss_weights must be a list of numbers, one per loss_type, or None, got {loss_weights!r}")
    if len(weights) != len(loss_types):
        raise ValueError(
            f"loss_weights must have one weight per loss_type: {len(weights)} weights for {len(loss_types)} loss types"
        )
    return tuple(
        PairTerm(kind, weight, label_smoothing if kind in smoothed else 0.0)
        for kind, weight in zip(loss_types, weights)
    )
