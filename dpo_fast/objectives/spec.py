"""An objective as a string and back: how it crosses a ``torch.library.custom_op`` boundary.

Custom ops take tensors and Python scalars, strings and lists, not dataclasses; the fused pass's op
takes ``encode_objective(objective)`` (a JSON string, deterministic, so a compiled caller specializes on
it as on any constant) and rebuilds the objective with ``decode_objective``, which validates it again.
"""

from __future__ import annotations

import dataclasses
import json

import torch

from .dpo import DPOObjective, PairTerm
from .interface import Objective
from .kto import KTOObjective
from .reference_free import CPOObjective, ORPOObjective

_CLASSES = {cls.__name__: cls for cls in (DPOObjective, CPOObjective, ORPOObjective, KTOObjective)}


# Run, not traced, under torch.compile (json is not traceable): an objective is a frozen dataclass of Python
# scalars, so its string is a constant of the graph.
@torch.compiler.assume_constant_result
def encode_objective(objective: Objective) -> str:
    """``'{"type": "DPOObjective", "beta": 0.1, "terms": [...], ...}'``: every field, keys sorted."""
    if type(objective).__name__ not in _CLASSES:
        raise ValueError(f"objective must be one of {sorted(_CLASSES)}, got {type(objective).__name__}")
    return json.dumps({"type": type(objective).__name__, **dataclasses.asdict(objective)}, sort_keys=True)


def decode_objective(spec: str) -> Objective:
    """The objective ``encode_objective`` wrote."""
    fields = json.loads(spec)
    cls = _CLASSES[fields.pop("type")]
    if cls is DPOObjective:
        fields["terms"] = tuple(PairTerm(**term) for term in fields["terms"])
    return cls(**fields)
