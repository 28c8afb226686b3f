"""``DPOFastPlugin``: axolotl's DPO, IPO and KTO training with dpo_fast's LM head and loss.

In an axolotl config (``rl: dpo``, ``ipo`` or ``kto``)::

    plugins:
      - dpo_fast.integrations.axolotl.DPOFastPlugin
    # optional, the drop-ins' own keywords (defaults shown)
    dpo_fast_backend: auto
    dpo_fast_token_metrics: true
    dpo_fast_prefix_sharing: false     # DPO and IPO only

The plugin returns, from axolotl's ``get_trainer_cls`` hook, axolotl's own trainer class for the run
(``AxolotlDPOTrainer``, ``AxolotlKTOTrainer``, or the config's ``trainer_cls``) with ``DPOFastMixin`` or
``KTOFastMixin`` first among its bases: axolotl's mixins (optimizer, scheduler, RNG state, FSDP saving) keep
running, and the log-probs and the loss are dpo_fast's, with TRL's semantics and metric names. axolotl builds a
plugin's class without the models (it passes them by position to its own class only), so the plugin keeps the
models axolotl loads (``post_model_load``: the policy, then the reference when axolotl loads one) and hands them to
the class as axolotl hands them to its own: ``(policy, reference)`` for DPO and IPO, ``(policy,)`` for KTO.

Needs axolotl (0.21 tested, with its TRL 1.14.1); ``docs/trl.md`` ("axolotl") has the recorded comparison with
plain axolotl.
"""

from __future__ import annotations

from pathlib import Path

from axolotl.integrations.base import BasePlugin
from axolotl.utils.logging import get_logger
from pydantic import BaseModel

from .kto import KTOFastMixin
from .trl import DPOFastMixin

LOG = get_logger("axolotl.integrations.dpo_fast")  # under axolotl's name: its logging shows it as its own
PAIRED = ("dpo", "ipo")
RL_TYPES = (*PAIRED, "kto")


class DPOFastArgs(BaseModel):
    """The plugin's config keys (axolotl validates them with its own): the drop-ins' keywords, None for their
    defaults."""

    dpo_fast_backend: str | None = None
    dpo_fast_token_metrics: bool | None = None
    dpo_fast_prefix_sharing: bool | None = None


def rl_name(rl) -> str:
    """``rl`` of an axolotl config (a string, or axolotl's ``RLType`` enum) as its lower-case name; "" when unset."""
    return str(getattr(rl, "value", rl) or "").lower()


def mixin_keywords(cfg) -> dict:
    """The mixin's keywords set in ``cfg`` (``dpo_fast_*`` keys that are not None)."""
    keywords = {"backend": cfg.get("dpo_fast_backend"), "token_metrics": cfg.get("dpo_fast_token_metrics")}
    if rl_name(cfg.get("rl")) in PAIRED:
        keywords["prefix_sharing"] = cfg.get("dpo_fast_prefix_sharing")
    elif cfg.get("dpo_fast_prefix_sharing"):
        raise ValueError("dpo_fast_prefix_sharing: rl: kto runs single completions, no pairs to share a prompt")
    return {key: value for key, value in keywords.items() if value is not None}


def fast_trainer_class(base: type, models: tuple, keywords: dict) -> type:
    """``base`` (a ``DPOTrainer`` or ``KTOTrainer`` subclass) with dpo_fast's mixin first, built with ``models`` by
    position and the mixin's ``keywords`` added to whatever axolotl passes.

    Args:
        base: axolotl's trainer class for the run; models: the positional models; keywords: the mixin's.
    """
    from trl import DPOTrainer, KTOTrainer

    if issubclass(base, DPOTrainer):
        mixin = DPOFastMixin
    elif issubclass(base, KTOTrainer):
        mixin = KTOFastMixin
    else:
        raise TypeError(f"DPOFastPlugin: {base.__module__}.{base.__name__} is neither a DPOTrainer nor a KTOTrainer")

    def __init__(self, *args, **kwargs):
        mixin.__init__(self, *models, *args, **keywords, **kwargs)

    return type(f"DPOFast{base.__name__}", (mixin, base), {"__init__": __init__, "__module__": __name__})


class DPOFastPlugin(BasePlugin):
    """axolotl's trainer for ``rl: dpo``, ``ipo`` or ``kto``, with dpo_fast's head and loss (see the module)."""

    def __init__(self):
        super().__init__()
        self.models = []  # as axolotl loads them: the policy, then the reference (when it loads one)

    def get_input_args(self) -> str:
        return f"{__name__}.DPOFastArgs"

    def register(self, cfg: dict):
        """Refuse, before anything loads, an ``rl`` the plugin does not take."""
        rl = rl_name(cfg.get("rl"))
        if rl not in RL_TYPES:
            raise ValueError(f"DPOFastPlugin trains rl: {', '.join(RL_TYPES)}; this config has rl: {rl or 'none'}")

    def post_model_load(self, cfg, model):
        self.models.append(model)

    def get_trainer_cls(self, cfg) -> type:
        """axolotl's trainer class for ``cfg`` with the mixin first, bound to the models it loaded."""
        from axolotl.core.trainers.dpo import DPOStrategy
        from axolotl.core.trainers.trl import AxolotlKTOTrainer
        from axolotl.utils.import_helper import get_cls_from_module_str

        rl = rl_name(cfg.rl)
        own = DPOStrategy.get_trainer_class() if rl in PAIRED else AxolotlKTOTrainer
        base = get_cls_from_module_str(cfg.trainer_cls) if cfg.trainer_cls else own
        loads_reference = not (cfg.adapter and not cfg.rl_adapter_ref_model)  # axolotl's setup_reference_model
        if len(self.models) != 1 + loads_reference:
            raise RuntimeError(
                f"DPOFastPlugin: axolotl loaded {len(self.models)} model(s) before building the trainer, expected "
                f"{1 + loads_reference} (the policy{', then the reference' if loads_reference else ''})"
            )
        policy, reference = self.models[0], (self.models[1] if loads_reference else None)
        keywords = mixin_keywords(cfg)
        if base is own and rl in PAIRED and cfg.datasets is not None:  # what axolotl passes to its own DPO class
            keywords["dataset_tags"] = [d["path"] for d in cfg.datasets if not Path(d["path"]).is_dir()]
        return fast_trainer_class(base, (policy, reference) if rl in PAIRED else (policy,), keywords)

    def post_trainer_create(self, cfg, trainer):
        """Check that the trainer is the plugin's (a plugin listed earlier may have returned its own class first);
        let go of the models."""
        self.models = []
        if not isinstance(trainer, (DPOFastMixin, KTOFastMixin)):
            raise RuntimeError(
                f"DPOFastPlugin: axolotl built {type(trainer).__name__}, not the plugin's trainer: another plugin "
                "returned a trainer class first (axolotl takes the first); list dpo_fast's plugin first"
            )
        LOG.info(f"DPOFastPlugin: {type(trainer).__name__} trains with dpo_fast's LM head and loss "
                 f"(backend {trainer._backend!r})")  # fmt: skip
