"""The preference objectives on per-sequence sums of token log-probs: DPO's family, CPO/SimPO, ORPO, KTO.

Everything here is pure PyTorch on ``(S,)`` tensors: the cost of an objective is in the language-model
head, not here. Each objective is a frozen dataclass of its options with one method,
``evaluate(SequenceInputs, BatchConstants) -> ObjectiveValue``: the loss share of a group of whole
units (pairs, or single sequences for KTO) and its closed-form gradient w.r.t. each per-sequence sum.
That is what lets the fused pass form the LM-head gradients group by group during the forward pass
(``interface`` describes the contract: what the pass sums per token, and how the per-sequence gradients
go back to tokens; ``spec`` turns an objective into the string a custom op can take).

=====================  ============================================================  ==========  ==========
objective              loss types                                                    units       pair-local
=====================  ============================================================  ==========  ==========
``DPOObjective``       TRL 1.16's DPOTrainer: sigmoid, sigmoid_norm, robust, hinge,  pairs       yes, but
                       ipo, exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero,                   aot and
                       apo_down, discopop, aot, aot_unpaired, sft; several at once               aot_unpaired
                       (weights), f-divergences, WPO, LD-DPO
``CPOObjective``       sigmoid, hinge, ipo, simpo (+ AlphaPO's alpha) + chosen NLL   pairs       yes
``ORPOObjective``      odds ratio on averaged log-probs + chosen NLL                 pairs       yes
``KTOObjective``       kto, apo_zero_unpaired                                        sequences   yes
=====================  ============================================================  ==========  ==========

Why closed forms and not autograd on these tiny tensors: the fused pass runs inside a
``torch.library.custom_op``, below the autograd dispatch key, where ``torch.autograd.grad`` records
nothing; ``torch.func.vjp`` works there in eager mode but fails once the op is called from a
``torch.compile``d graph (AOTAutograd's runtime disables functorch). So each elementwise piece is
written once with its slope beside it (``elementwise``) and the objectives chain them by hand; the
tests check every gradient against float64 autograd of TRL's own code and against finite differences.
"""

from .dpo import DPO_LOSS_TYPES, DPOObjective, PairTerm, default_average_log_prob, dpo_objective, trl_dpo_objective
from .interface import (
    BatchConstants,
    Needs,
    Objective,
    ObjectiveValue,
    SequenceInputs,
    TokenWeights,
    check_first_order,
    objective_loss,
    reported_logps,
    sequence_inputs,
    sums_of_reported,
    token_grads,
    token_weights,
)
from .kto import KTO_LOSS_TYPES, KTOObjective, kto_kl_estimate
from .reference_free import CPO_LOSS_TYPES, CPOObjective, ORPOObjective
from .spec import decode_objective, encode_objective

__all__ = [
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "BatchConstants",
    "CPOObjective",
    "DPOObjective",
    "KTOObjective",
    "Needs",
    "ORPOObjective",
    "Objective",
    "ObjectiveValue",
    "PairTerm",
    "SequenceInputs",
    "TokenWeights",
    "decode_objective",
    "default_average_log_prob",
    "dpo_objective",
    "encode_objective",
    "kto_kl_estimate",
    "check_first_order",
    "objective_loss",
    "reported_logps",
    "sequence_inputs",
    "sums_of_reported",
    "token_grads",
    "token_weights",
    "trl_dpo_objective",
]
