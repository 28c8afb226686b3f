"""The axolotl harness's inputs, all local: a tiny Llama, its tokenizer, preference data and the run's config.

- ``build_model(folder)``: a Llama built from ``TINY_LLAMA`` (random init, seeded) and saved with
  ``save_pretrained``, with the repository's character-level tokenizer (``dpo_fast/trainer/default/tokenizer``)
  saved beside it, so ``base_model: <folder>`` loads offline (``HF_HUB_OFFLINE=1``).
- ``build_data(path, rows)``: the first ``rows`` pairs of the bundled string-reversal data in the fields of
  axolotl's ``chatml.intel`` DPO strategy: ``system``, ``question``, ``chosen``, ``rejected`` (JSON lines);
  ``build_data(path, rows, rl="kto")``: the same pairs unpaired for its KTO strategy of that name (``question``,
  ``completion``, ``label``: the chosen completion desirable for even rows, the rejected one undesirable for odd).
- ``render_config(...)``: ``config.template.yaml`` filled in, with or without a ``plugins:`` list.

The character-level tokenizer knows ``a``-``z``, space, ``:`` and newline; the ``<|im_start|>``/``<|im_end|>``
markers that ``chatml.intel`` wraps around each turn come out partly as ``<unk>`` tokens. That changes nothing
for the harness's purpose (the same tokens reach plain axolotl and a plugin), and keeps every input local.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TOKENIZER = ROOT / "dpo_fast" / "trainer" / "default" / "tokenizer"
PAIRS = ROOT / "dpo_fast" / "trainer" / "default" / "train.jsonl"
TEMPLATE = HERE / "config.template.yaml"

# untied, so the LM head's update shows on its own; vocab_size covers the tokenizer's 33 entries
TINY_LLAMA = {
    "vocab_size": 40, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}  # fmt: skip


# the keys axolotl requires for an rl beyond the template's (its config validation refuses KTO without this one)
RL_KEYS = {"dpo": {}, "kto": {"remove_unused_columns": False}}


def build_model(folder: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialized ``TINY_LLAMA`` (seeded by ``seed``) and the tokenizer into ``folder``; gives it."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(folder)
    return folder


def intel_rows(rows: int) -> list[dict]:
    """The first ``rows`` bundled pairs as ``chatml.intel`` records (an empty ``system``: no system turn)."""
    pairs = [json.loads(line) for line in PAIRS.read_text().splitlines()[:rows]]
    if len(pairs) < rows:
        raise ValueError(f"{PAIRS} has {len(pairs)} pairs, fewer than the {rows} asked for")
    return [{"system": "", "question": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]


def kto_rows(rows: int) -> list[dict]:
    """``intel_rows(rows)`` unpaired: row i keeps its chosen completion (``label`` true) when i is even, its rejected
    one (``label`` false) when odd."""
    return [
        {"system": "", "question": row["question"], "completion": row["chosen" if i % 2 == 0 else "rejected"],
         "label": i % 2 == 0}
        for i, row in enumerate(intel_rows(rows))
    ]  # fmt: skip


def build_data(path: str | Path, rows: int = 64, rl: str = "dpo") -> Path:
    """Write ``intel_rows(rows)`` (``kto_rows(rows)`` for ``rl="kto"``) as JSON lines to ``path``; gives it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = kto_rows(rows) if rl == "kto" else intel_rows(rows)
    path.write_text("".join(json.dumps(row) + "\n" for row in records))
    return path


def render_config(model_dir: str | Path, data_path: str | Path, work_dir: str | Path, plugins: list[str] = (),
                  max_steps: int = 4, **overrides) -> str:  # fmt: skip
    """The axolotl YAML of one run: ``config.template.yaml`` with these paths, ``plugins`` listed (none: no
    ``plugins:`` key at all) and any top-level key replaced or added by ``overrides`` (YAML scalars)."""
    values = {"model_dir": Path(model_dir), "data_path": Path(data_path), "work_dir": Path(work_dir),
              "max_steps": max_steps}  # fmt: skip
    text = TEMPLATE.read_text().format(**values)
    lines = text.splitlines()
    for key, value in overrides.items():
        line = f"{key}: {json.dumps(value)}"
        index = next((i for i, old in enumerate(lines) if old.startswith(f"{key}:")), None)
        if index is None:
            lines.append(line)
        else:
            lines[index] = line
    if plugins:
        lines += ["plugins:", *(f"  - {plugin}" for plugin in plugins)]
    return "\n".join(lines) + "\n"
