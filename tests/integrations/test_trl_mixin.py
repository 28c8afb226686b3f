"""DPOFastMixin and KTOFastMixin over a framework's own trainer subclass, as axolotl (or a user) writes one.

``FrameworkDPOTrainer`` overrides what frameworks override: ``__init__`` with a keyword of its own
(``dataset_tags``), a method of the loop (``training_step``), the logging (``log`` adds a metric) and the optimizer
(``create_optimizer``, as axolotl's ``OptimizerMixin``). ``class Fast(DPOFastMixin, FrameworkDPOTrainer)`` must keep
every override running and compute the fused loss: every training and evaluation step goes through
``dpo_fast.core.preference_loss``, the ``lm_head`` module never runs, and every logged metric and weight update
matches the same framework trainer without the mixin (TRL's own loss) within 1e-4.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest

from dpo_fast import core

pytest.importorskip("trl")

from test_kto_trl import EVAL as KTO_EVAL  # noqa: E402
from test_kto_trl import TRAIN as KTO_TRAIN  # noqa: E402
from test_trl import (  # noqa: E402
    BASE,
    EVAL,
    TOKENIZER,
    TRAIN,
    applied_sgd_updates,
    assert_logs_match,
    assert_updates_match,
)
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: E402

from dpo_fast.integrations.trl import DPOFastMixin, KTOFastMixin  # noqa: E402

MARKER = "framework/log_calls"


class FrameworkOverrides:
    """The overrides a framework's trainer makes, recorded in ``self.calls``; the loss is left to the class below."""

    def __init__(self, *args, dataset_tags=None, **kwargs):
        self.calls = Counter()
        super().__init__(*args, **kwargs)
        self.dataset_tags = dataset_tags

    def training_step(self, model, inputs, *args, **kwargs):
        self.calls["training_step"] += 1
        return super().training_step(model, inputs, *args, **kwargs)

    def log(self, logs, *args, **kwargs):
        self.calls["log"] += 1
        logs[MARKER] = float(self.calls["log"])
        return super().log(logs, *args, **kwargs)

    def create_optimizer(self, *args, **kwargs):
        self.calls["create_optimizer"] += 1
        return super().create_optimizer(*args, **kwargs)


class FrameworkDPOTrainer(FrameworkOverrides, DPOTrainer):
    """A framework's DPO trainer (TRL's loss)."""


class FastFrameworkDPOTrainer(DPOFastMixin, FrameworkDPOTrainer):
    """The same framework trainer with dpo_fast's head and loss."""


class FrameworkKTOTrainer(FrameworkOverrides, KTOTrainer):
    """A framework's KTO trainer (TRL's loss)."""


class FastFrameworkKTOTrainer(KTOFastMixin, FrameworkKTOTrainer):
    """The same framework trainer with dpo_fast's head and loss."""


def run(trainer_class, config_class, train_data, eval_data, tmp_path, monkeypatch, steps=2):
    """Build ``trainer_class`` as axolotl's builder does (the models by position, the rest by keyword, the framework's
    own keyword), train ``steps`` SGD steps and evaluate; gives the trainer, the log history, the evaluation metrics,
    the weight updates, and the calls of the lm_head module and of ``core.preference_loss``."""
    args = config_class(
        output_dir=str(tmp_path / trainer_class.__name__), per_device_train_batch_size=4, per_device_eval_batch_size=4,
        max_steps=steps, optim="sgd", learning_rate=0.5, logging_steps=1, bf16=False, report_to=[], seed=0,
        save_strategy="no", disable_tqdm=True, max_length=64,
    )  # fmt: skip
    model, ref_model = copy.deepcopy(BASE), copy.deepcopy(BASE)
    head_calls, loss_calls = [], []
    for module in (model, ref_model):
        module.lm_head.register_forward_hook(lambda *_: head_calls.append(1))
    preference_loss = core.preference_loss

    def counted(*args, **kwargs):
        loss_calls.append(1)
        return preference_loss(*args, **kwargs)

    monkeypatch.setattr(core, "preference_loss", counted)
    trainer = trainer_class(model, ref_model, args=args, train_dataset=train_data, eval_dataset=eval_data,
                            processing_class=TOKENIZER, dataset_tags=["prefs.jsonl"])  # fmt: skip
    updates = applied_sgd_updates(trainer)
    trainer.train()
    evals = trainer.evaluate()
    monkeypatch.setattr(core, "preference_loss", preference_loss)
    return trainer, list(trainer.state.log_history), evals, updates, len(head_calls), len(loss_calls)


@pytest.mark.parametrize("kind", ["dpo", "kto"])
def test_the_mixin_keeps_a_framework_subclass_and_computes_the_fused_loss(kind, tmp_path, monkeypatch):
    fast_class, stock_class, config, data = {
        "dpo": (FastFrameworkDPOTrainer, FrameworkDPOTrainer, DPOConfig, (TRAIN, EVAL)),
        "kto": (FastFrameworkKTOTrainer, FrameworkKTOTrainer, KTOConfig, (KTO_TRAIN, KTO_EVAL)),
    }[kind]
    fast, fast_logs, fast_eval, fast_updates, fast_head, fast_losses = run(fast_class, config, *data, tmp_path,
                                                                          monkeypatch)  # fmt: skip
    stock, stock_logs, stock_eval, stock_updates, _, stock_losses = run(stock_class, config, *data, tmp_path,
                                                                        monkeypatch)  # fmt: skip
    # the framework's overrides ran under the mixin as without it
    assert fast.calls == stock.calls and fast.calls["training_step"] == 2 and fast.calls["create_optimizer"] >= 1
    assert fast.dataset_tags == ["prefs.jsonl"]
    assert [log[MARKER] for log in fast_logs] == [log[MARKER] for log in stock_logs] and fast_logs[0][MARKER] == 1.0
    # the loss is the fused one: each step (2 train, at least 1 eval batch) through dpo_fast, the logits never formed,
    # the numbers TRL's
    assert fast_losses >= 3 and stock_losses == 0 and fast_head == 0
    assert_logs_match(fast_logs + [fast_eval], stock_logs + [stock_eval], beta=0.1)
    assert_updates_match(fast_updates, stock_updates)


def test_the_mixin_after_trls_class_is_refused_where_the_class_is_defined():
    """After TRL's class in the MRO the mixin's methods would never run (TRL's loss, TRL's constructor alone)."""
    with pytest.raises(TypeError, match="DPOFastMixin must come before DPOTrainer"):

        class After(FrameworkDPOTrainer, DPOFastMixin):
            pass

    with pytest.raises(TypeError, match="KTOFastMixin must come before KTOTrainer"):

        class KTOAfter(KTOTrainer, KTOFastMixin):
            pass


def test_the_mixin_without_trls_class_is_refused_at_construction(tmp_path):
    class Alone(DPOFastMixin):  # a mixin of mixins may be defined; built, it is refused
        pass

    with pytest.raises(TypeError, match=r"DPOFastMixin goes over a trl\.DPOTrainer subclass"):
        Alone(None, args=DPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False))


def test_the_mixin_reads_the_config_passed_by_position_and_refuses_before_loading(tmp_path):
    """A bad option in a DPOConfig given third by position (model, ref_model, args) is refused before TRL runs."""
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, loss_type=["robust"], label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        FastFrameworkDPOTrainer(None, None, args)
