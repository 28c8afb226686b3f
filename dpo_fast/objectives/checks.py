"""Option checks shared by the objectives: a ``ValueError`` naming the option, its value and what is expected.

The objectives are where the rules of their options live: the public functions, the trainer's config and
the TRL drop-ins validate an objective's options by constructing it. Each check returns the value as a
Python ``float``, so an objective holds plain scalars (hashable, JSON-encodable by ``spec``) whatever
number type it was given (a NumPy float, an int).
"""

from __future__ import annotations

import math
import numbers


def finite(value: numbers.Real) -> bool:
    """``math.isfinite`` by comparisons, which ``torch.compile(dynamic=True)`` traces on its symbolic floats (it
    guards on the answer); NaN compares false."""
    return -math.inf < value < math.inf


def number(name: str, value: object, expected: str = "a finite number") -> float:
    """``value`` as a float: a finite real number (not a bool, a string or a tensor), else a ``ValueError``."""
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and finite(value)):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return float(value)


def positive(name: str, value: object) -> float:
    """A finite number > 0."""
    checked = number(name, value, "a positive number")
    if checked <= 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return checked


def non_negative(name: str, value: object) -> float:
    """A finite number >= 0."""
    checked = number(name, value, "a non-negative number")
    if checked < 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return checked


def store(objective: object, name: str, value: object) -> None:
    """Set a checked (normalized) option on a frozen dataclass, in its ``__post_init__``."""
    object.__setattr__(objective, name, value)
