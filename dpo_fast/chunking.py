"""The loops over bounded chunks of valid tokens, shared by every chunked backend.

Only tokens with a target (``labels != ignore_index``) are ever multiplied: prompt and padding
rows are dropped before any product. Valid tokens are processed ``C`` at a time, with ``C`` chosen
so that the chunk's scratch (``C x V`` logits and ``dL/dz``, as the backend counts it) fits the
memory budget; the budget, not ``N``, bounds the extra memory.

Three passes are built here from a backend's ``logits_stats`` / ``logits_grad``:

- ``token_forward``: per-token log-prob, logsumexp and the token metrics (entropy, mean logit,
  top-1, ``log sum_v p_v^2``) (``2*N*H*V`` FLOPs, nothing kept).
- ``token_backward``: recomputes each chunk's logits from the saved logsumexp and forms
  ``dL/dh``, ``dL/dW``, ``dL/db`` for any per-token upstream gradient (``6*N*H*V``, or
  ``4*N*H*V`` with a frozen weight).
- ``preference_forward_with_grads``: a preference objective's loss (``dpo_fast.objectives``) with its
  gradients formed during the forward pass. A pair-local objective's gradients for a unit (a pair,
  or one sequence for KTO) depend only on that unit's own sums, so valid tokens are grouped by whole
  units; a group that fits the budget keeps its logits between the log-prob pass and the gradient
  pass (``6*N*H*V`` in all, ``4*N*H*V`` with a frozen weight); a unit too long for the budget keeps
  the logits of as many of its last tokens as fit and recomputes the chunks before them (between
  ``6`` and ``8*N*H*V``). An objective that is not pair-local (TRL's ``aot``: it sorts across the
  batch) is one group of every unit. The token metrics come from its log-prob pass.

The token metrics are by-products of the row pass that forms the log-softmax (``ChunkStats``'s
``with_metrics`` fields): asking for them adds no product and no pass over the vocabulary.

Gradient precision: each chunk's ``dL/dz`` is rounded to the compute dtype (bf16 for bf16 inputs)
and the two products accumulate in float32 inside the matmul; ``dL/dh`` rows are written once, and
``dL/dW`` is rounded to the weight's dtype once: a pass of several chunks sums a 16-bit weight's
gradient in a float32 ``(V, H)`` buffer (``4*V*H`` bytes more for the pass, as TRL's fused head
does), since a 16-bit running sum rounded once per chunk would grow its error with the number of
chunks (measured in tests/kernels/test_bf16_accuracy.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from . import objectives, vocab_parallel
from .backends import Chunk, ChunkStats, HeadSpec, accumulate_dtype, torch_chunked
from .vocab_parallel import VocabShard

# Default scratch budget for one chunk, by device type. On CPU, 64 MiB keeps the float32 logits of
# a pair of 256-token completions at V = 32000 between the passes of the fused DPO loss (a third
# less product work than recomputing them; measured in csrc/README.md); on a GPU a larger chunk
# means fewer dL/dW accumulations.
DEFAULT_SCRATCH_MIB = {"cuda": 1024, "cpu": 64}
_FALLBACK_SCRATCH_MIB = 256


def scratch_bytes(device: torch.device, scratch_mib: float | None) -> int:
    """The chunk scratch budget in bytes: ``scratch_mib`` (checked by ``validate.check_scratch_mib``) or the
    device's default."""
    if scratch_mib is None:
        scratch_mib = DEFAULT_SCRATCH_MIB.get(device.type, _FALLBACK_SCRATCH_MIB)
    return int(scratch_mib * 2**20)


@dataclass(frozen=True)
class GradsNeeded:
    hidden: bool
    weight: bool
    bias: bool


def _rows_per_chunk(backend: ModuleType, vocab: int, dtype: torch.dtype, keep_logits: bool, budget: int) -> int:
    return max(1, budget // (vocab * backend.scratch_bytes_per_logit(keep_logits, dtype)))


def _on_shard(backend: ModuleType, weight: torch.Tensor, shard: VocabShard | None) -> tuple[object, int]:
    """The backend a pass runs and the vocabulary its chunks are sized for: ``weight``'s rows, or for a
    vocabulary-parallel head (``shard``) the backend on this rank's columns with the group's statistics
    (``vocab_parallel.ShardedBackend``) and ``ceil(V / tp)`` rows on every rank, so that every rank runs the same
    chunks and makes the same collective calls."""
    if shard is None:
        return backend, weight.shape[0]
    return vocab_parallel.ShardedBackend(backend, shard), shard.rows_per_rank


def _valid_rows(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = (labels != ignore_index).nonzero().squeeze(1)
    return rows, labels.index_select(0, rows)


class _TokenMetrics:
    """Per-token entropy, mean logit, top-1 flag and ``log sum_v p_v^2`` (``ChunkStats``'s metrics), filled
    chunk by chunk.

    ``entropy``, ``mean_logit``, ``log_sum_sq_probs``: (N,) in the accumulate dtype; ``is_top1``: (N,) bool;
    0 (False) at ignored tokens; each (0,) when the metrics were not asked for.
    """

    def __init__(self, num_tokens: int, hidden: torch.Tensor, wanted: bool):
        size, acc = (num_tokens if wanted else 0), accumulate_dtype(hidden.dtype)
        self.wanted = wanted
        self.entropy = hidden.new_zeros(size, dtype=acc)
        self.mean_logit = hidden.new_zeros(size, dtype=acc)
        self.is_top1 = hidden.new_zeros(size, dtype=torch.bool)
        self.log_sum_sq_probs = hidden.new_zeros(size, dtype=acc)

    def store(self, rows: torch.Tensor, stats: ChunkStats) -> None:
        if self.wanted:
            self.entropy.index_copy_(0, rows, stats.entropy)
            self.mean_logit.index_copy_(0, rows, stats.mean_logit)
            self.is_top1.index_copy_(0, rows, stats.is_top1)
            self.log_sum_sq_probs.index_copy_(0, rows, stats.log_sum_sq_probs)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.entropy, self.mean_logit, self.is_top1, self.log_sum_sq_probs


def token_forward(
    backend: ModuleType,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    head: HeadSpec,
    ignore_index: int,
    with_metrics: bool,
    budget: int,
    shard: VocabShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Per-token log-probs, logsumexps and token metrics.

    Args:
        hidden: (N, H); weight: (V, H); bias: (V,) or None; labels: (N,) int64.
        shard: for a vocabulary-parallel head, this rank's rows (weight (rows, H), bias (rows,)); the results are
            the whole vocabulary's, the same on every rank of its group.
    Returns:
        logp (N,); the normalizer (2, N): each token's ``max_logit`` and ``log_sum_exp`` (see
        ``ChunkStats``); and the metrics (entropy, mean_logit, is_top1, log_sum_sq_probs), each (N,) when
        asked for, (0,) otherwise. Float32 (float64 for float64 inputs), 0 at ignored tokens.
    """
    num_tokens = labels.shape[0]
    backend, vocab = _on_shard(backend, weight, shard)
    acc = accumulate_dtype(hidden.dtype)
    rows, targets = _valid_rows(labels, ignore_index)
    logp = hidden.new_zeros(num_tokens, dtype=acc)
    normalizer = hidden.new_zeros((2, num_tokens), dtype=acc)
    metrics = _TokenMetrics(num_tokens, hidden, with_metrics)
    step = _rows_per_chunk(backend, vocab, hidden.dtype, False, budget)
    if shard is not None:
        vocab_parallel.check_same_tokens(shard, hidden, labels, ignore_index, step=step, with_metrics=with_metrics,
                                         accumulate_bytes=acc.itemsize)  # fmt: skip
    for start in range(0, rows.shape[0], step):
        chunk_rows, chunk_targets = rows[start : start + step], targets[start : start + step]
        stats = backend.logits_stats(Chunk(hidden, weight, bias, chunk_rows, chunk_targets, head), with_metrics, False)
        _store(logp, normalizer, chunk_rows, stats)
        metrics.store(chunk_rows, stats)
    return logp, normalizer, metrics.tensors()


def _store(logp: torch.Tensor | None, normalizer: torch.Tensor, rows: torch.Tensor, stats: ChunkStats) -> None:
    if logp is not None:
        logp.index_copy_(0, rows, stats.logp)
    normalizer[0].index_copy_(0, rows, stats.max_logit)
    normalizer[1].index_copy_(0, rows, stats.log_sum_exp)


def _saved_stats(normalizer: torch.Tensor, rows: torch.Tensor) -> ChunkStats:
    return ChunkStats(normalizer[0].index_select(0, rows), normalizer[1].index_select(0, rows))


class _GradAccumulator:
    """Owns ``dL/dh``, ``dL/dW``, ``dL/db`` and adds one chunk's ``dL/dx`` products to them.

    ``dL/db`` is summed in the accumulate dtype, and so is ``dL/dW`` when the pass has more than
    one chunk (``one_chunk=False``); both are rounded to their parameter's dtype once, in ``results``.
    """

    def __init__(
        self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, needs: GradsNeeded,
        one_chunk: bool, shard: VocabShard | None = None,
    ):  # fmt: skip
        self.hidden, self.weight, self.shard = hidden, weight, shard
        acc = accumulate_dtype(hidden.dtype)
        self.grad_hidden = torch.zeros_like(hidden) if needs.hidden else None
        weight_sum_dtype = weight.dtype if one_chunk else acc
        self.grad_weight = torch.zeros_like(weight, dtype=weight_sum_dtype) if needs.weight else None
        self.grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=hidden.device) if needs.bias else None

    def add(self, rows: torch.Tensor, grad_logits: torch.Tensor) -> None:
        """``grad_logits``: (C, V) ``dL/dx`` for the tokens ``rows``, in the compute dtype."""
        if self.grad_hidden is not None:
            self.grad_hidden.index_copy_(0, rows, grad_logits @ self.weight)
        if self.grad_weight is not None:
            hidden_rows = self.hidden.index_select(0, rows)
            if self.grad_weight.dtype == grad_logits.dtype:
                self.grad_weight.addmm_(grad_logits.t(), hidden_rows)
            else:
                torch_chunked.addmm_wide(self.grad_weight, grad_logits.t(), hidden_rows)
        if self.grad_bias is not None:
            self.grad_bias += grad_logits.sum(0, dtype=self.grad_bias.dtype)

    def results(self, bias: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """(dL/dh, dL/dW, dL/db); for a vocabulary-parallel head ``dL/dh`` summed over the group (the shard's
        ``dL/dW`` and ``dL/db`` are this rank's alone)."""
        if self.shard is not None and self.grad_hidden is not None:
            vocab_parallel.all_reduce_sum(self.grad_hidden, self.shard)
        grad_weight = None if self.grad_weight is None else self.grad_weight.to(self.weight.dtype)
        grad_bias = None if self.grad_bias is None else self.grad_bias.to(bias.dtype)
        return self.grad_hidden, grad_weight, grad_bias


def token_backward(
    backend: ModuleType,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    normalizer: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    head: HeadSpec,
    ignore_index: int,
    needs: GradsNeeded,
    budget: int,
    shard: VocabShard | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``sum(grad_logp * logp + grad_entropy * entropy)``, recomputing the logits.

    Args:
        normalizer (2, N), entropy (N,): as returned by ``token_forward``; grad_logp, grad_entropy: (N,).
        shard: as ``token_forward``'s; dL/dhidden is then summed over the group, dL/dweight and dL/dbias are the
            shard's rows.
    Returns:
        (dL/dhidden (N, H), dL/dweight (V, H), dL/dbias (V,)), each None when not needed.
    """
    rows, targets = _valid_rows(labels, ignore_index)
    acc = normalizer.dtype
    mean_shifted = None if grad_entropy is None else normalizer[1] - entropy
    backend, vocab = _on_shard(backend, weight, shard)
    step = _rows_per_chunk(backend, vocab, hidden.dtype, False, budget)
    if shard is not None:
        vocab_parallel.check_same_tokens(shard, hidden, labels, ignore_index, step=step, need_hidden=needs.hidden)
    grads = _GradAccumulator(hidden, weight, bias, needs, one_chunk=rows.shape[0] <= step, shard=shard)
    for start in range(0, rows.shape[0], step):
        chunk_rows, chunk_targets = rows[start : start + step], targets[start : start + step]
        stats = _saved_stats(normalizer, chunk_rows)
        if mean_shifted is not None:
            stats.mean_shifted = mean_shifted.index_select(0, chunk_rows)
        chunk_grad_entropy = None if grad_entropy is None else grad_entropy.index_select(0, chunk_rows).to(acc)
        chunk = Chunk(hidden, weight, bias, chunk_rows, chunk_targets, head)
        grad_logits = backend.logits_grad(chunk, stats, grad_logp.index_select(0, chunk_rows).to(acc),
                                          chunk_grad_entropy)  # fmt: skip
        grads.add(chunk_rows, grad_logits)
        del grad_logits  # freed before the next chunk's is formed: one (C, V) dL/dx at a time
    return grads.results(bias)


def _unit_groups(tokens_per_unit: list[int], cap: int) -> list[tuple[int, int, int, int]]:
    """Greedy groups of consecutive units whose tokens fit ``cap``: (first unit, end unit, first token, end token).

    A unit with more than ``cap`` tokens forms a group of its own.
    """
    groups, unit_start, token_start, tokens = [], 0, 0, 0
    for unit, count in enumerate(tokens_per_unit):
        if tokens and tokens + count > cap:
            groups.append((unit_start, unit, token_start, token_start + tokens))
            unit_start, token_start, tokens = unit, token_start + tokens, 0
        tokens += count
    groups.append((unit_start, len(tokens_per_unit), token_start, token_start + tokens))
    return groups


def _sums(hidden: torch.Tensor, num_sequences: int) -> torch.Tensor:
    return hidden.new_zeros(num_sequences, dtype=torch.float64)


def _select_weights(weights: objectives.TokenWeights, rows: torch.Tensor) -> objectives.TokenWeights:
    """The weights of the tokens ``rows`` (C,), in that order."""
    return objectives.TokenWeights(
        logps=weights.logps.index_select(0, rows),
        nll=None if weights.nll is None else weights.nll.index_select(0, rows),
        completion=weights.completion.index_select(0, rows),
    )


def _slice_weights(weights: objectives.TokenWeights, start: int, end: int) -> objectives.TokenWeights:
    return objectives.TokenWeights(
        logps=weights.logps[start:end],
        nll=None if weights.nll is None else weights.nll[start:end],
        completion=weights.completion[start:end],
    )


def preference_forward_with_grads(
    backend: ModuleType,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    segment_ids: torch.Tensor,
    weights: objectives.TokenWeights,
    ref_logps: torch.Tensor | None,
    desirable: torch.Tensor | None,
    batch: objectives.BatchConstants,
    objective: objectives.Objective,
    head: HeadSpec,
    ignore_index: int,
    needs: GradsNeeded,
    with_metrics: bool,
    budget: int,
    shard: VocabShard | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor | None], torch.Tensor, tuple[torch.Tensor, ...],
           tuple[torch.Tensor | None, ...]]:  # fmt: skip
    """A preference objective's loss and, in the same pass, its gradients for hidden, weight and bias.

    Args:
        hidden: (N, H); labels: (N,), the target of every token of a sum (completion or NLL token),
            ``ignore_index`` elsewhere; segment_ids: (N,) in [0, S), S = 2 * ``batch.num_units`` sequences for a
            paired objective (rows [0, P) chosen, [P, 2P) rejected), ``batch.num_units`` for an unpaired one.
        weights: ``objectives.TokenWeights`` of the N tokens (0 where the label is ``ignore_index``).
        ref_logps: (S,) summed reference log-probs (same weights), or None for 0; desirable: (S,) bool or None.
        batch: ``objectives.BatchConstants`` (``num_units``, ``nll_tokens``, ``kl``).
        with_metrics: also form the token metrics, in the log-prob pass.
        shard: as ``token_forward``'s; the loss, sums and metrics are the whole vocabulary's (the same on every rank
            of the group), dL/dhidden is summed over the group, dL/dweight and dL/dbias are the shard's rows.
    Returns:
        loss: () the objective (the sum of each group's share); (logps, nll_logps): (S,) float64 sums
        ``sum_t w[t] logp[t]`` and ``sum_t m[t] logp[t]`` (None without an NLL term); normalizer: (2, N) and
        metrics as ``token_forward``'s; grads: (dL/dhidden, dL/dweight, dL/dbias) for a unit upstream
        gradient, None where not needed.
    """
    num_units = batch.num_units
    backend, vocab = _on_shard(backend, weight, shard)
    num_seq = 2 * num_units if objective.paired else num_units
    acc = accumulate_dtype(hidden.dtype)
    rows, targets = _valid_rows(labels, ignore_index)
    seq_of_row = segment_ids.index_select(0, rows)
    # a unit: pair p holds sequences p and P + p; an unpaired sequence is its own unit
    unit_of_row = seq_of_row % num_units
    order = torch.argsort(unit_of_row, stable=True)
    rows, targets, seq_of_row, unit_of_row = rows[order], targets[order], seq_of_row[order], unit_of_row[order]
    row_weights = _select_weights(weights, rows)
    tokens_per_unit = torch.bincount(unit_of_row, minlength=num_units).tolist()

    wpo = objective.needs.wpo
    logps, nll_logps = _sums(hidden, num_seq), None if weights.nll is None else _sums(hidden, num_seq)
    grad_logps, grad_nll = _sums(hidden, num_seq), None if weights.nll is None else _sums(hidden, num_seq)
    normalizer = hidden.new_zeros((2, labels.shape[0]), dtype=acc)
    metrics = _TokenMetrics(labels.shape[0], hidden, with_metrics)
    keep_cap = _rows_per_chunk(backend, vocab, hidden.dtype, True, budget)
    step = _rows_per_chunk(backend, vocab, hidden.dtype, False, budget)
    if shard is not None:
        vocab_parallel.check_same_tokens(
            shard, hidden, labels, ignore_index, segment_ids, step=step, keep_cap=keep_cap, num_units=num_units,
            local=objective.local, with_metrics=with_metrics or wpo, need_hidden=needs.hidden,
            accumulate_bytes=acc.itemsize,
        )  # fmt: skip
    # all valid tokens within keep_cap: one group of one chunk
    grads = _GradAccumulator(hidden, weight, bias, needs, one_chunk=rows.shape[0] <= keep_cap, shard=shard)
    groups = _unit_groups(tokens_per_unit, keep_cap) if objective.local else [(0, num_units, 0, rows.shape[0])]
    loss = hidden.new_zeros((), dtype=torch.float64)

    for unit_start, unit_end, token_start, token_end in groups:
        # the group's last ``keep_cap`` tokens keep their logits for the gradient pass; a unit too long for
        # that recomputes only the chunks before them
        kept_start = max(token_start, token_end - keep_cap)
        chunks = [(start, min(start + step, kept_start)) for start in range(token_start, kept_start, step)]
        chunks.append((kept_start, token_end))
        chunk_stats, group_logp, group_log_sum_sq_probs = [], [], []
        for start, end in chunks:
            chunk = Chunk(hidden, weight, bias, rows[start:end], targets[start:end], head)
            stats = backend.logits_stats(chunk, with_metrics or wpo, end == token_end)
            group_logp.append(stats.logp)
            group_log_sum_sq_probs.append(stats.log_sum_sq_probs)
            _store(None, normalizer, rows[start:end], stats)
            metrics.store(rows[start:end], stats)
            chunk_stats.append(ChunkStats(stats.max_logit, stats.log_sum_exp, logits=stats.logits))
        del stats  # the kept logits are held by chunk_stats alone, and go as soon as they are used

        # the group's sequences are whole: their sums, from the contract's own function, are final
        group = objectives.sequence_inputs(
            torch.cat(group_logp), seq_of_row[token_start:token_end], num_seq,
            _slice_weights(row_weights, token_start, token_end), ref_logps=ref_logps,
            log_sum_sq_probs=torch.cat(group_log_sum_sq_probs) if wpo else None, desirable=desirable,
        )  # fmt: skip
        seqs = torch.arange(unit_start, unit_end, device=hidden.device)
        if objective.paired:
            seqs = torch.cat([seqs, seqs + num_units])
        value = objective.evaluate(_select_sequences(group, seqs), batch)
        loss = loss + value.loss
        logps += group.logps.detach()
        grad_logps.index_copy_(0, seqs, value.grad_logps)
        if nll_logps is not None:
            nll_logps += group.nll_logps.detach()
            grad_nll.index_copy_(0, seqs, value.grad_nll_logps)
        group_grads = objectives.ObjectiveValue(loss=value.loss, grad_logps=grad_logps, grad_nll_logps=grad_nll)

        for start, end in reversed(chunks):  # the kept chunk first: its logits go before any recompute
            chunk_weights = _slice_weights(row_weights, start, end)
            grad_logp = objectives.token_grads(group_grads, seq_of_row[start:end], chunk_weights)
            chunk = Chunk(hidden, weight, bias, rows[start:end], targets[start:end], head)
            grad_logits = backend.logits_grad(chunk, chunk_stats.pop(), grad_logp.to(acc), None)
            grads.add(rows[start:end], grad_logits)
            del grad_logits  # freed before the next chunk's is formed: one (C, V) dL/dx at a time

    return loss.to(acc), (logps, nll_logps), normalizer, metrics.tensors(), grads.results(bias)


def _select_sequences(seqs: objectives.SequenceInputs, index: torch.Tensor) -> objectives.SequenceInputs:
    """The sequences ``index`` of ``seqs``."""
    return objectives.SequenceInputs(
        **{name: None if value is None else value.index_select(0, index) for name, value in vars(seqs).items()}
    )
