"""``tensor_parallel: N``: the LM head split over the vocabulary across the run's N processes, nothing else sharded.

Pure tensor parallelism of the head. Every process runs the whole backbone on the same micro-batch; the head's
weight (and a tied input embedding, the same parameter) is a ``DTensor`` placed ``Shard(0)`` on a 1-D mesh of the
N processes (torch's ``ColwiseParallel`` on ``lm_head``, ``RowwiseParallel`` on a tied embedding: a masked lookup
summed over the processes), so each process holds ``ceil(V / N)`` rows of the weight, of its gradient and of its
AdamW state. The fused loss runs on each process's rows (``dpo_fast.vocab_parallel``) and sums ``dL/dh`` over the
processes, so the backbone's gradients are the same on every process and its copies stay equal without DDP: the
model is prepared without a data-parallel wrapper. The data is a single process's: every process takes the same
micro-batches (``DataParallelView``: one data-parallel replica), so a run on N processes matches a run on one
with the same ``per_device_train_batch_size``.

Not supported: a data-parallel dimension beside it (``tensor_parallel`` below the process count), FSDP or DeepSpeed
with it.
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


class TensorParallel:
    """The run's tensor-parallel group: every process of the run, over a 1-D device mesh.

    Attributes:
        mesh: the 1-D mesh of the N processes (device type of the run's accelerator).
    """

    def __init__(self, mesh: DeviceMesh):
        self.mesh = mesh

    @property
    def size(self) -> int:
        return self.mesh.size()

    @classmethod
    def setup(cls, cfg, accelerator: Accelerator) -> TensorParallel | None:
        """The group of ``cfg.tensor_parallel`` processes, or None for 1; a ``ValueError`` where it cannot run."""
        size = cfg.tensor_parallel
        if size == 1:
            return None
        if size != accelerator.num_processes:
            raise ValueError(
                f"tensor_parallel={size} but the run has {accelerator.num_processes} processes: tensor_parallel shards "
                "the LM head over all of them (every process takes the same batches); launch as many processes as "
                "tensor_parallel (a data-parallel dimension beside it is not supported)"
            )
        if accelerator.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
            raise ValueError(
                f"tensor_parallel runs on plain multi-process launches (MULTI_CPU, MULTI_GPU), not under "
                f"{accelerator.distributed_type.value}: launch without FSDP or DeepSpeed"
            )
        return cls(init_device_mesh(accelerator.device.type, (size,), mesh_dim_names=("tp",)))

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
        return (
            f"parallelism: tensor parallel over {self.size} processes on {accelerator.device.type} ({backend}): "
            f"lm_head.weight split over the vocabulary, {shard.rows} of {shard.vocab} rows on this process "
            f"(at most {math.ceil(shard.vocab / self.size)}){tied}; the backbone replicated, no data-parallel wrapper"
        )


class DataParallelView:
    """The accelerator as the data sees it: ``num_processes`` and ``process_index`` count data-parallel replicas (one,
    under ``tensor_parallel``), and ``reduce`` adds over them; everything else is the accelerator's."""

    def __init__(self, accelerator: Accelerator):
        self._accelerator = accelerator

    def __getattr__(self, name: str):
        return getattr(self._accelerator, name)

    @property
    def num_processes(self) -> int:
        return 1

    @property
    def process_index(self) -> int:
        return 0

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum", scale: float = 1.0) -> torch.Tensor:
        """Over one replica: the tensor itself (every process of the group holds the same value)."""
        return tensor * scale if scale != 1.0 else tensor


def data_view(accelerator: Accelerator, tp: TensorParallel | None):
    """What the loop shards data and reduces metrics with: the accelerator itself, or under ``tensor_parallel`` its
    ``DataParallelView``."""
    return accelerator if tp is None else DataParallelView(accelerator)
