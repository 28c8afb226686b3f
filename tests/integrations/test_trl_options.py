"""FastDPOTrainer reads a DPOConfig as TRL 1.16 does, and refuses only what TRL itself cannot run.

A refusal happens before TRL loads, tokenizes or precomputes anything, and names the option.
"""

import pytest

pytest.importorskip("trl")

from trl import DPOConfig  # noqa: E402

from dpo_fast.integrations.trl import FastDPOTrainer, trl_objective  # noqa: E402
from dpo_fast.objectives import PairTerm  # noqa: E402

REFUSED = [
    # TRL 1.16 divides by 1 - 2 * label_smoothing: an infinite loss
    (dict(loss_type=["robust"], label_smoothing=0.5), "label_smoothing"),
    # TRL 1.16 raises NotImplementedError (the sort misaligns the pair weights)
    (dict(loss_type=["aot"], use_weighting=True), "use_weighting=True"),
    # TRL 1.16 fails in the step (an in-place product on the expanded sft loss)
    (dict(loss_type=["sigmoid", "sft"], use_weighting=True), "use_weighting=True"),
    # TRL 1.16 raises: f-DPO applies to the losses of the score difference only
    (dict(loss_type=["nca_pair"], f_divergence_type="forward_kl"), "f_divergence_type='forward_kl'"),
]


@pytest.mark.parametrize("options, message", REFUSED, ids=[m for _, m in REFUSED])
def test_what_trl_cannot_run_is_refused_by_name(options, message, tmp_path):
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, **options)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FastDPOTrainer(model=None, args=args, train_dataset=None)


def test_unknown_backend_is_refused(tmp_path):
    with pytest.raises(ValueError, match="backend must be one of"):
        FastDPOTrainer(model=None, args=DPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False), backend="tpu")


@pytest.mark.parametrize(
    "options, terms, expected",
    [
        (dict(loss_type=["sigmoid"], label_smoothing=0.3), [PairTerm("sigmoid")], {}),
        (dict(loss_type=["robust"], label_smoothing=0.3), [PairTerm("robust", 1.0, 0.3)], {}),
        (dict(loss_type=["sigmoid", "aot"], loss_weights=[0.5, 2.0], label_smoothing=0.1),
         [PairTerm("sigmoid", 0.5), PairTerm("aot", 2.0, 0.1)], {}),
        (dict(loss_type=["ipo"]), [PairTerm("ipo")], dict(averaged=True)),
        (dict(loss_type=["hinge"], beta=0.3), [PairTerm("hinge")], dict(beta=0.3, averaged=False)),
        (dict(loss_type=["sft", "apo_zero"], loss_weights=[0.2, 0.7]), [PairTerm("sft", 0.2), PairTerm("apo_zero", 0.7)],
         {}),
        (dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3, discopop_tau=0.2, ld_alpha=0.4,
              use_weighting=True), [PairTerm("sigmoid")],
         dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3, discopop_tau=0.2, ld_alpha=0.4,
              use_weighting=True)),
    ],
)  # fmt: skip
def test_config_maps_to_trl_1_16_semantics(options, terms, expected, tmp_path):
    """TRL 1.16 reads label_smoothing in robust, exo_pair, aot and aot_unpaired only (its sigmoid has no cDPO)."""
    objective = trl_objective(DPOConfig(output_dir=str(tmp_path), report_to=[], bf16=False, **options))
    assert list(objective.terms) == terms
    for key, value in expected.items():
        assert getattr(objective, key) == value, key
