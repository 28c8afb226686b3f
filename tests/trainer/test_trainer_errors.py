"""The trainer says what is wrong, early and in one line: config types, missing paths, bad files, the CLI.

Also the CLI's ``--help`` and the table of keys in docs/training.md, both made from ``TrainConfig``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import datasets
import transformers
from accelerate.state import AcceleratorState
from trainer_helpers import TINY_LLAMA, TOKENIZER, flags, run_values, write_tiny_files

import dpo_fast
from dpo_fast.trainer import TrainConfig, cli, load_config, train

TRAINING_DOC = Path(__file__).resolve().parents[2] / "docs" / "training.md"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_tiny_files(tmp_path_factory.mktemp("tiny"), train_rows=16, eval_rows=8)


# ---------------------------------------------------------------------------------------------- config types


def test_yaml_values_are_coerced_to_their_declared_type(tmp_path):
    path = tmp_path / "run.yaml"
    # YAML 1.1 reads 1e-3 as a string; quoted values stay strings
    path.write_text("model: m\ndataset: d\nlearning_rate: 1e-3\nbf16: 'no'\nmax_steps: '12'\nwarmup_steps: 3.0\n"
                    "max_length: null\neval_dataset: 'null'\npadding_free: yes\n")  # fmt: skip
    cfg = load_config(path)
    assert cfg.learning_rate == 1e-3 and isinstance(cfg.learning_rate, float)
    assert cfg.bf16 is False and cfg.padding_free is True
    assert (cfg.max_steps, cfg.warmup_steps, cfg.max_length, cfg.eval_dataset) == (12, 3, None, None)
    assert isinstance(cfg.warmup_steps, int)


@pytest.mark.parametrize(
    "line, message",
    [
        ('max_steps: "ten"', "max_steps must be an integer, got 'ten' (str)"),
        ("bf16: maybe", "bf16 must be true or false, got 'maybe' (str)"),
        ("learning_rate: fast", "learning_rate must be a number, got 'fast' (str)"),
        ("learning_rate: .nan", "learning_rate must be a finite number, got nan"),
        ("seed: 1.5", "seed must be an integer, got 1.5 (float)"),
        ("per_device_train_batch_size: [4]", "per_device_train_batch_size must be an integer, got [4] (list)"),
        ("max_length: 'long'", "max_length must be an integer or null, got 'long' (str)"),
        ("dataset: 3", "dataset must be a string, got 3 (int)"),
        ("beta: true", "beta must be a number, got True (bool)"),
        ("logging_steps: 0", "logging_steps must be >= 1, got 0"),
        ("adam_beta2: 1.0", "adam_beta2 must be < 1, got 1.0"),
        ("dtype: fp32", "dtype must be one of float32 | bfloat16 | float16, got 'fp32'"),
        ("backend: cpu", "backend must be one of auto | reference | torch | triton | cpp | cuda, got 'cpu'"),
    ],
)
def test_a_bad_value_is_refused_in_one_line_naming_its_key(tmp_path, line, message):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: m\ndataset: d\n{line}\n")
    with pytest.raises(ValueError) as raised:
        load_config(path)
    assert str(raised.value) == message


# ---------------------------------------------------------------------------------------------- missing paths


@pytest.fixture
def no_network(monkeypatch):
    """The hub loaders the trainer uses load what exists on disk and raise for anything else, as a hub call."""

    def local_only(original, name_of):
        def load(*args, **kwargs):
            if not Path(str(name_of(*args, **kwargs))).expanduser().exists():
                raise AssertionError(f"a hub call was made: {args}")
            return original(*args, **kwargs)

        return load

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", local_only(cls.from_pretrained, lambda name, *a, **k: name))

    def files_or_name(name, *a, data_files=None, **k):
        return data_files or name

    monkeypatch.setattr(datasets, "load_dataset", local_only(datasets.load_dataset, files_or_name))


def run_until_error(values: dict):
    try:
        train(TrainConfig(**values))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize(
    "key, value",
    [("model", "no-such.json"), ("model", "./no-such-model"), ("model", "runs/a/no-such-model"),
     ("tokenizer", "./no-such-tokenizer"), ("dataset", "no-such.jsonl"), ("eval_dataset", "~/no-such/eval.parquet")],
)  # fmt: skip
def test_a_missing_local_path_is_not_found_at_once_without_the_hub(files, tmp_path, no_network, key, value):
    values = run_values(files, tmp_path / "out", **{key: value})
    with pytest.raises(ValueError, match=f"^{key} '{re.escape(value)}' not found: no such file or folder"):
        run_until_error(values)
    assert not (tmp_path / "out").exists()


def test_a_hub_name_that_fails_to_load_is_one_error_naming_the_key(files, tmp_path, monkeypatch):
    def offline(name, *args, **kwargs):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {name}.\nCheck ...")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", offline)
    values = run_values(files, tmp_path / "out", model="org/some-model")
    expected = (
        r"^model 'org/some-model' is not a local file or folder \(looked in .*\) and could not be loaded from the "
        r"Hugging Face hub: We couldn't connect to 'https://huggingface.co' to load the files of org/some-model.$"
    )
    with pytest.raises(ValueError, match=expected):
        run_until_error(values)


# ---------------------------------------------------------------------------------------------- the CLI's errors

BAD_FILES = {
    "empty": (b"", "dataset file '{path}' has no rows"),
    "blank lines only": (b"\n\n", "dataset file '{path}' has no rows"),
    "not UTF-8": (b'{"prompt": "rev\xff", "chosen": " a", "rejected": " b"}\n',
                  "dataset file '{path}' line 1, column 16: byte 0xff is not UTF-8; save the file as UTF-8"),
    "torn JSON": (b'{"prompt": "x", "chosen": " a", "rejected": " b"}\n{"prompt": "y", "cho\n',
                  "dataset file '{path}' line 2: not valid JSON (Unterminated string starting at)"),
    "empty array": (b"[]", "dataset file '{path}' has no rows"),
}  # fmt: skip


def cli_error(capsys, argv: list[str]) -> tuple[int, str]:
    """Run ``dpo-fast`` in this process; its exit status and its stderr."""
    try:
        status = cli.main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return status, capsys.readouterr().err


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line.lower()]
    assert len(errors) == 1, stderr
    assert errors[0].startswith("dpo-fast train: error: ") and errors[0].endswith(" (--debug shows the traceback)")
    return errors[0].removeprefix("dpo-fast train: error: ").removesuffix(" (--debug shows the traceback)")


@pytest.mark.parametrize("kind", BAD_FILES)
def test_a_bad_data_file_is_one_line_exit_2_and_no_output_dir(files, tmp_path, capsys, kind):
    content, message = BAD_FILES[kind]
    bad = tmp_path / ("rows.json" if kind == "empty array" else "rows.jsonl")
    bad.write_bytes(content)
    argv = ["train", *flags(run_values(files, tmp_path / "out", dataset=str(bad)))]
    status, stderr = cli_error(capsys, argv)
    assert status == 2
    assert one_error_line(stderr) == message.format(path=bad)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=re.escape(message.format(path=bad)[:40])):
        cli_error(capsys, [*argv, "--debug"])


def test_config_and_row_errors_through_the_cli_are_one_line(files, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {files / 'model.json'}\ndataset: {files / 'train.jsonl'}\nmax_steps: ten\n")
    status, stderr = cli_error(capsys, ["train", "--config", str(config)])
    assert (status, one_error_line(stderr)) == (2, "max_steps must be an integer, got 'ten' (str)")

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "reverse ab:", "chosen": " ba", "rejected": " ab"}) + "\n"
                    + json.dumps({"prompt": "reverse cd:", "chosen": "", "rejected": " cd"}) + "\n")  # fmt: skip
    status, stderr = cli_error(capsys, ["train", *flags(run_values(files, tmp_path / "out", dataset=str(rows)))])
    assert status == 2
    assert one_error_line(stderr) == (
        f"dataset '{rows}' row 2: field 'chosen' is empty (or has an empty message); fix or drop the row"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "model, options, message",
    [
        ({"model_type": "gpt2", "vocab_size": 40, "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 64,
          "bos_token_id": 1, "eos_token_id": 2}, {},
         r"prefix_sharing: prefix sharing is verified for model types \[.*\], not 'gpt2'"),
        ({**TINY_LLAMA, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, {},
         "prefix_sharing: the model's rotary scaling 'dynamic' depends on the longest position in the batch"),
        (TINY_LLAMA, {"attn_implementation": "flex_attention"},
         "prefix_sharing: PyTorch's flex_attention has no backward on CPU"),
    ],
    ids=["unverified model type", "dynamic rope", "flex attention on CPU"],
)  # fmt: skip
def test_prefix_sharing_refuses_what_it_cannot_share_exactly_in_one_line(files, tmp_path, capsys, model, options,
                                                                          message):  # fmt: skip
    config = tmp_path / "model.json"
    config.write_text(json.dumps(model))
    values = run_values(files, tmp_path / "out", model=str(config), prefix_sharing=True, **options)
    status, stderr = cli_error(capsys, ["train", *flags(values)])
    assert status == 2 and re.fullmatch(message + ".*", one_error_line(stderr)), stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- help and the keys table


def train_help() -> str:
    train_parser = cli.parser()._subparsers._group_actions[0].choices["train"]
    return " ".join(train_parser.format_help().split())


def test_help_shows_every_default_and_the_choices_from_the_code(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: argparse would wrap at hyphens
    text = train_help()
    for name in ("learning_rate", "max_steps", "beta", "output_dir", "save_total_limit", "backend"):
        default = TrainConfig.__dataclass_fields__[name].default
        assert f"(default: {default})" in text, name
    assert "(default: false)" in text and "(default: null)" in text
    assert "--overwrite-output-dir" in text and "--debug" in text
    backends = re.search(r"dpo_fast backend: ([\w |]+);", text).group(1).split(" | ")
    assert backends == ["auto", "reference", *dpo_fast.backends.CHUNKED_BACKENDS] and "cpp" in backends
    loss_types = re.search(r"--loss-type STR, --loss_type STR dpo: one of ([\w |]+), or several", text).group(1)
    assert tuple(loss_types.split(" | ")) == dpo_fast.LOSS_TYPES
    cpo_types = re.search(r"cpo: one of ([\w |]+); orpo: null", text).group(1)
    assert tuple(cpo_types.split(" | ")) == dpo_fast.CPO_LOSS_TYPES


def test_the_documented_table_of_keys_is_the_code():
    keys = TRAINING_DOC.read_text().split("## The keys", 1)[1].split("\n## ", 1)[0]
    assert cli.keys_table() in keys, (
        "regenerate it: python -c 'from dpo_fast.trainer import cli; print(cli.keys_table())'"
    )


def test_the_bundled_config_passes_the_type_checks():
    cfg = load_config()
    assert cfg.tokenizer == str(Path(TOKENIZER).resolve()) and (cfg.learning_rate, cfg.beta) == (1e-3, 0.5)
