"""Which loss a run trains: the config's objective keys -> a ``dpo_fast.objectives`` objective, and its metrics.

``objective`` picks the TRL trainer whose loss runs, and ``loss_type`` is read in that trainer's terms
(TRL's ``sigmoid`` is DPO's in ``DPOConfig`` and CPO's in ``CPOConfig``), so a TRL config ports by copying
its keys and naming its trainer:

- ``dpo`` (``DPOTrainer``): every loss type of TRL 1.16's DPO, one or several (``loss_weights``),
  ``f_divergence_type``, ``f_alpha_divergence_coef``, ``discopop_tau``, ``use_weighting`` (WPO),
  ``ld_alpha`` (LD-DPO); a reference unless every loss type is ``sft``. The keys are read as TRL's
  ``DPOConfig`` reads them (``objectives.trl_dpo_objective``, as ``FastDPOTrainer`` does): ``label_smoothing``
  applies to ``robust``, ``exo_pair``, ``aot`` and ``aot_unpaired``; where no loss type reads it (TRL then
  ignores it) the run refuses it instead.
- ``cpo`` (``CPOTrainer``): ``sigmoid``, ``hinge``, ``ipo``, ``simpo`` on the policy's log-probs plus
  ``cpo_alpha`` times the chosen NLL; ``simpo_gamma``; AlphaPO's ``alpha``. No reference.
- ``orpo`` (``ORPOTrainer``): the chosen NLL (prompt and completion tokens, as TRL) minus ``beta``
  times the mean log-sigmoid of the log odds ratio. No reference.
- ``kto`` (``KTOTrainer``): ``kto`` or ``apo_zero_unpaired`` on the pairs unpaired as TRL's
  ``unpair_preference_dataset`` does (each chosen completion desirable, each rejected one undesirable),
  ``desirable_weight``, ``undesirable_weight``; ``kto``'s KL estimate is TRL's: the policy's and the
  reference's summed log-probs of mismatched (prompt, completion) sequences of the same micro-batch
  (``data.mismatched``: completions rotated by one, TRL's ``KL_completion_ids``), mean of the difference,
  averaged over processes, clamped at 0, a constant of the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import objectives, outputs
from ..objectives.dpo import TRL_TAKES_LABEL_SMOOTHING
from ..objectives.elementwise import log1mexp

OBJECTIVES = ("dpo", "cpo", "orpo", "kto")
# TRL's default loss_type of each trainer (ORPO has one loss)
DEFAULT_LOSS_TYPE = {"dpo": "sigmoid", "cpo": "sigmoid", "orpo": None, "kto": "kto"}
# the keys each objective reads besides beta; any other objective refuses a value other than the key's default
READ_BY = {
    "loss_weights": ("dpo",), "label_smoothing": ("dpo", "cpo"), "f_divergence_type": ("dpo",),
    "f_alpha_divergence_coef": ("dpo",), "discopop_tau": ("dpo",), "use_weighting": ("dpo",), "ld_alpha": ("dpo",),
    "cpo_alpha": ("cpo",), "simpo_gamma": ("cpo",), "alpha": ("cpo",), "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
}  # fmt: skip
# TRL's names of the per-pair metrics (summed over pairs, logged as means), then each objective's own
PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")  # fmt: skip
ORPO_METRICS = ("nll_loss", "log_odds_ratio", "log_odds_chosen")
# TRL's KTOTrainer: means over the desirable (chosen) and the undesirable (rejected) completions, and the KL estimate
KTO_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl")


def split_list(text: str | None) -> list[str]:
    """``"sigmoid, sft"`` -> ``["sigmoid", "sft"]`` (a config's comma-separated list); None -> []."""
    return [] if text is None else [part.strip() for part in text.split(",")]


def loss_types(cfg) -> list[str]:
    """The run's loss types: ``cfg.loss_type`` split at commas, or the objective's default."""
    return split_list(cfg.loss_type) if cfg.loss_type is not None else [DEFAULT_LOSS_TYPE[cfg.objective]]


def build(cfg) -> objectives.Objective:
    """The objective of ``cfg``'s keys, validated (a ``ValueError`` naming the key otherwise)."""
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
        if set(types) & set(objectives.KTO_LOSS_TYPES):
            raise ValueError(f"loss_type {cfg.loss_type!r} is KTO's (unpaired): set objective to 'kto'")
        options = _options(cfg)
        if options["label_smoothing"] != 0 and not set(types) & set(TRL_TAKES_LABEL_SMOOTHING):
            raise ValueError(
                f"label_smoothing applies to loss types {TRL_TAKES_LABEL_SMOOTHING} (TRL 1.16's DPOConfig reads it "
                f"there only), not to {types}: remove it, or use a loss type that reads it (cDPO's smoothed sigmoid "
                "is dpo_fast.fused_linear_dpo_loss(loss_type='sigmoid', label_smoothing=...))"
            )
        return objectives.trl_dpo_objective(options.pop("loss_type"), **options)
    if cfg.objective == "cpo":
        if len(types) != 1:
            raise ValueError(f"objective='cpo' takes one loss_type, one of {objectives.CPO_LOSS_TYPES}, got {types}")
        return objectives.CPOObjective(**_options(cfg))
    if cfg.objective == "kto":
        if len(types) != 1:
            raise ValueError(f"objective='kto' takes one loss_type, one of {objectives.KTO_LOSS_TYPES}, got {types}")
        return objectives.KTOObjective(**_options(cfg))
    if cfg.loss_type is not None:
        raise ValueError(f"objective='orpo' has one loss and takes no loss_type, got {cfg.loss_type!r}")
    return objectives.ORPOObjective(**_options(cfg))


def needs_reference(cfg) -> bool:
    """The objective reads reference log-probs (DPO, unless every loss type is ``sft``)."""
    return build(cfg).needs.reference


def kl_needs_live_reference(cfg) -> bool:
    """KTO's KL estimate is on: its reference runs on the step's mismatched batch, which no table can hold."""
    return cfg.objective == "kto" and build(cfg).needs.kl


def _options(cfg) -> dict:
    """The objective's keywords from ``cfg``'s keys (``trl_dpo_objective``'s, ``CPOObjective``'s, ...)."""
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
    if cfg.objective == "kto":
        return {"beta": cfg.beta, "loss_type": loss_types(cfg)[0], "desirable_weight": cfg.desirable_weight,
                "undesirable_weight": cfg.undesirable_weight}  # fmt: skip
    return {"beta": cfg.beta}


def metric_names(objective: objectives.Objective) -> tuple[str, ...]:
    """The per-pair metrics ``objective`` logs with its TRL trainer's names, in ``pair_sums``' order: CPO adds
    ``nll_loss`` (when ``cpo_alpha`` is not 0: the pass forms no NLL otherwise), ORPO ``nll_loss``,
    ``log_odds_ratio``, ``log_odds_chosen``."""
    if isinstance(objective, objectives.KTOObjective):
        return KTO_METRICS
    if isinstance(objective, objectives.ORPOObjective):
        return PAIR_METRICS + ORPO_METRICS
    if isinstance(objective, objectives.CPOObjective) and objective.needs.nll:
        return (*PAIR_METRICS, "nll_loss")
    return PAIR_METRICS


def pair_sums(objective: objectives.Objective, out: outputs.DPOOutput | outputs.KTOOutput) -> torch.Tensor:
    """(len(metric_names(objective)) + 1,) float64: each metric summed over the batch's P pairs, then P.

    ``loss`` and ``nll_loss`` are batch means: they count P times (a window's value is their mean over its
    pairs). ORPO's ``log_odds_ratio`` is TRL's mean ``logsigmoid(log_odds)`` and ``log_odds_chosen`` its mean
    ``log_odds`` (TRL's names, swapped against their meaning), of the length-averaged log-probs.
    """
    if isinstance(out, outputs.KTOOutput):  # 2P completions, the P desirable (chosen) first
        pairs = out.rewards.shape[0] // 2
        (chosen, rejected), (logps_c, logps_r) = out.rewards.chunk(2), out.logps.detach().chunk(2)
        values = [out.loss.detach() * pairs, chosen.sum(), rejected.sum(), (chosen - rejected).sum(), logps_c.sum(),
                  logps_r.sum(), out.kl * pairs, torch.tensor(float(pairs), device=chosen.device)]  # fmt: skip
        return torch.stack([value.double() for value in values])
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
