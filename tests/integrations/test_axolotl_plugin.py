"""``dpo_fast.integrations.axolotl.DPOFastPlugin``'s hooks, where axolotl is installed (axolotl >= 0.20: Python 3.12).

The plugin's class for each ``rl``, the models it binds, what it refuses, and a trainer built from it as axolotl's
builder builds a plugin's class (no models passed). The end-to-end runs against plain axolotl are
``tests/integrations/test_axolotl_harness.py``'s; docs/trl.md ("axolotl") has the venv and the recorded comparison.
"""

from __future__ import annotations

import copy

import pytest

pytest.importorskip("axolotl.integrations.base")  # the real package (tests/ holds no folder of that name)

from axolotl.core.trainers.dpo.args import AxolotlDPOConfig  # noqa: E402
from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer  # noqa: E402
from axolotl.core.trainers.mixins.optimizer import OptimizerMixin  # noqa: E402
from axolotl.core.trainers.trl import AxolotlKTOTrainer  # noqa: E402
from axolotl.utils.dict import DictDefault  # noqa: E402
from test_trl import BASE, TOKENIZER, TRAIN  # noqa: E402

from dpo_fast.integrations.axolotl import DPOFastPlugin, mixin_keywords  # noqa: E402
from dpo_fast.integrations.kto import KTOFastMixin  # noqa: E402
from dpo_fast.integrations.trl import DPOFastMixin  # noqa: E402


class UsersDPOTrainer(AxolotlDPOTrainer):
    """A config's ``trainer_cls``: the plugin builds on it instead of axolotl's own class."""


def plugin_with(*models) -> DPOFastPlugin:
    plugin = DPOFastPlugin()
    for model in models:
        plugin.post_model_load(DictDefault({}), model)
    return plugin


def order(cls: type, *classes: type) -> list[int]:
    return [cls.__mro__.index(c) for c in classes]


@pytest.mark.parametrize("rl", ["orpo", "simpo", "grpo", None])
def test_register_refuses_an_rl_it_does_not_train(rl):
    with pytest.raises(ValueError, match="DPOFastPlugin trains rl: dpo, ipo, kto"):
        DPOFastPlugin().register({"rl": rl})
    for taken in ("dpo", "ipo", "kto"):
        DPOFastPlugin().register({"rl": taken})


def test_the_class_is_axolotls_own_or_the_configs_with_the_mixin_first():
    policy, reference = object(), object()
    dpo = plugin_with(policy, reference).get_trainer_cls(DictDefault({"rl": "dpo", "datasets": [{"path": "a.jsonl"}]}))
    assert issubclass(dpo, AxolotlDPOTrainer) and order(dpo, DPOFastMixin, AxolotlDPOTrainer) == sorted(
        order(dpo, DPOFastMixin, AxolotlDPOTrainer)
    )
    kto = plugin_with(policy, reference).get_trainer_cls(DictDefault({"rl": "kto"}))
    assert issubclass(kto, AxolotlKTOTrainer) and kto.__mro__.index(KTOFastMixin) < kto.__mro__.index(AxolotlKTOTrainer)
    users = plugin_with(policy, reference).get_trainer_cls(
        DictDefault({"rl": "ipo", "trainer_cls": "test_axolotl_plugin.UsersDPOTrainer"})
    )
    assert users.__mro__[1:3] == (DPOFastMixin, UsersDPOTrainer)


def test_the_models_must_be_those_axolotl_loaded():
    with pytest.raises(RuntimeError, match=r"loaded 1 model\(s\) before building the trainer, expected 2"):
        plugin_with(object()).get_trainer_cls(DictDefault({"rl": "dpo"}))
    # with an adapter and no rl_adapter_ref_model axolotl loads the policy alone
    plugin_with(object()).get_trainer_cls(DictDefault({"rl": "dpo", "adapter": "lora"}))


def test_the_keys_pass_the_mixins_keywords_and_kto_takes_no_prefix_sharing():
    cfg = DictDefault({"rl": "dpo", "dpo_fast_backend": "torch", "dpo_fast_prefix_sharing": True})
    assert mixin_keywords(cfg) == {"backend": "torch", "prefix_sharing": True}
    assert mixin_keywords(DictDefault({"rl": "kto", "dpo_fast_token_metrics": False})) == {"token_metrics": False}
    with pytest.raises(ValueError, match="dpo_fast_prefix_sharing: rl: kto"):
        mixin_keywords(DictDefault({"rl": "kto", "dpo_fast_prefix_sharing": True}))


def test_a_trainer_built_as_axolotl_builds_a_plugins_class_gets_the_models_and_keeps_axolotls_mixins(tmp_path):
    policy, reference = copy.deepcopy(BASE), copy.deepcopy(BASE)
    plugin = plugin_with(policy, reference)
    cfg = DictDefault({"rl": "dpo", "datasets": [{"path": "prefs.jsonl"}], "dpo_fast_backend": "torch"})
    trainer_cls = plugin.get_trainer_cls(cfg)
    args = AxolotlDPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, max_length=64, max_steps=1)
    trainer = trainer_cls(args=args, train_dataset=TRAIN, processing_class=TOKENIZER, callbacks=[])  # no models
    assert trainer.model is policy and trainer.ref_model is reference
    assert trainer.dataset_tags == ["prefs.jsonl"] and trainer._backend == "torch"
    assert isinstance(trainer, OptimizerMixin) and trainer.optimizer is None  # AxolotlDPOTrainer.__init__ ran
    plugin.post_trainer_create(cfg, trainer)
    assert plugin.models == []
    with pytest.raises(RuntimeError, match="another plugin returned a trainer class first"):
        plugin.post_trainer_create(cfg, AxolotlDPOTrainer.__new__(AxolotlDPOTrainer))
