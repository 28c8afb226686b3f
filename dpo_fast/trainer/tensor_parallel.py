"""``tensor_parallel: N``: the LM head split over the vocabulary across groups of N processes, nothing else sharded.

The run's P processes form a ``(P / N, N)`` device mesh: ``P / N`` data-parallel replicas (``dp``) of N
tensor-parallel processes each (``tp``, consecutive ranks). Within a replica every process runs the whole backbone
on the same micro-batch; the head's weight (and a tied input embedding, the same parameter) is a ``DTensor`` placed
``Shard(0)`` on the replica's ``tp`` mesh (torch's ``ColwiseParallel`` on ``lm_head``, ``RowwiseParallel`` on a tied
embedding: a masked lookup summed over the processes), so each process holds ``ceil(V / N)`` rows of the weight, of
its gradient and of its AdamW state. The fused loss runs on each process's rows (``dpo_fast.vocab_parallel``) and sums
``dL/dh`` over the replica, so the backbone's gradients are the same on every process of a replica. The model is
prepared without a data-parallel wrapper; after a step's last micro-batch ``average_gradients`` averages every
gradient (the backbone's, and each process's rows of the head) over the replicas, the all-reduce DDP would make.
The data is sharded over the replicas (``DataParallelView``), so a run of ``P / N`` replicas matches a data-parallel
run on ``P / N`` processes, and one of one replica a run on one process, with the same
``per_device_train_batch_size``.

Not supported: FSDP or DeepSpeed with it.
"""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ..integrations import hf
from ..vocab_parallel import shard_of

BUCKET_NUMEL = 1 << 25  # gradient elements per all-reduce over the replicas (128 MiB of float32; DDP's are 25 MiB)


class TensorParallel:
    """The run's ``(dp, tp)`` device mesh: ``dp`` data-parallel replicas of ``tp`` processes that split the head.

    Attributes:
        mesh: this process's tensor-parallel group, a 1-D mesh of ``tp`` processes (the head's rows are split over it).
        replicas: the 1-D mesh of the ``dp`` processes, one per replica, that hold the same rows as this one.
    """

    def __init__(self, mesh: DeviceMesh):
        self.mesh, self.replicas = mesh["tp"], mesh["dp"]

    @property
    def size(self) -> int:
        """Processes in a tensor-parallel group."""
        return self.mesh.size()

    @property
    def num_replicas(self) -> int:
        return self.replicas.size()

    @classmethod
    def setup(cls, cfg, accelerator: Accelerator) -> TensorParallel | None:
        """The mesh of ``cfg.tensor_parallel`` processes per replica, or None for 1; a ``ValueError`` where it
        cannot run."""
        size, processes = cfg.tensor_parallel, accelerator.num_processes
        if size == 1:
            return None
        if processes % size:
            raise ValueError(
                f"tensor_parallel={size} but the run has {processes} processes: tensor_parallel splits the LM head "
                f"over groups of {size} processes (each group takes the same batches, the groups different ones); "
                f"launch a multiple of {size} processes"
            )
        if accelerator.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
            raise ValueError(
                f"tensor_parallel runs on plain multi-process launches (MULTI_CPU, MULTI_GPU), not under "
                f"{accelerator.distributed_type.value}: launch without FSDP or DeepSpeed"
            )
        shape = (processes // size, size)
        return cls(init_device_mesh(accelerator.device.type, shape, mesh_dim_names=("dp", "tp")))

    def shard_head(self, model: torch.nn.Module, hf_model: torch.nn.Module, device: torch.device) -> None:
        """Move ``model`` to ``device`` and split ``hf_model``'s LM head over the vocabulary, in place.

        The head's weight (and bias) becomes a ``Shard(0)`` DTensor parameter (its module's own forward gathers the
        logits, as ``ColwiseParallel(output_layouts=Replicate())`` does); a tied input embedding is sharded the same
        way (``RowwiseParallel``) and the tie kept. Call it before the optimizer is made.

        Args:
            model: the module that holds ``hf_model`` (``DPOModel``); hf_model: the causal LM (inside PEFT's wrapper).
        """
        model.to(device)
        head, embedding = hf_model.get_output_embeddings(), hf_model.get_input_embeddings()
        tied = embedding is not None and head.weight is embedding.weight
        if tied:
            parallelize_module(embedding, self.mesh, RowwiseParallel(input_layouts=Replicate(),
                                                                     output_layouts=Replicate()))  # fmt: skip
        parallelize_module(head, self.mesh, ColwiseParallel(output_layouts=Replicate()))
        if tied:
            head.weight = embedding.weight
        shard_of(head.weight, getattr(head, "bias", None))  # the layout dpo_fast reads, checked once here

    def prepare(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """``accelerator.prepare`` without a data-parallel wrapper: the model gets accelerate's mixed precision (its
        ``evaluation_mode`` skips DDP), the optimizer accelerate's wrapper."""
        return accelerator.prepare_model(model, evaluation_mode=True), accelerator.prepare_optimizer(optimizer)

    def average_gradients(self, parameters) -> None:
        """Average every gradient over the replicas, in place: a plain gradient as it is, a DTensor's local rows
        (each replica's process holds the same rows). Gradients of one dtype and device go in buckets of about
        ``BUCKET_NUMEL`` elements, one all-reduce each, as DDP's (the copy a bucket makes stays that small).
        Nothing with one replica."""
        if self.num_replicas == 1:
            return
        buckets: dict[tuple, list[torch.Tensor]] = {}
        numels: dict[tuple, int] = {}
        for param in parameters:
            if param.grad is None:
                continue
            local = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
            key = (local.dtype, local.device)
            buckets.setdefault(key, []).append(local)
            numels[key] = numels.get(key, 0) + local.numel()
            if numels[key] >= BUCKET_NUMEL:
                self._average(buckets.pop(key))
                del numels[key]
        for bucket in buckets.values():
            self._average(bucket)

    def _average(self, grads: list[torch.Tensor]) -> None:
        flat = torch.cat([grad.reshape(-1) for grad in grads])
        torch.distributed.all_reduce(flat, group=self.replicas.get_group())
        flat.div_(self.num_replicas)
        for grad, averaged in zip(grads, flat.split([grad.numel() for grad in grads])):
            grad.copy_(averaged.view_as(grad))

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over plain and DTensor gradients alike (torch's refuses the mix): the
        global 2-norm (a DTensor's over all its shards), and every gradient scaled by ``max_norm / (norm + 1e-6)``
        when that is below 1. Returns the norm before clipping, a plain () tensor."""
        grads = [p.grad for p in parameters if p.grad is not None]
        if not grads:
            return torch.zeros(())
        norms = []
        for grad in grads:
            norm = torch.linalg.vector_norm(grad)
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        total = torch.linalg.vector_norm(torch.stack([norm.to(norms[0].device) for norm in norms]))
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for grad in grads:
            local = grad.to_local() if isinstance(grad, DTensor) else grad
            local.mul_(scale.to(local.device, local.dtype))
        return total

    def describe(self, accelerator: Accelerator, hf_model: torch.nn.Module) -> str:
        """One line: the group and this process's rows of the head, as the fused loss reads them
        (``hf.lm_head_of``)."""
        head = hf.lm_head_of(hf_model)
        shard, weight = head.shard, hf_model.get_output_embeddings().weight
        if shard is None:
            raise RuntimeError("tensor_parallel: the fused loss would read the LM head whole, not this process's rows")
        embedding = hf_model.get_input_embeddings()
        tied = " (the tied input embedding with it)" if embedding is not None and embedding.weight is weight else ""
        backend = torch.distributed.get_backend()
        replicas = (
            "; the backbone replicated, no data-parallel wrapper" if self.num_replicas == 1 else
            f"; {self.num_replicas} data-parallel replicas of {self.size} processes, the backbone replicated, "
            "gradients averaged over the replicas at each step's last micro-batch (no data-parallel wrapper)"
        )  # fmt: skip
        return (
            f"parallelism: tensor parallel over {self.size} processes on {accelerator.device.type} ({backend}): "
            f"lm_head.weight split over the vocabulary, {shard.rows} of {shard.vocab} rows on this process "
            f"(at most {math.ceil(shard.vocab / self.size)}){tied}{replicas}"
        )


class DataParallelView:
    """The accelerator as the data sees it: ``num_processes`` and ``process_index`` count data-parallel replicas
    (``tp.replicas``: every process of a tensor-parallel group takes the same batches), and ``reduce`` combines over
    them; everything else is the accelerator's."""

    def __init__(self, accelerator: Accelerator, tp: TensorParallel):
        self._accelerator, self._replicas = accelerator, tp.replicas

    def __getattr__(self, name: str):
        return getattr(self._accelerator, name)

    @property
    def num_processes(self) -> int:
        return self._replicas.size()

    @property
    def process_index(self) -> int:
        return self._replicas.get_local_rank()

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum", scale: float = 1.0) -> torch.Tensor:
        """``reduction`` ("sum" or "mean") of ``tensor`` over the replicas, times ``scale``, as ``Accelerator.reduce``
        (every process of a replica holds the same value, so summing over all processes would count it N times)."""
        if reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
        combined = tensor.clone()
        if self.num_processes > 1:
            torch.distributed.all_reduce(combined, group=self._replicas.get_group())
            if reduction == "mean":
                combined /= self.num_processes
        return combined * scale if scale != 1.0 else combined


def data_view(accelerator: Accelerator, tp: TensorParallel | None):
    """What the loop shards data and reduces metrics with: the accelerator itself, or under ``tensor_parallel`` its
    ``DataParallelView``."""
    return accelerator if tp is None else DataParallelView(accelerator, tp)
