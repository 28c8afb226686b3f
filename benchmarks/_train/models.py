"""The models and data every training arm gets: Llama-shaped models from a config, synthetic preference pairs.

A ``Shape`` is ``pairs`` preference pairs (chosen, rejected) of ``length`` tokens each, the first
``prompt_fraction`` of a sequence prompt. Text is random lowercase letters and the tokenizer has
one token per letter (with ``</s>`` and ``<pad>``), so lengths are exact: a pair is
``[prompt][completion, </s>]`` twice, the chosen and rejected completions of the same length (no
padding: transformers then passes no attention mask, and SDPA takes its causal kernel, whose memory
is linear in the length), or with ``padded`` the rejected one a token shorter (the batch is padded,
and the attention gets a (rows, 1, T, T) mask).
"""

from __future__ import annotations

import copy
import random
import string
from dataclasses import dataclass
from pathlib import Path

import torch

# Llama-shaped configurations (transformers' LlamaConfig keywords) by name; bench_memory.py builds its own
MODELS = {
    # Llama-3.2-1B's shape (tied embeddings, vocabulary 128,256)
    "llama-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    # Llama-3.2-3B's shape
    "llama-3b": dict(
        vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    # the CPU smoke runs'
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
    ),
    # CPU: a tiny Llama whose head (a 32000-token vocabulary) is most of the work, for the token metrics' cost
    "tiny-32k": dict(
        vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
    ),
    # CPU: 41.6M parameters (25.2M in the decoder layers, a tied 32000 x 512 embedding), for prefix sharing
    "llama-40m": dict(
        vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True,
    ),
}  # fmt: skip
LETTERS = string.ascii_lowercase
PAD, EOS = 0, 1  # the tokenizer's ids of <pad> and </s>; letters are 3..28


@dataclass(frozen=True)
class Shape:
    """``pairs`` pairs of ``length``-token sequences, the first ``prompt_fraction`` of each prompt; with
    ``padded`` the rejected completions are a token shorter (so a batch has padding)."""

    pairs: int
    length: int
    prompt_fraction: float = 0.5
    padded: bool = False

    @property
    def prompt(self) -> int:
        return int(self.length * self.prompt_fraction)

    @property
    def completion(self) -> int:
        """Completion tokens, its end-of-sequence token included."""
        return self.length - self.prompt

    @property
    def tokens(self) -> int:
        """Tokens of the batch as TRL counts them: each pair's two sequences whole."""
        return 2 * self.pairs * self.length

    def embedded_tokens(self, prefix_sharing: bool) -> int:
        """Token positions a forward pass embeds: the padded batch, or with prefix sharing one
        ``[prompt][chosen][rejected]`` row a pair."""
        if prefix_sharing:
            return self.pairs * (self.prompt + 2 * self.completion)
        return self.tokens


def tokenizer(folder: Path | None = None):
    """One token per lowercase letter, with ``</s>`` and ``<pad>``: sequence lengths are exact."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "</s>", "<unk>", *LETTERS])}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")),
        eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
    )  # fmt: skip
    if folder is not None:
        fast.save_pretrained(folder)
    return fast


def preference_rows(shape: Shape, seed: int = 0) -> list[dict]:
    """``shape.pairs`` rows of random letters: a prompt of ``shape.prompt`` tokens, completions of
    ``shape.completion - 1`` (the trainers append the end-of-sequence token), the rejected one a
    letter shorter with ``shape.padded``."""
    rng = random.Random(seed)

    def text(n: int) -> str:
        return "".join(rng.choices(LETTERS, k=n))

    short = 1 if shape.padded else 0
    return [{"prompt": text(shape.prompt), "chosen": text(shape.completion - 1),
             "rejected": text(shape.completion - 1 - short)} for _ in range(shape.pairs)]  # fmt: skip


def token_batch(shape: Shape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``preference_rows`` as a training batch, as TRL collates it: ``input_ids`` (2P, T), rows [0, P)
    chosen and [P, 2P) rejected, right-padded with ``<pad>``; ``labels`` (2P, T), the next token at each
    position of a completion and -100 elsewhere (prompt, the last position, padding)."""
    rows = preference_rows(shape, seed)
    ids = torch.full((2 * shape.pairs, shape.length), PAD, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for index, row in enumerate([(r["prompt"], r["chosen"]) for r in rows] + [(r["prompt"], r["rejected"])
                                                                           for r in rows]):  # fmt: skip
        prompt, completion = ([ord(c) - ord("a") + 3 for c in part] for part in row)
        sequence = torch.tensor(prompt + completion + [EOS])
        ids[index, : len(sequence)] = sequence
        labels[index, len(prompt) - 1 : len(sequence) - 1] = sequence[len(prompt) :]
    return ids, labels


def build_models(config: dict, device: str, dtype: torch.dtype):
    """The policy (random init, seed 0, SDPA attention) from LlamaConfig keywords, and a frozen copy as the reference."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        policy = AutoModelForCausalLM.from_config(LlamaConfig(**config, attn_implementation="sdpa"), dtype=dtype)
    return policy, copy.deepcopy(policy).eval().requires_grad_(False)


def enable_checkpointing(model) -> None:
    """Gradient checkpointing on a transformers model (``activation_checkpointing_enable`` from transformers 5.23 on)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
