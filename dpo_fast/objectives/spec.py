"""An objective as a string and back: how it crosses a ``torch.library.custom_op`` boundary.

Custom ops take tensors and Python scalars, strings and lists, not dataclasses; the fused pass's op
takes ``encode_objective(objective)`` (a JSON string, deterministic, so a compiled caller specializes on
it as on any constant) and rebuilds the objective with ``decode_objective``, which validates it again.
"""

from __future__ import annotations

import dataclasses
import json

from .dpo import DPOObjective, PairTerm
from .interface import Objective
from .kto import KTOObjective
from .reference_free import CPOObjective, ORPOObjective

_CLASSES = {cls.__name__: cls for cls in (DPOObjective, CPOObjective, ORPOObjective, KTOObjective)}
# each dataclass's field names, read here once: torch.compile before 2.13 cannot trace dataclasses.fields
_FIELD_NAMES = {cls: tuple(field.name for field in dataclasses.fields(cls)) for cls in (*_CLASSES.values(), PairTerm)}


def encode_objective(objective: Objective) -> str:
    """``'{"beta": 0.1, "terms": [...], ..., "type": "DPOObjective"}'``: every field, keys sorted.

    Built from plain string operations rather than ``json.dumps``, so that ``torch.compile`` traces it (the
    string becomes a constant of the graph) on every supported torch: before 2.13 Dynamo can neither trace
    ``json`` nor hand it a frozen dataclass."""
    if type(objective).__name__ not in _CLASSES:
        raise ValueError(f"objective must be one of {sorted(_CLASSES)}, got {type(objective).__name__}")
    return _json({"type": type(objective).__name__, **_fields(objective)})


def _fields(value) -> dict:
    return {name: getattr(value, name) for name in _FIELD_NAMES[type(value)]}


def _json(value) -> str:
    """JSON of an objective's values: None, bools, numbers, names, tuples, dicts and dataclasses of them."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value + '"'  # option and loss-type names: no quote or backslash to escape
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_json(element) for element in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join('"' + key + '": ' + _json(value[key]) for key in sorted(value)) + "}"
    return _json(_fields(value))


def decode_objective(spec: str) -> Objective:
    """The objective ``encode_objective`` wrote."""
    fields = json.loads(spec)
    cls = _CLASSES[fields.pop("type")]
    if cls is DPOObjective:
        fields["terms"] = tuple(PairTerm(**term) for term in fields["terms"])
    return cls(**fields)
