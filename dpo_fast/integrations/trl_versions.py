"""The TRL releases the drop-ins are tested with, and the check each drop-in makes when it is built.

``SUPPORTED_TRL`` is the range ``pyproject.toml``'s ``trl`` extra declares (a test keeps them equal): the
releases whose ``DPOTrainer`` and ``KTOTrainer`` the parity tests run against, TRL 1.14.1 (axolotl 0.21's pin,
CI's third job) to 1.16 (CI's first job). A drop-in built on a TRL outside it raises ``UnsupportedTRLVersion``
naming the installed and the supported versions, unless ``DPO_FAST_ALLOW_UNTESTED_TRL=1`` turns the error into a
warning (docs/trl.md, "Versions", says why an error).
"""

from __future__ import annotations

import os
import warnings
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

SUPPORTED_TRL_SPEC = ">=1.14.1,<1.17"  # as pyproject.toml writes it
SUPPORTED_TRL = SpecifierSet(SUPPORTED_TRL_SPEC)
# the releases the parity tests have run on (docs/trl.md, "Versions")
TESTED_TRL = ("1.14.1", "1.15.0", "1.16.0")
ALLOW_UNTESTED = "DPO_FAST_ALLOW_UNTESTED_TRL"


class UnsupportedTRLVersion(RuntimeError):
    """The installed TRL is outside ``SUPPORTED_TRL``."""


def installed_trl() -> str:
    """The installed TRL's version string (from its distribution metadata)."""
    return metadata.version("trl")


def check_trl_version(who: str) -> None:
    """Raise ``UnsupportedTRLVersion`` when the installed TRL is outside ``SUPPORTED_TRL`` (a ``UserWarning`` instead
    with ``DPO_FAST_ALLOW_UNTESTED_TRL=1``); nothing inside it.

    Args:
        who: the class being built, named in the message (e.g. ``"FastDPOTrainer"``).
    """
    installed = installed_trl()
    if Version(installed) in SUPPORTED_TRL:
        return
    message = (
        f"{who} is tested with TRL {SUPPORTED_TRL_SPEC} (releases {', '.join(TESTED_TRL)}), but TRL {installed} is "
        f"installed: install a supported TRL (pip install 'trl{SUPPORTED_TRL_SPEC}'), or set {ALLOW_UNTESTED}=1 to run "
        "on this one untested (its DPOTrainer/KTOTrainer may compute a loss dpo_fast does not reproduce)"
    )
    if os.environ.get(ALLOW_UNTESTED, "").strip().lower() in ("1", "true", "yes", "on"):
        warnings.warn(message, UserWarning, stacklevel=3)
        return
    raise UnsupportedTRLVersion(message)
