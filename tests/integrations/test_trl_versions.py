"""The TRL range the drop-ins declare: one range in the code and in pyproject.toml, checked at construction.

Outside ``trl_versions.SUPPORTED_TRL`` a drop-in (or a mixin over a framework's trainer) raises before anything
loads, naming the installed and the supported versions; ``DPO_FAST_ALLOW_UNTESTED_TRL=1`` makes it a warning.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

from trl import DPOConfig, KTOConfig  # noqa: E402

from dpo_fast.integrations import trl_versions  # noqa: E402
from dpo_fast.integrations.trl import FastDPOTrainer, FastKTOTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11's")
def test_pyproject_declares_the_range_the_code_checks():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["trl"] == [f"trl{trl_versions.SUPPORTED_TRL_SPEC}"]
    assert f"trl{trl_versions.SUPPORTED_TRL_SPEC}" in extras["test"]
    assert all(version in trl_versions.SUPPORTED_TRL for version in trl_versions.TESTED_TRL)


def test_ci_tests_the_declared_minimum_and_a_release_in_range_on_the_gpu_stack():
    """CI's third job pins the range's floor (.ci/trl-oldest.txt); the GPU machine's stack (.ci/gpu-stack.txt) a
    release inside it: declared is tested."""

    def pins(name: str) -> dict:
        lines = (ROOT / ".ci" / name).read_text().split()
        return dict(line.split("==") for line in lines if "==" in line)

    floor = trl_versions.SUPPORTED_TRL_SPEC.split(",")[0]
    assert floor == f">={pins('trl-oldest.txt')['trl']}" and pins("trl-oldest.txt")["trl"] in trl_versions.TESTED_TRL
    assert pins("gpu-stack.txt")["trl"] in trl_versions.SUPPORTED_TRL


def test_the_installed_trl_is_supported():
    """The suite runs on a TRL the range holds (CI: 1.16 in job 1, 1.14.1 in job 3)."""
    trl_versions.check_trl_version("FastDPOTrainer")


@pytest.mark.parametrize("installed", ["1.13.2", "1.14.0", "1.17.0", "2.0.0"])
@pytest.mark.parametrize("trainer_class, config_class", [(FastDPOTrainer, DPOConfig), (FastKTOTrainer, KTOConfig)])
def test_outside_the_range_the_trainer_refuses_naming_both_versions(installed, trainer_class, config_class,
                                                                    monkeypatch, tmp_path):  # fmt: skip
    monkeypatch.setattr(trl_versions, "installed_trl", lambda: installed)
    monkeypatch.delenv(trl_versions.ALLOW_UNTESTED, raising=False)
    args = config_class(output_dir=str(tmp_path), report_to=[], bf16=False)
    with pytest.raises(trl_versions.UnsupportedTRLVersion) as refused:
        trainer_class(model=None, args=args)  # refused before TRL looks at the model
    message = str(refused.value)
    assert f"TRL {installed} is installed" in message and ">=1.14.1" in message and "<1.17" in message
    assert trainer_class.__name__ in message and trl_versions.ALLOW_UNTESTED in message


def test_the_opt_out_turns_the_error_into_a_warning(monkeypatch):
    monkeypatch.setattr(trl_versions, "installed_trl", lambda: "1.17.0")
    monkeypatch.setenv(trl_versions.ALLOW_UNTESTED, "1")
    with pytest.warns(UserWarning, match=r"TRL 1\.17\.0 is installed"):
        trl_versions.check_trl_version("FastDPOTrainer")
    monkeypatch.setenv(trl_versions.ALLOW_UNTESTED, "0")
    with pytest.raises(trl_versions.UnsupportedTRLVersion):
        trl_versions.check_trl_version("FastDPOTrainer")
