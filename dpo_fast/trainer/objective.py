"""Which loss a run trains: the config's objective keys -> a ``dpo_fast.objectives`` objective, its api entry, its metrics.

``objective`` picks the TRL trainer whose loss runs, and ``loss_type`` is read in that trainer's terms
(TRL's ``sigmoid`` is DPO's in ``DPOConfig`` and CPO's in ``CPOConfig``), so a TRL config ports by copying
its keys and naming its trainer:

- ``dpo`` (``DPOTrainer``): every loss type of TRL 1.16's DPO, one or several (``loss_weights``),
  ``f_divergence_type``, ``f_alpha_divergence_coef``, ``discopop_tau``, ``use_weighting`` (WPO),
  ``ld_alpha`` (LD-DPO); a reference unless every loss type is ``sft``.
- ``cpo`` (``CPOTrainer``): ``sigmoid``, ``hinge``, ``ipo``, ``simpo`` on the policy's log-probs plus
  ``cpo_alpha`` times the chosen NLL; ``simpo_gamma``; AlphaPO's ``alpha``. No reference.
- ``orpo`` (``ORPOTrainer``): the chosen NLL (prompt and completion tokens, as TRL) minus ``beta``
  times the mean log-sigmoid of the log odds ratio. No reference.

KTO is not trained here (its KL estimate needs a second, mismatched batch per step and its reference
on it): ``objective: kto`` is refused with a pointer to ``FastKTOTrainer``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import api, objectives
from ..objectives.elementwise import log1mexp

OBJECTIVES = ("dpo", "cpo", "orpo")
# TRL's default loss_type of each trainer (ORPO has one loss)
DEFAULT_LOSS_TYPE = {"dpo": "sigmoid", "cpo": "sigmoid", "orpo": None}
# the keys each objective reads besides beta; any other objective refuses a value other than the key's default
READ_BY = {
    "loss_weights": ("dpo",), "label_smoothing": ("dpo", "cpo"), "f_divergence_type": ("dpo",),
    "f_alpha_divergence_coef": ("dpo",), "discopop_tau": ("dpo",), "use_weighting": ("dpo",), "ld_alpha": ("dpo",),
    "cpo_alpha": ("cpo",), "simpo_gamma": ("cpo",), "alpha": ("cpo",),
}  # fmt: skip
# TRL's names of the per-pair metrics (summed over pairs, logged as means), then each objective's own
PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")  # fmt: skip
ORPO_METRICS = ("nll_loss", "log_odds_ratio", "log_odds_chosen")


def split_list(text: str | None) -> list[str]:
    """``"sigmoid, sft"`` -> ``["sigmoid", "sft"]`` (a config's comma-separated list); None -> []."""
    return [] if text is None else [part.strip() for part in text.split(",")]


def loss_types(cfg) -> list[str]:
    """The run's loss types: ``cfg.loss_type`` split at commas, or the objective's default."""
    return split_list(cfg.loss_type) if cfg.loss_type is not None else [DEFAULT_LOSS_TYPE[cfg.objective]]


def build(cfg) -> objectives.Objective:
    """The objective of ``cfg``'s keys, validated (a ``ValueError`` naming the key otherwise)."""
    if cfg.objective == "kto":
        raise ValueError(
            "objective='kto' is not trained by dpo-fast train (KTO's KL estimate needs a mismatched batch and its "
            "reference each step): use FastKTOTrainer, dpo_fast's drop-in for TRL's KTOTrainer, or "
            "dpo_fast.fused_linear_kto_loss in your own loop"
        )
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {' | '.join(OBJECTIVES)}, got {cfg.objective!r}")
    for key, readers in READ_BY.items():
        if cfg.objective not in readers and getattr(cfg, key) != cfg.default(key):
            raise ValueError(
                f"{key} applies to objective {' | '.join(readers)}, not {cfg.objective!r}: remove it, or set "
                f"objective to {readers[0]!r}"
            )
    types = loss_types(cfg)
    if cfg.objective == "dpo":
        if "kto" in types or "apo_zero_unpaired" in types:
            raise ValueError(
                f"loss_type {cfg.loss_type!r} is KTO's (unpaired): dpo-fast train does not train KTO; use "
                "FastKTOTrainer, dpo_fast's drop-in for TRL's KTOTrainer"
            )
        options = loss_options(cfg)
        return objectives.dpo_objective(options.pop("loss_type"), **options)
    if cfg.objective == "cpo":
        if len(types) != 1:
            raise ValueError(f"objective='cpo' takes one loss_type, one of {objectives.CPO_LOSS_TYPES}, got {types}")
        return objectives.CPOObjective(**loss_options(cfg))
    if cfg.loss_type is not None:
        raise ValueError(f"objective='orpo' has one loss and takes no loss_type, got {cfg.loss_type!r}")
    return objectives.ORPOObjective(**loss_options(cfg))


def needs_reference(cfg) -> bool:
    """The objective reads reference log-probs (DPO, unless every loss type is ``sft``)."""
    return build(cfg).needs.reference


def loss_fn(cfg):
    """The api entry of ``cfg.objective`` (``fused_linear_dpo_loss``, ``..._cpo_loss``, ``..._orpo_loss``)."""
    return {"dpo": api.fused_linear_dpo_loss, "cpo": api.fused_linear_cpo_loss,
            "orpo": api.fused_linear_orpo_loss}[cfg.objective]  # fmt: skip


def loss_options(cfg) -> dict:
    """``loss_fn(cfg)``'s objective keywords (the head, layout, reference and backend come from the caller); the
    objective's constructor takes the same names (``dpo_objective``, ``CPOObjective``, ``ORPOObjective``)."""
    if cfg.objective == "dpo":
        types = loss_types(cfg)
        weights = None
        if cfg.loss_weights is not None:
            try:
                weights = [float(weight) for weight in split_list(cfg.loss_weights)]
            except ValueError:
                raise ValueError(
                    f"loss_weights must be numbers separated by commas, one per loss_type, got {cfg.loss_weights!r}"
                ) from None
        return {"beta": cfg.beta, "loss_type": types[0] if len(types) == 1 else types, "loss_weights": weights,
                "label_smoothing": cfg.label_smoothing, "f_divergence_type": cfg.f_divergence_type,
                "f_alpha_divergence_coef": cfg.f_alpha_divergence_coef, "discopop_tau": cfg.discopop_tau,
                "use_weighting": cfg.use_weighting, "ld_alpha": cfg.ld_alpha}  # fmt: skip
    if cfg.objective == "cpo":
        return {"beta": cfg.beta, "loss_type": loss_types(cfg)[0], "label_smoothing": cfg.label_smoothing,
                "nll_weight": cfg.cpo_alpha, "simpo_gamma": cfg.simpo_gamma, "alpha": cfg.alpha}  # fmt: skip
    return {"beta": cfg.beta}


def metric_names(objective: objectives.Objective) -> tuple[str, ...]:
    """The per-pair metrics ``objective`` logs with its TRL trainer's names, in ``pair_sums``' order: CPO adds
    ``nll_loss`` (when ``cpo_alpha`` is not 0: the pass forms no NLL otherwise), ORPO ``nll_loss``,
    ``log_odds_ratio``, ``log_odds_chosen``."""
    if isinstance(objective, objectives.ORPOObjective):
        return PAIR_METRICS + ORPO_METRICS
    if isinstance(objective, objectives.CPOObjective) and objective.needs.nll:
        return (*PAIR_METRICS, "nll_loss")
    return PAIR_METRICS


def pair_sums(objective: objectives.Objective, out: api.DPOOutput) -> torch.Tensor:
    """(len(metric_names(objective)) + 1,) float64: each metric summed over the batch's P pairs, then P.

    ``loss`` and ``nll_loss`` are batch means: they count P times (a window's value is their mean over its
    pairs). ORPO's ``log_odds_ratio`` is TRL's mean ``logsigmoid(log_odds)`` and ``log_odds_chosen`` its mean
    ``log_odds`` (TRL's names, swapped against their meaning), of the length-averaged log-probs.
    """
    pairs = out.chosen_rewards.shape[0]
    chosen, rejected = out.chosen_rewards, out.rejected_rewards
    values = [out.loss.detach() * pairs, chosen.sum(), rejected.sum(), (chosen > rejected).float().sum(),
              (chosen - rejected).sum(), out.chosen_logps.detach().sum(), out.rejected_logps.detach().sum()]  # fmt: skip
    names = metric_names(objective)
    if "nll_loss" in names:
        values.append(out.nll_loss.detach() * pairs)
    if "log_odds_ratio" in names:
        logps_c, logps_r = out.chosen_logps.detach().double(), out.rejected_logps.detach().double()
        log_odds = (logps_c - logps_r) - (log1mexp(logps_c)[0] - log1mexp(logps_r)[0])
        values += [F.logsigmoid(log_odds).sum(), log_odds.sum()]
    values.append(torch.tensor(float(pairs), device=chosen.device))
    return torch.stack([value.double() for value in values])
