"""The LM head sharded over the vocabulary across a tensor-parallel group: no rank forms more than its own columns.

A tensor-parallel model holds its LM head as a ``torch.distributed.tensor.DTensor`` weight ``(V, H)`` placed
``Shard(0)`` on a 1-D device mesh (what ``ColwiseParallel`` on ``lm_head`` and transformers' ``tp_plan`` produce):
rank ``r`` of ``tp`` holds rows ``[r * ceil(V/tp), (r + 1) * ceil(V/tp))`` clipped to ``V`` (``torch.chunk``'s
split: the last ranks hold fewer rows, possibly none). ``shard_of`` reads that layout (the process group, the
vocabulary offset, the rows held here) from the DTensor; ``local_operands`` hands the local rows to the kernels
(``DTensor.to_local``, differentiable: the local gradient comes back as the DTensor's ``Shard(0)`` gradient).

Every rank of the group sees the same tokens (hidden states and labels) and runs the same loop over chunks of
them (``dpo_fast.chunking``), chunk sizes reckoned for ``ceil(V/tp)`` rows whatever its own count, so that every
rank makes the same collective calls. Per chunk, ``ShardedBackend`` runs the backend's row pass on the local
columns and combines the per-token statistics (``backends.ChunkStats``) across the group with two all-reduces of
``O(C)`` floats (``combine``): a MAX of the row maxima, then one SUM of the sums of exponentials rescaled to the
global maximum, the target logit from the rank that owns the target (NaN where none does), and, with metrics, the
pieces of the mean logit, ``E_p[z]`` and ``sum_v p_v^2``. The combined statistics are what an unsharded backend
returns; from them every rank evaluates the objective on the same sums, so the per-token gradients ``dL/dlogp``
are identical everywhere without more communication. ``dL/dx`` is formed on the local columns; ``dL/dW`` and
``dL/db`` are the local shard's; ``dL/dh`` is summed across the group once per pass (``all_reduce_sum``).

The backends (``backends.contract``) know nothing of this: a token whose target lives on another rank is given
column 0 as its (local, valid) target; its target logit is ignored in the combine, and the one-hot term that
``logits_grad`` adds at column 0 for it is replaced by the exact value of that column's gradient, recomputed from
``z_0`` (kept, or ``h . W_0 + b_0``) and the combined statistics (``ShardedBackend.logits_grad``). A rank that
holds no row calls no backend and contributes nothing but its share of the collectives.

Before its first collective, every pass checks with one small all-reduce that the ranks hold the same tokens
(counts, label checksums, segment ids, a checksum of the hidden states) and the same loop shape, and raises the
same ``ValueError`` on every rank otherwise: ranks given different tokens get an error, not a hang
(``check_same_tokens``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from .backends import Chunk, ChunkStats, accumulate_dtype, torch_chunked


@dataclass(frozen=True)
class VocabShard:
    """This rank's rows ``[offset, offset + rows)`` of a ``(V, H)`` head split over ``group`` as ``torch.chunk`` splits.

    Attributes:
        group: the tensor-parallel process group (its ranks see the same tokens).
        offset: the global index of the first row held here.
        rows: the rows held here, ``0 <= rows <= rows_per_rank``.
        vocab: V, the rows of the whole head.
    """

    group: dist.ProcessGroup
    offset: int
    rows: int
    vocab: int

    @property
    def ranks(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rows_per_rank(self) -> int:
        """``ceil(V / tp)``: the most rows a rank holds, and what every rank sizes its chunks for."""
        return -(-self.vocab // self.ranks)

    @property
    def group_name(self) -> str:
        return self.group.group_name

    @classmethod
    def from_group_name(cls, group_name: str, vocab: int) -> VocabShard:
        """This rank's shard of a ``vocab``-row head over the process group named ``group_name`` (the custom ops'
        arguments carry the name)."""
        group = dist.distributed_c10d._resolve_process_group(group_name)
        offset, rows = split(vocab, dist.get_world_size(group), dist.get_rank(group))
        return cls(group, offset, rows, vocab)


def split(vocab: int, ranks: int, rank: int) -> tuple[int, int]:
    """(offset, rows) of rank ``rank`` of ``ranks`` in ``torch.chunk``'s split of ``vocab`` rows (DTensor's ``Shard``):
    ``ceil(vocab / ranks)`` rows each, the last ranks fewer or none."""
    per_rank = -(-vocab // ranks)
    offset = min(rank * per_rank, vocab)
    return offset, min(per_rank, vocab - offset)


def shard_of(weight: torch.Tensor, bias: torch.Tensor | None = None) -> VocabShard | None:
    """The vocabulary shard a ``DTensor`` weight ``(V, H)`` places on this rank, or None for a plain (or replicated)
    weight.

    Raises:
        ValueError: a placement other than ``Shard(0)`` or ``Replicate()`` on a 1-D mesh, an uneven layout other than
            ``torch.chunk``'s, or a bias not laid out as the weight (a ``(V,)`` DTensor ``Shard(0)`` on its mesh).
    """
    if not isinstance(weight, DTensor):
        if isinstance(bias, DTensor):
            raise ValueError("bias is a DTensor but weight is not: shard both over the vocabulary, or neither")
        return None
    mesh, placements = weight.device_mesh, tuple(weight.placements)
    if placements == (Replicate(),) * mesh.ndim:
        if isinstance(bias, DTensor) and tuple(bias.placements) != placements:
            raise ValueError(f"bias is placed {bias.placements} but weight is replicated: place them alike")
        return None
    if mesh.ndim != 1 or len(placements) != 1 or type(placements[0]) is not Shard or placements[0].dim != 0:
        raise ValueError(
            f"weight is a DTensor placed {placements} on a {mesh.ndim}-D mesh; dpo_fast takes a head sharded over "
            "the vocabulary, Shard(0) on a 1-D tensor-parallel mesh (ColwiseParallel on lm_head), or a replicated one"
        )
    vocab = weight.shape[0]
    group = mesh.get_group()
    if mesh.get_local_rank() != dist.get_rank(group):
        raise ValueError(
            f"weight's mesh orders its ranks {mesh.mesh.tolist()} unlike its process group (sorted): build the "
            "tensor-parallel mesh over its ranks in increasing order"
        )
    offset, rows = split(vocab, dist.get_world_size(group), dist.get_rank(group))
    with torch.no_grad():
        local_rows = weight.to_local().shape[0]
    if local_rows != rows:
        raise ValueError(
            f"weight's local shard holds {local_rows} rows, but Shard(0) of {vocab} rows over "
            f"{dist.get_world_size(group)} ranks gives rank {dist.get_rank(group)} {rows} (torch.chunk's split): "
            "build the DTensor with distribute_tensor, or from_local with that split"
        )
    if bias is not None:
        if not isinstance(bias, DTensor) or bias.device_mesh != mesh or tuple(bias.placements) != placements:
            raise ValueError(
                "bias must be sharded as weight is (a (V,) DTensor placed Shard(0) on the weight's mesh): "
                f"got {type(bias).__name__}{'' if not isinstance(bias, DTensor) else ' ' + str(bias.placements)}"
            )
        with torch.no_grad():
            bias_rows = bias.to_local().shape[0]
        if bias_rows != rows:
            raise ValueError(f"bias's local shard holds {bias_rows} rows, weight's {rows}")
    return VocabShard(group, offset, rows, vocab)


def local_operands(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The local rows of a DTensor weight and bias (differentiable: ``DTensor.to_local``, whose gradient comes back as
    the DTensor's, placed as it is); plain tensors unchanged."""
    weight = weight.to_local() if isinstance(weight, DTensor) else weight
    bias = bias.to_local() if isinstance(bias, DTensor) else bias
    return weight, bias


def local_hidden(hidden: torch.Tensor) -> torch.Tensor:
    """Hidden states as a plain tensor: a replicated DTensor's local copy (differentiable; its gradient is the
    group's sum, the same on every rank); any other DTensor is refused."""
    if not isinstance(hidden, DTensor):
        return hidden
    if tuple(hidden.placements) != (Replicate(),) * hidden.device_mesh.ndim:
        raise ValueError(
            f"hidden is a DTensor placed {hidden.placements}; the LM head takes the replicated hidden states (every "
            "rank of the tensor-parallel group holds all tokens): redistribute it to Replicate() first"
        )
    return hidden.to_local()


def check_same_tokens(
    shard: VocabShard,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    segment_ids: torch.Tensor | None = None,
    **loop_shape: int,
) -> None:
    """One all-reduce (``O(1)`` floats): the same tokens and the same loop on every rank of ``shard.group``.

    Compared: the token count, the valid-token count, two checksums of the labels (a sum and a position-weighted
    sum), the same of ``segment_ids`` when given, every ``loop_shape`` value (chunk sizes, flags: what decides the
    collectives a pass makes) exactly, and a position-weighted checksum of the valid hidden rows to a relative
    ``1e-3`` (the ranks' copies of the hidden states may differ in rounding, not in tokens).

    Args:
        hidden: (N, H); labels: (N,) int64; segment_ids: (N,) int64 or None.
    Raises:
        ValueError: on every rank alike (they all see the reduced values), naming what differs.
    """
    acc = torch.float64
    valid = labels != ignore_index
    position = (torch.arange(labels.shape[0], device=labels.device) % 1021 + 1).to(acc)
    exact = {"tokens": float(labels.shape[0]), "valid tokens": valid.sum().to(acc)}
    target = torch.where(valid, labels, 0).to(acc)
    exact["label sum"], exact["position-weighted label sum"] = target.sum(), (target * position).sum()
    if segment_ids is not None:
        segment = torch.where(valid, segment_ids, 0).to(acc)
        exact["segment id sum"], exact["position-weighted segment id sum"] = segment.sum(), (segment * position).sum()
    exact.update({name: float(value) for name, value in loop_shape.items()})
    row_sums = torch.where(valid, hidden.sum(-1, dtype=acc), 0).nan_to_num(0.0, 0.0, 0.0)
    close = {"hidden checksum": (row_sums * position).sum()}
    scale = (row_sums.abs() * position).sum()
    # the scale rides along (its maximum), so that every rank judges with the same numbers and raises alike
    values = torch.stack([torch.as_tensor(v, dtype=acc, device=labels.device).reshape(())
                          for v in (*exact.values(), *close.values(), scale)])  # fmt: skip
    both = torch.cat([values, -values])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=shard.group)
    high, low = both[: values.numel()].tolist(), (-both[values.numel() :]).tolist()
    scale = high[-1]
    for index, name in enumerate([*exact, *close]):
        spread = high[index] - low[index]
        allowed = 0.0 if name in exact else 1e-3 * (scale + 1.0)
        if spread > allowed:
            raise ValueError(
                f"vocabulary-parallel LM head: the {shard.ranks} ranks of the tensor-parallel group were given "
                f"different tokens ({name} from {low[index]:g} to {high[index]:g} across the ranks). Every rank of "
                "the group must pass the same hidden states and labels (tensor parallelism shards the head, not the "
                "batch: give each data-parallel replica its own batch, and the same batch to all its tensor-parallel "
                "ranks)"
            )


def all_reduce_sum(tensor: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    """``tensor`` summed over the group, in place; a 16-bit tensor is summed in float32 and rounded once."""
    if tensor.dtype in (torch.float32, torch.float64):
        dist.all_reduce(tensor, group=shard.group)
        return tensor
    wide = tensor.float()
    dist.all_reduce(wide, group=shard.group)
    return tensor.copy_(wide)


@dataclass
class _Targets:
    """A chunk's targets as this rank's backend takes them: ``local`` (C,) in ``[0, rows)``, column 0 for a target
    held elsewhere; ``owned`` (C,) bool, the target is held here; ``anywhere`` (C,) bool, some rank holds it."""

    local: torch.Tensor
    owned: torch.Tensor
    anywhere: torch.Tensor


class ShardedBackend:
    """A chunked backend (``backends.contract``) on this rank's columns, with the combined statistics of the group.

    It has the contract's members, so ``dpo_fast.chunking`` runs its loops over it unchanged: ``logits_stats``
    returns the statistics of the whole vocabulary (the same on every rank), with the kept logits of the local
    columns; ``logits_grad`` returns ``dL/dx`` of the local columns, ``(C, rows)``.
    """

    def __init__(self, backend, shard: VocabShard):
        self.backend, self.shard = backend, shard
        self.NAME = backend.NAME

    def scratch_bytes_per_logit(self, keep_logits: bool, dtype: torch.dtype) -> int:
        return self.backend.scratch_bytes_per_logit(keep_logits, dtype)

    def _targets(self, targets: torch.Tensor) -> _Targets:
        local = targets - self.shard.offset
        owned = (local >= 0) & (local < self.shard.rows)
        anywhere = (targets >= 0) & (targets < self.shard.vocab)
        return _Targets(torch.where(owned, local, 0), owned, anywhere)

    def logits_stats(self, chunk: Chunk, with_metrics: bool, keep_logits: bool) -> ChunkStats:
        """The statistics of the whole vocabulary for the chunk's tokens (``combine``); ``logits``: the local
        columns' ``(C, rows)`` when kept."""
        targets = self._targets(chunk.targets)
        if self.shard.rows == 0:
            local = _empty_stats(chunk, with_metrics, keep_logits)
        else:
            local = self.backend.logits_stats(dataclasses.replace(chunk, targets=targets.local), with_metrics,
                                              keep_logits)  # fmt: skip
        return combine(local, targets.owned, self.shard, with_metrics)

    def logits_grad(self, chunk: Chunk, stats: ChunkStats, grad_logp: torch.Tensor,
                    grad_entropy: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
        """``dL/dx`` of the local columns, ``(C, rows)`` in the compute dtype, from the combined ``stats``."""
        if self.shard.rows == 0:
            if stats.logits is not None:
                stats.logits = None
            return chunk.hidden.new_empty((chunk.rows.shape[0], 0))
        targets = self._targets(chunk.targets)
        # z_0 before the backend consumes the kept logits (the C++ kernel writes dL/dx over them)
        z0 = stats.logits[:, 0].clone() if stats.logits is not None else _column0_logits(chunk)
        grad = self.backend.logits_grad(dataclasses.replace(chunk, targets=targets.local), stats, grad_logp,
                                        grad_entropy)  # fmt: skip
        column0 = _column0_grad(z0, stats, grad_logp, grad_entropy, chunk.head)
        # a target held nowhere (outside [0, V): only possible under torch.compile) gives a NaN gradient, as an
        # unsharded backend's; its NaN reaches dL/dh through column 0 and the all-reduce
        column0 = torch.where(targets.anywhere, column0, float("nan"))
        grad[:, 0] = torch.where(targets.owned, grad[:, 0], column0.to(grad.dtype))
        return grad


def _empty_stats(chunk: Chunk, with_metrics: bool, keep_logits: bool) -> ChunkStats:
    """What a rank with no column contributes: no probability (max -inf), no target, no metric mass."""
    size, acc = chunk.rows.shape[0], accumulate_dtype(chunk.hidden.dtype)

    def full(value: float) -> torch.Tensor:
        return chunk.hidden.new_full((size,), value, dtype=acc)

    metrics = (full(0.0), full(0.0), full(0.0)) if with_metrics else (None, None, None)
    logits = chunk.hidden.new_empty((size, 0), dtype=acc) if keep_logits else None
    return ChunkStats(full(float("-inf")), full(0.0), full(float("nan")), *metrics, logits)


def combine(local: ChunkStats, owned: torch.Tensor, shard: VocabShard, with_metrics: bool) -> ChunkStats:
    """The statistics of the whole vocabulary from each rank's statistics of its columns: two all-reduces of
    ``O(C)`` floats.

    With ``m_r``, ``a_r`` = ``max_logit``, ``log_sum_exp`` of rank r's columns and ``M = max_r m_r``:
    ``s_r = exp(a_r + m_r - M)`` (0 for a rank whose row is all ``-inf`` or that holds no column), ``sum_exp =
    sum_r s_r``, ``log_sum_exp = log sum_exp``; ``target_logit`` is the owner's (NaN where no rank owns the target);
    ``mean_logit = sum_r rows_r * mean_r / V``; ``E_p[z] - M = sum_r s_r (E_{p_r}[z] - m_r + m_r - M) / sum_exp``;
    ``sum_v p_v^2 = sum_r s_r^2 exp(log_sum_sq_probs_r) / sum_exp^2``. A NaN or ``+inf`` logit on any rank makes the
    token's statistics NaN, as on one rank.

    Args:
        local: this rank's ``ChunkStats`` of its columns (C tokens); its kept logits pass through.
        owned: (C,) bool, the token's target is one of this rank's columns.
    Returns:
        the combined ``ChunkStats`` (the same on every rank), ``logits`` the local ones.
    """
    group = shard.group
    max_logit = local.max_logit.clone()
    dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=group)
    # the ranks whose columns take no probability: exp(-inf) terms, written as 0 rather than 0 * inf or NaN
    empty = local.max_logit == float("-inf")
    shift = local.max_logit - max_logit
    sum_exp = torch.where(empty, 0.0, torch.exp(local.log_sum_exp + shift))
    parts = [sum_exp, torch.where(owned, local.target_logit, 0.0), owned.to(sum_exp.dtype)]
    if with_metrics:
        # a rank whose columns are all -inf adds -inf to the sum of the logits (0 if it holds none)
        parts.append(torch.where(empty, float("-inf") if shard.rows else 0.0, local.mean_logit * float(shard.rows)))
        parts.append(torch.where(empty, 0.0, sum_exp * (local.mean_shifted + shift)))
        parts.append(torch.where(empty, 0.0, torch.exp(local.log_sum_sq_probs + 2 * (local.log_sum_exp + shift))))
    sums = torch.stack(parts)
    dist.all_reduce(sums, group=group)
    total = sums[0]
    target_logit = torch.where(sums[2] > 0, sums[1], float("nan"))
    out = ChunkStats(max_logit, torch.log(total), target_logit, logits=local.logits)
    if with_metrics:
        out.mean_logit = sums[3] / shard.vocab
        out.mean_shifted = sums[4] / total
        out.log_sum_sq_probs = torch.log(sums[5]) - 2 * torch.log(total)
    return out


def _column0_logits(chunk: Chunk) -> torch.Tensor:
    """(C,) ``z_0`` of the chunk's tokens (``h W_0^T + b_0`` through the head, in the accumulate dtype): ``O(C*H)``."""
    bias = None if chunk.bias is None else chunk.bias[:1]
    return torch_chunked.logits(chunk.hidden.index_select(0, chunk.rows), chunk.weight[:1], bias, chunk.head)[:, 0]


def _column0_grad(z0: torch.Tensor, stats: ChunkStats, grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None,
                  head) -> torch.Tensor:  # fmt: skip
    """(C,) ``dL/dx_0`` of tokens whose target is not column 0: ``-p_0 (a + e (z_0 - E_p[z]))`` through the head's
    chain rule, in the accumulate dtype; 0 where ``p_0`` is 0 (a ``-inf`` logit)."""
    shifted = z0 - stats.max_logit
    prob = torch.exp(shifted - stats.log_sum_exp)
    weight = grad_logp if grad_entropy is None else grad_logp + grad_entropy * (shifted - stats.mean_shifted)
    grad = torch.where(prob == 0, 0.0, -prob * weight)
    if head.softcap is not None:
        grad = grad * (1 - (z0 * (head.temperature / head.softcap)) ** 2)
    if head.temperature != 1.0:
        grad = grad / head.temperature
    return grad
