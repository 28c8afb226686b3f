"""FastDPOTrainer refuses the DPOConfig options that change the math and that dpo_fast does not implement.

Each refusal happens before TRL loads, tokenizes or precomputes anything, and names the option.
"""

import pytest

pytest.importorskip("trl")

from trl import DPOConfig  # noqa: E402

from dpo_fast.integrations.trl import FastDPOTrainer, trl_objective  # noqa: E402

REFUSED = [
    (dict(ld_alpha=0.5), "ld_alpha=0.5"),
    (dict(use_weighting=True), "use_weighting=True"),
    (dict(f_divergence_type="forward_kl"), "f_divergence_type='forward_kl'"),
    (dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5), "f_divergence_type='alpha_divergence'"),
    (dict(loss_type=["aot"]), "loss_type='aot'"),
    (dict(loss_type=["aot_unpaired"]), "loss_type='aot_unpaired'"),
    (dict(loss_type=["discopop"]), "loss_type='discopop'"),
    (dict(loss_type=["sigmoid", "hinge"]), "one pairwise loss type"),
    (dict(loss_type=["sft"]), "one pairwise loss type"),
    (dict(loss_type=["robust"], label_smoothing=0.5), "label_smoothing"),
]


@pytest.mark.parametrize("options, message", REFUSED, ids=[m for _, m in REFUSED])
def test_unsupported_option_is_refused_by_name(options, message, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, **options)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FastDPOTrainer(model=None, args=args, train_dataset=None)


def test_unknown_backend_is_refused(tmp_path):
    with pytest.raises(ValueError, match="backend must be one of"):
        FastDPOTrainer(model=None, args=DPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False), backend="tpu")


@pytest.mark.parametrize(
    "options, expected",
    [
        (dict(loss_type=["sigmoid"], label_smoothing=0.3), dict(loss_type="sigmoid", label_smoothing=0.0)),
        (dict(loss_type=["robust"], label_smoothing=0.3), dict(loss_type="robust", label_smoothing=0.3)),
        (dict(loss_type=["exo_pair"], label_smoothing=1e-3), dict(loss_type="exo_pair", label_smoothing=1e-3)),
        (dict(loss_type=["ipo"]), dict(loss_type="ipo", average_log_prob=True)),
        (dict(loss_type=["sigmoid_norm"]), dict(loss_type="sigmoid", average_log_prob=True)),
        (dict(loss_type=["hinge"], beta=0.3), dict(loss_type="hinge", beta=0.3, average_log_prob=False)),
        (dict(loss_type=["sft", "apo_zero"], loss_weights=[0.2, 0.7]),
         dict(loss_type="apo_zero", weight=0.7, sft_weight=0.2)),
        (dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0), dict(loss_type="sigmoid")),
    ],
)  # fmt: skip
def test_config_maps_to_trl_1_16_semantics(options, expected, tmp_path):
    objective = trl_objective(DPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, **options))
    for key, value in expected.items():
        assert getattr(objective, key) == value, key
