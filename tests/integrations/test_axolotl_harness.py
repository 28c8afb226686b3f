"""The axolotl harness (tests/axolotl_harness/): its config and data, and, where axolotl is installed, real runs of it.

The config and data tests run anywhere (no axolotl needed). The end-to-end tests (marked slow) need axolotl >= 0.20,
Python 3.12 (docs/trl.md, "axolotl", says how to make that venv; elsewhere they skip): plain axolotl against the
hook-probe plugin (identical runs), and against dpo_fast's ``DPOFastPlugin`` for ``rl: dpo`` and ``rl: kto`` (the
loss per step and the weight update within 1e-4), each pair of runs a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

HARNESS = Path(__file__).resolve().parents[1] / "axolotl_harness"
sys.path.insert(0, str(HARNESS))

import fixtures  # noqa: E402


def test_the_config_lists_plugins_only_when_asked_and_takes_overrides(tmp_path):
    plain = yaml.safe_load(fixtures.render_config("/m", "/d.jsonl", tmp_path, max_steps=3))
    assert "plugins" not in plain
    assert (plain["rl"], plain["max_steps"], plain["save_steps"]) == ("dpo", 3, 3)
    assert plain["base_model"] == plain["tokenizer_config"] == "/m"
    assert plain["datasets"] == [{"path": "/d.jsonl", "ds_type": "json", "split": "train", "type": "chatml.intel"}]
    assert plain["output_dir"] == f"{tmp_path}/out"
    assert not (plain["bf16"] or plain["fp16"] or plain["flash_attention"] or plain["sdp_attention"])
    with_plugin = yaml.safe_load(
        fixtures.render_config(
            "/m", "/d.jsonl", tmp_path, plugins=["a.B", "c.D"], max_steps=3, rl_beta=0.3, optimizer="adamw_torch"
        )
    )
    assert with_plugin["plugins"] == ["a.B", "c.D"]
    assert (with_plugin["rl_beta"], with_plugin["optimizer"]) == (0.3, "adamw_torch")
    assert {k: v for k, v in with_plugin.items() if k not in ("plugins", "rl_beta", "optimizer")} == {
        k: v for k, v in plain.items() if k not in ("rl_beta", "optimizer")
    }


def test_the_data_are_the_bundled_pairs_in_chatml_intel_fields(tmp_path):
    path = fixtures.build_data(tmp_path / "pairs.jsonl", rows=5)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    bundled = [json.loads(line) for line in fixtures.PAIRS.read_text().splitlines()[:5]]
    assert [set(row) for row in rows] == [{"system", "question", "chosen", "rejected"}] * 5
    assert [(r["question"], r["chosen"], r["rejected"]) for r in rows] == [
        (b["prompt"], b["chosen"], b["rejected"]) for b in bundled
    ]
    with pytest.raises(ValueError, match="fewer than"):
        fixtures.intel_rows(10**6)
    kto = [json.loads(line) for line in fixtures.build_data(tmp_path / "kto.jsonl", rows=5, rl="kto").read_text()
           .splitlines()]  # fmt: skip
    assert [(r["question"], r["completion"], r["label"]) for r in kto] == [
        (b["prompt"], b["chosen"] if i % 2 == 0 else b["rejected"], i % 2 == 0) for i, b in enumerate(bundled)
    ]


def test_the_tiny_model_saves_and_loads_offline_with_its_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = fixtures.build_model(tmp_path / "model")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert model.config.vocab_size >= len(tokenizer) and not model.config.tie_word_embeddings
    assert tokenizer("reverse ab:")["input_ids"][0] == tokenizer.bos_token_id


@pytest.mark.slow
def test_plain_axolotl_and_the_hook_probe_train_identically(tmp_path):
    pytest.importorskip("axolotl.integrations.base")  # the real package (tests/ holds no folder of that name)
    done = subprocess.run([sys.executable, str(HARNESS / "run_harness.py"), "--work", str(tmp_path), "--steps", "3",
                           "--rows", "24", "--tolerance", "0"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    plain, probe = summary["runs"]
    assert sorted(plain["losses"]) == ["1", "2", "3"] and plain["update_norm"] > 0
    assert probe["vs_plain"]["loss_max_rel"] == probe["vs_plain"]["update_max_rel"] == 0.0
    assert "[hook-probe] post_trainer_create AxolotlDPOTrainer" in done.stdout


PLUGIN = "dpo_fast.integrations.axolotl.DPOFastPlugin"


@pytest.mark.slow
@pytest.mark.parametrize("rl", ["dpo", "kto"])
def test_the_dpo_fast_plugin_trains_as_plain_axolotl_does(rl, tmp_path):
    """axolotl with ``plugins: [DPOFastPlugin]``: the same loss at every step and the same update as without it, within
    1e-4 (float32 rounding apart), and the loss is dpo_fast's (the plugin's trainer class ran)."""
    pytest.importorskip("axolotl.integrations.base")
    done = subprocess.run([sys.executable, str(HARNESS / "run_harness.py"), "--work", str(tmp_path), "--steps", "3",
                           "--rows", "24", "--rl", rl, "--plugin", PLUGIN, "--tolerance", "1e-4"],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    plain, fast = summary["runs"]
    assert sorted(plain["losses"]) == ["1", "2", "3"] and plain["update_norm"] > 0
    assert max(fast["vs_plain"]["loss_max_rel"], fast["vs_plain"]["update_max_rel"]) <= 1e-4
    trainer_class = "DPOFastAxolotlDPOTrainer" if rl == "dpo" else "DPOFastAxolotlKTOTrainer"
    assert trainer_class in (tmp_path / PLUGIN / "axolotl.log").read_text()
