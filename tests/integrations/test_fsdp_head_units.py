"""The fused head under FSDP2 wrappings that give ``lm_head`` its own unit, in a loop of the user's own.

``model(..., dpo_fast_head=fn)`` runs the loss inside the model's (the root unit's) forward, where the root's
parameters are whole. A head in a unit of its own - ``fully_shard(model.lm_head)`` as torchtitan shards its output
layer, or ``fully_shard([norm, lm_head])`` - is still sharded there: dpo_fast gathered it with ``full_tensor()``,
whose backward kept only each process's own batch in its shard of the gradient, and FSDP's reduce-scatter never
saw it: the head's gradient was silently wrong (the rest of the model's right). Now the loss runs inside the
forward of the unit that holds the head, which gathers it and reduces its gradient as for any layer.

2 CPU processes (gloo), each half the batch, against one process without FSDP on the whole batch: the loss and
every parameter's gradient (FSDP averages them over the processes, as the loss's mean over pairs does).

And FSDP2 beside a vocabulary-parallel head: 4 processes, a 2 x 2 mesh, the head ``ColwiseParallel`` over the
``tp`` dimension and ``fully_shard`` over ``dp``; the two ranks of a ``tp`` group take the same half of the batch.
Inside the model's forward the head's weight is the tensor-parallel shard (each rank's V/2 rows), which the fused
loss keeps (dpo_fast gathered it to all V rows under FSDP before).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from torch.distributed.tensor import DTensor
from trainer_helpers import TINY_LLAMA, launch
from transformers import AutoConfig, AutoModelForCausalLM

from dpo_fast import core
from dpo_fast.integrations.hf import add_dpo_fast_head

PAIRS, LENGTH, PROMPT = 4, 12, 5
WRAPPINGS = ("root only", "lm_head its own unit", "norm and lm_head one unit", "tied, embedding and lm_head one unit")
FSDP_TP = "FSDP2 over dp, lm_head ColwiseParallel over tp"


def dpo_shaped_loss(rows, head) -> torch.Tensor:
    """-log sigmoid(chosen - rejected) of the completions' summed log-probs, mean over the pairs."""
    sums, _ = core.sequence_sums(rows.hidden, rows.layout(head.vocab), head)
    return -torch.nn.functional.logsigmoid(sums[: rows.pairs] - sums[rows.pairs :]).mean()


def batch(pairs: slice) -> dict[str, torch.Tensor]:
    """Pairs ``pairs`` of a fixed batch: chosen rows first, then rejected; the prompt's labels ignored."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, PAIRS, LENGTH), generator=generator)[:, pairs]
    input_ids = ids.reshape(-1, LENGTH)
    labels = input_ids.clone()
    labels[:, :PROMPT] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def tiny_model(wrapping: str) -> torch.nn.Module:
    torch.manual_seed(0)
    tied = wrapping.startswith("tied")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**TINY_LLAMA, "tie_word_embeddings": tied}))
    add_dpo_fast_head(model)
    return model


def shard(model: torch.nn.Module, wrapping: str) -> None:
    """``fully_shard`` of the decoder layers, the head as ``wrapping`` says, and the model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = None
    if wrapping == FSDP_TP:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        parallelize_module(model.lm_head, mesh["tp"], ColwiseParallel())
        mesh = mesh["dp"]
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    if wrapping == "lm_head its own unit":
        fully_shard(model.lm_head)
    elif wrapping == "norm and lm_head one unit":
        fully_shard([model.model.norm, model.lm_head])
    elif wrapping == "tied, embedding and lm_head one unit":
        fully_shard([model.model.embed_tokens, model.lm_head])
    fully_shard(model, mesh=mesh)


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for name, p in
            model.named_parameters()}  # fmt: skip


def errors_against_one_process(wrapping: str, replicas: int, replica: int) -> dict:
    """``wrapping`` on this process, which takes its ``replica``'s share of the batch, against the unsharded model on
    the whole batch: ``errors``, the loss's and every gradient's (relative to the gradient's largest entry); ``head``,
    the weight's placements at rest and the rows of it the loss was handed."""
    import torch.distributed as dist

    model = tiny_model(wrapping)
    reference = copy.deepcopy(model)
    whole_loss = reference(**batch(slice(None)), dpo_fast_head=dpo_shaped_loss)
    whole_loss.backward()
    shard(model, wrapping)
    head_seen = {"placements": str(model.lm_head.weight.placements)}
    per_replica = PAIRS // replicas

    def loss_noting_the_head(rows, head):
        head_seen["rows"] = (head.weight.to_local() if isinstance(head.weight, DTensor) else head.weight).shape[0]
        return dpo_shaped_loss(rows, head)

    loss = model(**batch(slice(replica * per_replica, (replica + 1) * per_replica)), dpo_fast_head=loss_noting_the_head)
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    got, expected = gradients(model), gradients(reference)
    errors = {"loss": abs(mean_loss.item() / dist.get_world_size() - whole_loss.item())} | {
        name: (got[name] - expected[name]).abs().max().item() / expected[name].abs().max().item() for name in expected
    }
    return {"errors": errors, "head": head_seen}


def compare(out: Path) -> None:
    """One process of the launch: every wrapping against the unsharded model; the errors in ``out/rank<r>.json``."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    if world == 2:
        results = {wrapping: errors_against_one_process(wrapping, world, rank) for wrapping in WRAPPINGS}
    else:  # a 2 x 2 mesh, dp-major: ranks 0 and 1 are replica 0's tp group
        results = {FSDP_TP: errors_against_one_process(FSDP_TP, 2, rank // 2)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def launched(processes: int, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp(f"fsdp-head-units-{processes}")
    launch(processes, ["--multi_gpu"], [__file__, str(out)])  # torchrun's environment; the script shards by itself
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(processes)]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> list[dict]:
    return launched(2, tmp_path_factory)


def assert_as_one_process(errors: dict, head_has_its_own_name: bool) -> None:
    """The loss within 1e-6 and every gradient within 1e-5 of the unsharded model's; the head's among them."""
    errors = dict(errors)
    assert errors.pop("loss") < 1e-6
    assert "lm_head.weight" in errors or not head_has_its_own_name  # a tied head is embed_tokens.weight
    assert {name: error for name, error in errors.items() if error > 1e-5} == {}


@pytest.mark.slow
@pytest.mark.parametrize("wrapping", WRAPPINGS)
def test_the_head_gradient_is_the_unsharded_one(two_processes, wrapping):
    for rank_results in two_processes:
        assert_as_one_process(rank_results[wrapping]["errors"], not wrapping.startswith("tied"))


@pytest.mark.slow
def test_fsdp2_beside_a_vocabulary_parallel_head_keeps_its_shard(tmp_path_factory):
    per_rank = launched(4, tmp_path_factory)
    for rank_results in per_rank:
        head = rank_results[FSDP_TP]["head"]
        # sharded over dp (FSDP's strided shard) and tp at rest; each rank's loss saw V / 2 of the head's rows
        assert head["placements"].endswith("Shard(dim=0))")
        assert head["rows"] == TINY_LLAMA["vocab_size"] // 2
        assert_as_one_process(rank_results[FSDP_TP]["errors"], head_has_its_own_name=True)


if __name__ == "__main__":  # one of the launched processes (2, or 4 for the mesh)
    compare(Path(sys.argv[1]))
