"""Make the bundled default run's data and tokenizer: string reversal, whose right answer is checkable.

Each row asks to reverse a string of 4-8 letters from ``a``-``l``:

    {"prompt": "reverse fbkal:", "chosen": " lakbf", "rejected": " lakfb"}

``chosen`` is the reversal; ``rejected`` is a near miss of one of four kinds, in equal shares:
the string not reversed, two neighbouring letters swapped, one letter replaced by a letter the
string does not have, one letter dropped. The held-out split's strings never occur in the training split. The tokenizer is
character-level (``tokenizers`` WordLevel over single characters, ``<bos>`` prepended) with a
small chat template, so conversational rows work with it too.

Run from anywhere; it rewrites ``train.jsonl``, ``eval.jsonl`` and ``tokenizer/`` beside itself:

    python -m dpo_fast.trainer.default.make_data
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LETTERS = "abcdefghijkl"
LENGTHS = range(4, 9)
TRAIN_ROWS, EVAL_ROWS = 4000, 400
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
HERE = Path(__file__).resolve().parent


def near_miss(answer: str, rng: random.Random) -> str:
    """A wrong answer close to ``answer`` (the reversal of a string of >= 4 letters)."""
    while True:
        kind = rng.choice(("unreversed", "swap", "replace", "drop"))
        chars = list(answer)
        if kind == "unreversed":
            chars.reverse()
        elif kind == "swap":
            i = rng.randrange(len(chars) - 1)
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        elif kind == "replace":
            i = rng.randrange(len(chars))
            chars[i] = rng.choice([c for c in LETTERS if c not in answer])
        else:
            del chars[rng.randrange(len(chars))]
        wrong = "".join(chars)
        if wrong != answer:
            return wrong


def rows(strings: list[str], rng: random.Random) -> list[dict]:
    return [{"prompt": f"reverse {s}:", "chosen": f" {s[::-1]}", "rejected": f" {near_miss(s[::-1], rng)}"}
            for s in strings]  # fmt: skip


def build_tokenizer(folder: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(LETTERS) | set("abcdefghijklmnopqrstuvwxyz") | set(" :\n"))
    vocab = {token: i for i, token in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", chat_template=CHAT_TEMPLATE)  # fmt: skip
    fast.save_pretrained(folder)


def main() -> None:
    rng = random.Random(0)
    seen: set[str] = set()
    strings = []
    while len(strings) < TRAIN_ROWS + EVAL_ROWS:
        s = "".join(rng.choice(LETTERS) for _ in range(rng.choice(LENGTHS)))
        if s not in seen:
            seen.add(s)
            strings.append(s)
    for name, split in (("train", strings[:TRAIN_ROWS]), ("eval", strings[TRAIN_ROWS:])):
        lines = [json.dumps(row) for row in rows(split, rng)]
        (HERE / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    build_tokenizer(HERE / "tokenizer")


if __name__ == "__main__":
    main()
