"""The token layout: where a batch's scored tokens are and which sequence each belongs to, built and checked once.

A batch reaches the head in one of three layouts, and each becomes the same flat description:

- padded: ``hidden (R, T, H)``, ``labels (R, T)``: sequence ``r`` is row ``r`` (``token_logps`` takes any leading
  shape ``(..., T)``: every row of the last dimension is a sequence);
- packed (padding-free): ``hidden (N, H)``, ``labels (N,)`` and ``segment_ids (N,)`` in ``[0, R)``;
- prefix-shared (``integrations.prefix_sharing``): packed, the shared prompt's tokens carrying no label.

``labels[t]`` is the target of ``hidden[t]`` (already shifted); tokens labelled ``ignore_index`` (prompt,
padding) are never multiplied. For the pairwise objectives ``R = 2P``: sequences ``[0, P)`` are the chosen
completions, ``[P, 2P)`` the rejected ones (TRL's concatenated order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import validate

IGNORE_INDEX = -100
"""The label of a position without a target (prompt, padding): PyTorch's and TRL's convention."""


@dataclass
class TokenLayout:
    """N tokens in S sequences.

    Attributes:
        labels: (N,) int64 targets, ``ignore_index`` on tokens no sum scores.
        segment_ids: (N,) int64 sequence of each token, in ``[0, num_sequences)``.
        num_sequences: S.
        ignore_index: the label of unscored tokens.
        shape: the caller's labels' shape, in which per-token results are returned.
    """

    labels: torch.Tensor
    segment_ids: torch.Tensor
    num_sequences: int
    ignore_index: int
    shape: tuple[int, ...]
    _counts: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def of(
        cls,
        hidden: torch.Tensor,
        labels: torch.Tensor,
        *,
        vocab: int,
        segment_ids: torch.Tensor | None = None,
        num_sequences: int | None = None,
        ignore_index: int = IGNORE_INDEX,
    ) -> TokenLayout:
        """The layout of ``labels`` (hidden's leading shape), checked: padded without ``segment_ids``, packed with.

        Args:
            hidden: (..., H) padded, or (N, H) packed; only its shape is read.
            vocab: V, the range of the labels.
            segment_ids: (N,) int64 for packed input; ``num_sequences`` then defaults to ``segment_ids.max() + 1``.
            num_sequences: S, checked against the padded rows when given for padded input.
        Raises:
            ValueError: naming the argument, for shapes, dtypes, devices and (in eager mode) values out of range.
        """
        validate.check_labels(hidden, labels, ignore_index)
        validate.check_label_values(labels, vocab, ignore_index)
        if segment_ids is None:
            rows, length = math.prod(labels.shape[:-1]), labels.shape[-1]
            if num_sequences is not None and num_sequences != rows:
                raise ValueError(f"hidden holds {rows} padded sequences, but {num_sequences} were expected")
            segment_ids = torch.arange(rows, device=labels.device).repeat_interleave(length)
            return cls(labels.reshape(-1).long(), segment_ids, rows, ignore_index, tuple(labels.shape))
        if hidden.dim() != 2:
            raise ValueError(f"with segment_ids, hidden must be packed as (N, H), got {tuple(hidden.shape)}")
        validate.check_segment_ids(segment_ids, labels.shape[0], hidden.device)
        if num_sequences is None:
            num_sequences = int(segment_ids.max()) + 1 if segment_ids.numel() else 0
        else:
            validate.check_num_segments(num_sequences)
        flat_labels, segment_ids = validate.segment_values(labels.long(), segment_ids.long(), num_sequences, vocab)
        return cls(flat_labels, segment_ids, num_sequences, ignore_index, tuple(labels.shape))

    @property
    def scored(self) -> torch.Tensor:
        """(N,) bool: the tokens with a target."""
        return self.labels != self.ignore_index

    def counts(self) -> torch.Tensor:
        """(S,) float64 number of scored tokens of each sequence (no device sync), formed once."""
        if self._counts is None:
            self._counts = self.sums(self.scored)
        return self._counts

    def sums(self, values: torch.Tensor) -> torch.Tensor:
        """(S,) float64 per-sequence sums of (N,) per-token values."""
        zeros = torch.zeros(self.num_sequences, dtype=torch.float64, device=self.labels.device)
        return zeros.index_add(0, self.segment_ids, values.double())

    def per_token(self, values: torch.Tensor) -> torch.Tensor:
        """(N,) per-token values in the caller's labels' shape."""
        return values.view(self.shape)


def pair_count(hidden, segment_ids, num_pairs, ref_chosen_logps) -> int:
    """P of a pairwise entry: the padded rows' half, or for packed input ``num_pairs`` or the reference's length."""
    if segment_ids is None:
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[0] % 2 or hidden.shape[0] == 0:
            shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else hidden
            raise ValueError(f"hidden must be (2P, T, H) with chosen rows first and P >= 1, got {shape!r}; for "
                             "packed input pass (N, H) with segment_ids")  # fmt: skip
        if num_pairs is not None:
            raise ValueError(f"num_pairs is for packed input (with segment_ids); padded input has P = "
                             f"hidden.shape[0] // 2 = {hidden.shape[0] // 2} pairs, got num_pairs={num_pairs!r}")  # fmt: skip
        return hidden.shape[0] // 2
    if num_pairs is not None:
        validate.check_num_segments(num_pairs, "num_pairs")
        return num_pairs
    if isinstance(ref_chosen_logps, torch.Tensor) and ref_chosen_logps.dim() == 1:
        return ref_chosen_logps.shape[0]
    raise ValueError("with segment_ids and no reference log-probs (reference_free=True, or a reference-free "
                     "objective), pass num_pairs (P, with segment ids in [0, 2P)): it cannot be told from the segment "
                     "ids when the last sequences have no tokens")  # fmt: skip


def sequence_count(hidden, segment_ids, desirable) -> int:
    """B of KTO: the padded rows (at least one), or for packed input the length of ``desirable``."""
    if segment_ids is None and isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
        if hidden.shape[0] == 0:
            raise ValueError(f"hidden must be (B, T, H) with B >= 1 completions, got {tuple(hidden.shape)}")
        return hidden.shape[0]
    if isinstance(desirable, torch.Tensor) and desirable.dim() == 1:
        return desirable.shape[0]
    raise ValueError(f"desirable must be a (B,) bool tensor, True for a desirable completion, got {desirable!r}")
