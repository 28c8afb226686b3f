"""Prefix sharing: each DPO pair runs through the model once, as one sequence ``[prompt][chosen][rejected]``.

The idea of arXiv 2410.20305 ("Accelerating Direct Preference Optimization with Prefix Sharing"):
chosen and rejected begin with the same prompt, so the prompt's hidden states are computed once
and both completions attend to them. In the shared sequence

- positions: the prompt has ``0 .. Lp-1``, chosen ``Lp .. Lp+Lc-1`` and rejected also
  ``Lp .. Lp+Lr-1`` (it continues from the end of the prompt, not from chosen);
- attention: every token attends causally to the prompt and to its own part, never from rejected
  to chosen, never across pairs; a padding token attends to itself only;
- loss rows: the hidden state that predicts completion token ``j`` is the one of the token before
  it in its own sequence, so the last prompt token's row predicts both first tokens and is
  gathered twice; ``fused_linear_dpo_loss`` takes the gathered rows as a packed layout with
  ``segment_ids`` (chosen of pair p = p, rejected = P + p).

Why it is exact. In a decoder whose only token-mixing operation is attention and whose only
positional input is the position id (rotary embeddings), the state of a token after each layer is
a function of its own state, its position, and the states and positions of the tokens it attends
to. By the mask and positions above, every token of the shared sequence attends to exactly the
tokens (with the same positions) it attends to in its own unshared sequence, so by induction over
the layers its hidden state is the same function of the same inputs; masked keys get a softmax
weight of exactly 0, so only the order of floating-point summation differs. The log-probs and the
loss are therefore the same function of the parameters, and so is every gradient (the prompt's
single copy receives the sum of what its two copies receive in the unshared computation). A
sliding window is the same condition on positions (``pos_q - pos_k < window``), which holds in
both layouts.

What is refused (``check_model``), because the argument above does not hold or is not verified:
attention implementations that ignore a custom mask (FlashAttention, paged and hub kernels),
model types not verified here (``SUPPORTED_MODEL_TYPES``), layer types other than full and
sliding attention (chunked, linear), bidirectional attention, and rotary scalings that depend on
the batch's longest position (``dynamic``, ``longrope``). PyTorch's ``flex_attention`` has no
backward on CPU, so a flex model trains with sharing only on a GPU (its forward-only reference
pass runs on CPU).

Typical use (``dpo_fast.integrations.hf`` runs the model on the layout; ``dpo-fast train`` and
``FastDPOTrainer`` do it with ``prefix_sharing``)::

    check_model(model)                                                             # at startup
    batch = collate_shared(rows, pad_id=tokenizer.pad_token_id, pairs_per_row=1).to(device)
    rows = dpo_fast.integrations.hf.head_rows(model, shared=batch)                 # hidden (M, H), segment ids
    out = dpo_fast.integrations.hf.LMHead.of(model).dpo_loss(rows, ref_chosen_logps=..., ref_rejected_logps=...)
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, -1

# model_type -> the masks its decoder takes: one for every layer, without a window ("full") or with
# ``config.sliding_window`` ("sliding", Mistral), or a dict keyed by ``config.layer_types``
# ("by_layer_type"). Each is tested in tests/integrations/test_prefix_sharing.py.
SUPPORTED_MODEL_TYPES = {
    "llama": "full",
    "gemma": "full",
    "mistral": "sliding",
    "qwen2": "by_layer_type",
    "qwen3": "by_layer_type",
    "gemma2": "by_layer_type",
    "gemma3_text": "by_layer_type",
}
MASKED_ATTENTION = ("sdpa", "eager", "flex_attention")
_LAYER_TYPES = ("full_attention", "sliding_attention")
_BATCH_DEPENDENT_ROPE = ("dynamic", "longrope")


@dataclass
class SharedPrefixBatch:
    """P pairs laid out as ``[prompt][chosen][rejected]`` sequences in B rows of T tokens.

    Attributes:
        input_ids: (B, T) int64, padding ``pad_id``.
        position_ids: (B, T) int64, each pair's own positions (rejected continues from the prompt), 0 on padding.
        pair_ids: (B, T) int64, the pair of each token in [0, P), -1 on padding.
        parts: (B, T) int64, ``PROMPT`` (0), ``CHOSEN`` (1), ``REJECTED`` (2) or ``PADDING`` (-1).
        target_rows: (M,) int64, for each completion token that has a predecessor, the flat index
            (``row * T + column``) of the hidden state that predicts it.
        labels: (M,) int64, those completion tokens (every one a target: nothing is ignored).
        segment_ids: (M,) int64, p for pair p's chosen tokens and P + p for its rejected ones;
            ordered by pair, chosen before rejected.
        num_pairs: P.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    pair_ids: torch.Tensor
    parts: torch.Tensor
    target_rows: torch.Tensor
    labels: torch.Tensor
    segment_ids: torch.Tensor
    num_pairs: int

    def to(self, device: torch.device | str) -> SharedPrefixBatch:
        """The same batch with every tensor on ``device``."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return SharedPrefixBatch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})

    def gather(self, hidden: torch.Tensor) -> torch.Tensor:
        """The loss input: (B, T, H) last hidden states -> (M, H), row i predicting ``labels[i]``.

        Differentiable: the gradient of a row gathered twice (the last prompt token) is the sum of both.
        """
        if tuple(hidden.shape[:2]) != tuple(self.input_ids.shape):
            raise ValueError(
                f"hidden must be (B, T, H) = {tuple(self.input_ids.shape)} + (H,) for this batch, got {tuple(hidden.shape)}"
            )
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.target_rows)

    def visible(self, batch_idx, q_idx, kv_idx, window: int | None = None) -> torch.Tensor:
        """Whether query ``q_idx`` attends to key ``kv_idx`` in row ``batch_idx`` (broadcasting index tensors).

        The one definition of the mask: the dense masks call it on broadcast aranges, flex_attention's
        ``mask_mod`` on scalars. With ``window``, also ``position[q] - position[kv] < window``.
        """
        pair_q, pair_kv = self.pair_ids[batch_idx, q_idx], self.pair_ids[batch_idx, kv_idx]
        part_q, part_kv = self.parts[batch_idx, q_idx], self.parts[batch_idx, kv_idx]
        same_sequence = (pair_q == pair_kv) & (pair_q >= 0) & ((part_kv == PROMPT) | (part_kv == part_q))
        allowed = same_sequence & (kv_idx <= q_idx)
        if window is not None:
            position_q, position_kv = self.position_ids[batch_idx, q_idx], self.position_ids[batch_idx, kv_idx]
            allowed = allowed & (position_kv > position_q - window)
        return allowed | (q_idx == kv_idx)  # a padding token sees itself: no empty softmax row


def collate_shared(
    rows: Mapping[str, Sequence[Sequence[int]]],
    *,
    pad_id: int,
    pairs_per_row: int | None = 1,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> SharedPrefixBatch:
    """Lay P tokenized pairs out as shared-prefix sequences.

    Args:
        rows: ``prompt_ids``, ``chosen_ids``, ``rejected_ids``: P lists of int each (the trainer's
            tokenized rows, or ``pairs_from_trl_batch``'s output). Completions may be empty; an
            empty prompt shares nothing and its completions' first tokens have no predictor.
        pad_id: the token id of padding.
        pairs_per_row: how many consecutive pairs share a row; None packs all P in one row
            (padding-free). 1 (default) gives one padded row per pair. Packing pays with
            flex_attention, which skips the blocks the mask empties; sdpa and eager compute every
            (query, key) of a row, so there several pairs per row cost attention work quadratic in
            the row's length.
        padding_side: "right" or "left".
        pad_to_multiple_of: round T up to a multiple of this (fewer distinct shapes to compile).
    Returns:
        a ``SharedPrefixBatch`` on CPU.
    """
    prompts, chosens, rejecteds = _pair_lists(rows)
    if not isinstance(pad_id, numbers.Integral) or isinstance(pad_id, bool) or pad_id < 0:
        raise ValueError(f"pad_id must be a token id (an int >= 0), got {pad_id!r}")
    if pairs_per_row is not None and (not isinstance(pairs_per_row, int) or pairs_per_row < 1):
        raise ValueError(f"pairs_per_row must be a positive int or None (all pairs in one row), got {pairs_per_row!r}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")

    num_pairs = len(prompts)
    per_row = num_pairs if pairs_per_row is None else pairs_per_row
    row_columns = {"input_ids": [], "position_ids": [], "pair_ids": [], "parts": []}
    # per loss row: (row, column in the unpadded row), label, segment
    targets: list[tuple[int, int, int, int]] = []
    for row, first_pair in enumerate(range(0, num_pairs, per_row)):
        columns = {key: [] for key in row_columns}
        for pair in range(first_pair, min(first_pair + per_row, num_pairs)):
            start = len(columns["input_ids"])
            prompt, chosen, rejected = prompts[pair], chosens[pair], rejecteds[pair]
            for part, tokens in ((PROMPT, prompt), (CHOSEN, chosen), (REJECTED, rejected)):
                offset = 0 if part == PROMPT else len(prompt)
                columns["input_ids"] += tokens
                columns["position_ids"] += range(offset, offset + len(tokens))
                columns["pair_ids"] += [pair] * len(tokens)
                columns["parts"] += [part] * len(tokens)
            last_prompt = start + len(prompt) - 1
            for completion, begin, segment in (
                (chosen, start + len(prompt), pair),
                (rejected, start + len(prompt) + len(chosen), num_pairs + pair),
            ):
                for j, token in enumerate(completion):
                    predictor = last_prompt if j == 0 else begin + j - 1
                    if predictor >= start:  # an empty prompt leaves the first token without a predictor
                        targets.append((row, predictor, token, segment))
        for key, values in columns.items():
            row_columns[key].append(values)

    length = max(map(len, row_columns["input_ids"]))
    if pad_to_multiple_of is not None:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    fills = {"input_ids": pad_id, "position_ids": 0, "pair_ids": -1, "parts": PADDING}
    shifts = [length - len(ids) if padding_side == "left" else 0 for ids in row_columns["input_ids"]]
    tensors = {}
    for key, values in row_columns.items():
        padded = [_pad(v, length, fills[key], padding_side) for v in values]
        tensors[key] = torch.tensor(padded, dtype=torch.int64).reshape(len(values), length)
    target_rows = [row * length + shifts[row] + column for row, column, _, _ in targets]
    return SharedPrefixBatch(
        **tensors,
        target_rows=torch.tensor(target_rows, dtype=torch.int64),
        labels=torch.tensor([label for _, _, label, _ in targets], dtype=torch.int64),
        segment_ids=torch.tensor([segment for _, _, _, segment in targets], dtype=torch.int64),
        num_pairs=num_pairs,
    )


def pairs_from_trl_batch(batch: Mapping[str, torch.Tensor]) -> dict[str, list[list[int]]]:
    """The P (prompt, chosen, rejected) token lists of a batch from TRL 1.16's ``DataCollatorForPreference``.

    Args:
        batch: ``input_ids``, ``attention_mask``, ``completion_mask``: (2P, T), chosen rows first,
            each row ``prompt + completion`` then padding (right-padded, as TRL pads).
    Returns:
        ``{"prompt_ids", "chosen_ids", "rejected_ids"}``, P lists of int each, for ``collate_shared``.
    Raises:
        ValueError: a row is not ``[prompt][completion][padding]``, or a pair's two prompts differ
            (TRL's ``truncation_mode="keep_end"`` cuts them by their own lengths): such a pair has
            no common prefix to share.
    """
    for key in ("input_ids", "attention_mask", "completion_mask"):
        if key not in batch:
            raise ValueError(
                f"batch lacks {key!r}: prefix sharing reads TRL's input_ids, attention_mask, completion_mask"
            )
    input_ids, attention, completion = (batch[k].cpu() for k in ("input_ids", "attention_mask", "completion_mask"))
    if input_ids.dim() != 2 or input_ids.shape[0] % 2 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must be (2P, T) with chosen rows first, got {tuple(input_ids.shape)}")
    prompts, completions = [], []
    for row in range(input_ids.shape[0]):
        length = int(attention[row].sum())
        is_completion = completion[row, :length].bool()
        prompt_length = int((~is_completion).sum())
        if not bool(attention[row, :length].all()) or bool(is_completion[:prompt_length].any()):
            raise ValueError(
                f"batch row {row} is not [prompt][completion][padding] (right-padded, completion after the prompt)"
            )
        ids = input_ids[row, :length].tolist()
        prompts.append(ids[:prompt_length])
        completions.append(ids[prompt_length:])
    pairs = input_ids.shape[0] // 2
    for pair in range(pairs):
        if prompts[pair] != prompts[pairs + pair]:
            raise ValueError(
                f"pair {pair}: the chosen and rejected rows begin with different prompts (lengths "
                f"{len(prompts[pair])} and {len(prompts[pairs + pair])}), so there is no prefix to share; "
                "TRL's truncation_mode='keep_end' cuts each row's prompt by its own length: use 'keep_start' "
                "with prefix sharing"
            )
    return {"prompt_ids": prompts[:pairs], "chosen_ids": completions[:pairs], "rejected_ids": completions[pairs:]}


# ---------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class AttentionPlan:
    """How a model takes the shared mask.

    Attributes:
        implementation: ``config._attn_implementation``: "sdpa", "eager" or "flex_attention".
        windows: each mask the decoder takes -> its sliding window in positions (None: no window).
            Keyed by layer type for decoders that take a dict of masks; one entry, key None, otherwise.
    """

    implementation: str
    windows: dict[str | None, int | None]


def check_model(model: torch.nn.Module, training_device: torch.device | str | None = None) -> AttentionPlan:
    """The ``AttentionPlan`` of a causal LM, or a ``ValueError`` saying why its prefix cannot be shared exactly.

    Args:
        model: a ``transformers`` causal LM (or a PEFT model around one).
        training_device: where it will take gradients through the shared mask, if it will: a
            flex_attention model is refused on CPU (PyTorch's flex_attention has no CPU backward).
    """
    config = model.config.get_text_config()
    model_type = config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"prefix sharing is verified for model types {sorted(SUPPORTED_MODEL_TYPES)}, not {model_type!r}: its "
            "attention may use positions or masks in ways the shared layout does not reproduce; turn prefix "
            "sharing off for this model"
        )
    implementation = config._attn_implementation
    if implementation not in MASKED_ATTENTION:
        raise ValueError(
            f"prefix sharing needs an attention implementation that takes a custom mask, one of {MASKED_ATTENTION}; "
            f"the model uses {implementation!r} (FlashAttention and hub kernels take only a padding mask). Load it "
            "with attn_implementation='flex_attention' (GPU) or 'sdpa'"
        )
    if not getattr(config, "is_causal", True) or getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"prefix sharing needs causal attention; this {model_type!r} model attends bidirectionally")
    for rope_type in _rope_types(config):
        if rope_type in _BATCH_DEPENDENT_ROPE:
            raise ValueError(
                f"the model's rotary scaling {rope_type!r} depends on the longest position in the batch, which "
                "differs between the shared and the unshared layouts; prefix sharing refuses it"
            )
    trains_on_cpu = training_device is not None and torch.device(training_device).type == "cpu"
    if implementation == "flex_attention" and trains_on_cpu:
        raise ValueError(
            "PyTorch's flex_attention has no backward on CPU: load the model with attn_implementation='sdpa' to "
            "train with prefix sharing on CPU (a forward-only reference pass under torch.no_grad() may use flex)"
        )
    masks, sliding_window = SUPPORTED_MODEL_TYPES[model_type], getattr(config, "sliding_window", None)
    if masks != "by_layer_type":  # the decoder applies one mask to every layer
        return AttentionPlan(implementation, {None: sliding_window if masks == "sliding" else None})
    layer_types = set(config.layer_types)
    unknown = layer_types - set(_LAYER_TYPES)
    if unknown:
        raise ValueError(f"prefix sharing handles layer types {_LAYER_TYPES}, not {sorted(unknown)}")
    if "sliding_attention" in layer_types and sliding_window is None:
        raise ValueError("the model has sliding_attention layers but no config.sliding_window")
    return AttentionPlan(
        implementation, {kind: sliding_window if kind == "sliding_attention" else None for kind in sorted(layer_types)}
    )


def shared_attention_mask(
    model: torch.nn.Module, batch: SharedPrefixBatch
) -> torch.Tensor | BlockMask | dict[str, torch.Tensor | BlockMask]:
    """What to pass as the decoder's ``attention_mask`` for ``batch``: the shared mask in the model's own form.

    Returns:
        sdpa: a (B, 1, T, T) bool mask (True: attend); eager: the same as an additive mask in the
        model's dtype (0 or its most negative value); flex_attention: a ``BlockMask``; for
        decoders with several layer types, a dict of them keyed by layer type.
    Raises:
        ValueError: ``check_model``'s refusals, and a flex_attention model asked for gradients on
        CPU (PyTorch's flex_attention has no CPU backward).
    """
    needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters())
    plan = check_model(model, batch.input_ids.device if needs_grad else None)
    masks = {kind: _mask(plan.implementation, batch, window, model.dtype) for kind, window in plan.windows.items()}
    return masks.get(None, masks)


def _mask(implementation: str, batch: SharedPrefixBatch, window: int | None, dtype: torch.dtype):
    rows, length = batch.input_ids.shape
    device = batch.input_ids.device
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(batch_idx, head_idx, q_idx, kv_idx):
            return batch.visible(batch_idx, q_idx, kv_idx, window)

        return create_block_mask(mask_mod, rows, None, length, length, device=device)
    positions = torch.arange(length, device=device)
    allowed = batch.visible(
        torch.arange(rows, device=device)[:, None, None], positions[None, :, None], positions[None, None, :], window
    ).unsqueeze(1)  # (B, 1, T, T)
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _rope_types(config) -> list[str]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    nested = [p for p in params.values() if isinstance(p, Mapping)]  # one set per layer type (Gemma 3)
    return [p.get("rope_type", p.get("type", "default")) for p in (nested or [params])]


def _pair_lists(rows) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    missing = [key for key in keys if key not in rows]
    if missing:
        raise ValueError(f"rows lacks {missing}: prefix sharing needs {list(keys)}, P lists of token ids each")
    lists = [[_token_ids(key, ids) for ids in rows[key]] for key in keys]
    counts = [len(values) for values in lists]
    if len(set(counts)) > 1 or counts[0] == 0:
        raise ValueError(f"rows must hold P >= 1 pairs, as many of each of {list(keys)}; got {dict(zip(keys, counts))}")
    return tuple(lists)


def _token_ids(key: str, ids) -> list[int]:
    """One sequence of token ids as ints: integers >= 0 (an int tensor's or array's too), never a float, a bool or a
    negative value (a -100 would silently become an ignored label)."""
    values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    for value in values:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{key} must hold token ids (non-negative ints), got {value!r} in {values[:20]!r}")
    return [int(value) for value in values]


def _pad(values: list[int], length: int, fill: int, side: str) -> list[int]:
    padding = [fill] * (length - len(values))
    return padding + values if side == "left" else values + padding
