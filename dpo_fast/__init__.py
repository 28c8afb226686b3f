"""dpo_fast: Direct Preference Optimization straight from hidden states, without the N x V logits.

    out = dpo_fast.fused_linear_dpo_loss(hidden, model.lm_head.weight, labels,
                                         ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, beta=0.1)
    out.loss.backward()

``fused_linear_cpo_loss`` (CPO, SimPO, AlphaPO), ``fused_linear_orpo_loss`` and ``fused_linear_kto_loss`` do
the same for the rest of the preference family. ``LOSS_TYPES`` are ``fused_linear_dpo_loss``'s loss types
(TRL 1.16's DPOTrainer's), ``CPO_LOSS_TYPES`` and ``KTO_LOSS_TYPES`` the others'. See ``dpo_fast.api`` for the
functions, ``dpo_fast.core`` for the one entry beneath them (an objective, a ``layout.TokenLayout`` and a
``head.LMHead``), ``dpo_fast.objectives`` for the loss family and ``dpo_fast.backends`` for the implementations.
"""

from .api import (
    FusedLinearDPOLoss,
    fused_linear_cpo_loss,
    fused_linear_dpo_loss,
    fused_linear_kto_loss,
    fused_linear_orpo_loss,
    sequence_logps,
    token_logps,
)
from .objectives import CPO_LOSS_TYPES, KTO_LOSS_TYPES
from .objectives import DPO_LOSS_TYPES as LOSS_TYPES
from .outputs import DPOOutput, KTOOutput, TokenMetrics

__version__ = "0.1.0"

__all__ = [
    "CPO_LOSS_TYPES",
    "DPOOutput",
    "FusedLinearDPOLoss",
    "KTOOutput",
    "KTO_LOSS_TYPES",
    "LOSS_TYPES",
    "TokenMetrics",
    "fused_linear_cpo_loss",
    "fused_linear_dpo_loss",
    "fused_linear_kto_loss",
    "fused_linear_orpo_loss",
    "sequence_logps",
    "token_logps",
]
