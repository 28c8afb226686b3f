"""An axolotl plugin that changes nothing and reports which hooks axolotl calls, with what.

``plugins: [hook_probe.HookProbePlugin]`` (``tests/axolotl_harness`` on ``PYTHONPATH``, as ``run_harness.py`` sets it).
Each hook prints one line starting ``[hook-probe]``: the hook's name and what it was given (the model's class
and whether it is the policy or the reference, the trainer's class and its method resolution order). Since it
returns no trainer class and patches nothing, a run with it must train exactly as plain axolotl does: the
harness checks that (same losses, same weight update), which shows the harness itself is deterministic
before a real plugin is compared against plain axolotl.
"""

from __future__ import annotations

from axolotl.integrations.base import BasePlugin

PREFIX = "[hook-probe]"


def _say(*parts) -> None:
    print(PREFIX, *parts, flush=True)


class HookProbePlugin(BasePlugin):
    """A ``BasePlugin`` whose hooks only print what they receive."""

    def __init__(self):
        super().__init__()
        self.models_loaded = 0

    def register(self, cfg: dict):
        _say("register", f"rl={cfg.get('rl')}")

    def pre_model_load(self, cfg):
        _say("pre_model_load")

    def post_model_load(self, cfg, model):
        # axolotl loads the policy first, then (rl: dpo without an adapter) the reference with the same loader
        role = "policy" if self.models_loaded == 0 else "reference"
        self.models_loaded += 1
        _say("post_model_load", role, type(model).__name__, f"training={model.training}")

    def get_trainer_cls(self, cfg):
        _say("get_trainer_cls", f"rl={cfg.rl}", "-> None (axolotl's own class)")
        return None

    def post_trainer_create(self, cfg, trainer):
        mro = [cls.__module__.split(".")[0] + "." + cls.__name__ for cls in type(trainer).__mro__]
        _say("post_trainer_create", type(trainer).__name__, "mro:", " > ".join(mro))
        ref = getattr(trainer, "ref_model", None)
        _say(
            "post_trainer_create",
            f"ref_model={type(ref).__name__}",
            f"loss_type={getattr(trainer.args, 'loss_type', None)}",
        )

    def post_train(self, cfg, model):
        _say("post_train", type(model).__name__)
