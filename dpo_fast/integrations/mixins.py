"""What the drop-ins' mixins (``trl.DPOFastMixin``, ``kto.KTOFastMixin``) check and read at construction.

A mixin overrides a TRL trainer's ``compute_loss``, ``compute_ref_log_probs`` and ``__init__``; it takes effect only
when it comes before that trainer in the class's method resolution order (``class X(DPOFastMixin, DPOTrainer)``).
Put after it (``class X(DPOTrainer, DPOFastMixin)``), TRL's loss would run silently, and so would TRL's constructor
(``transformers.Trainer.__init__`` calls no further ``__init__``), so the mixin's own never runs: ``check_mixin_order``
refuses that when the class is defined (the mixins' ``__init_subclass__``), and a class with no such trainer among
its bases when it is built.
"""

from __future__ import annotations


def check_mixin_order(cls: type, mixin: type, trainer: type, defining: bool = False) -> None:
    """Raise ``TypeError`` unless ``cls`` subclasses ``trainer`` with ``mixin`` before it in its MRO.

    Args:
        cls: the class defined or built; mixin: the dpo_fast mixin; trainer: TRL's trainer class.
        defining: ``cls`` is being defined (``__init_subclass__``): a class without ``trainer`` yet passes (a mixin
            of mixins); the order is checked where ``trainer`` is among its bases.
    """
    mro = cls.__mro__
    if trainer not in mro:
        if defining:
            return
        raise TypeError(
            f"{cls.__name__}: {mixin.__name__} goes over a {trainer.__module__.split('.')[0]}.{trainer.__name__} "
            f"subclass, as class {cls.__name__}({mixin.__name__}, {trainer.__name__}) or over a framework's subclass "
            f"of it; {cls.__name__}'s bases are {[base.__name__ for base in cls.__bases__]}"
        )
    if mro.index(mixin) > mro.index(trainer):
        raise TypeError(
            f"{cls.__name__}: {mixin.__name__} must come before {trainer.__name__} among the bases (first is safest: "
            f"class {cls.__name__}({mixin.__name__}, ...)); after it, {trainer.__name__}'s own loss would run"
        )


def config_argument(args: tuple, kwargs: dict):
    """The trainer's config (``DPOConfig``/``KTOConfig``) among a TRL trainer's constructor arguments ``(model,
    ref_model, args, ...)``, passed by keyword or third by position; None when not given."""
    if "args" in kwargs:
        return kwargs["args"]
    return args[2] if len(args) > 2 else None
