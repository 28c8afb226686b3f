"""dpo_fast: Direct Preference Optimization straight from hidden states, without the N x V logits.

    out = dpo_fast.fused_linear_dpo_loss(hidden, model.lm_head.weight, labels,
                                         ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, beta=0.1)
    out.loss.backward()

See ``dpo_fast.api`` for the functions, ``dpo_fast.objectives`` for the loss family and
``dpo_fast.backends`` for the implementations.
"""

from .api import DPOOutput, FusedLinearDPOLoss, TokenMetrics, fused_linear_dpo_loss, sequence_logps, token_logps
from .objectives import LOSS_TYPES

__version__ = "0.1.0"

__all__ = [
    "DPOOutput",
    "FusedLinearDPOLoss",
    "LOSS_TYPES",
    "TokenMetrics",
    "fused_linear_dpo_loss",
    "sequence_logps",
    "token_logps",
]
