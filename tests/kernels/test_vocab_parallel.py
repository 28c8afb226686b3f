"""A head sharded over the vocabulary across 2 and 3 gloo processes against the unsharded head (issue 28).

Every public entry (``token_logps``, ``sequence_logps``, the DPO, CPO/SimPO, ORPO and KTO losses, the module), the
gradients in the forward pass and the recompute path, with bias, softcap and temperature, on the torch and cpp
backends (and Triton's interpreter at 2 processes): the loss, every output, every gradient and the token metrics
equal the unsharded result within float32 rounding. V = 37 over 2 processes (19 + 18 rows) and V = 50 over 3
(17 + 17 + 16), so V does not divide evenly; V = 4 over 3 leaves the last rank no row.

The memory assertion: while the sharded call runs (forward and backward), every chunked backend is handed at
most ``ceil(V / tp)`` rows of the head and returns at most that many columns, and no operation returns a tensor
with a dimension as long as the vocabulary (a gathered weight ``(V, H)``, gathered logits ``(N, V)`` or their
flattening all have one; the shapes are chosen so that nothing else does: N = 24 tokens, H = 8 < V). A call that
gathers the weight is shown to fail it.

Each process count is one spawn running all of its cases (``vocab_parallel_cases.run_group``); a case's exception is
reported with its traceback, and a collective that would hang times out after 60 s instead.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import vocab_parallel_cases as cases

from dpo_fast import vocab_parallel

# gloo processes on CPU tensors, whatever the machine: outside the device check of tests/conftest.py
pytestmark = [pytest.mark.slow, pytest.mark.cpu_only(reason="gloo processes on CPU tensors")]

FLOAT32_TOLERANCE = 1e-5  # relative, by norm: the group sums per shard, then across shards
BF16_TOLERANCE = {"values": 1e-2, "grads": 2e-2}  # docs/design.md's, against float64
VOCAB = {2: 37, 3: 50}
FLOAT32_CASES = [name for name in cases.CASES if name not in
                 ("bf16", "zero_rows", "different_tokens", "refusals", "gathered_weight_is_caught")]  # fmt: skip
TRITON_CASES = ["token_logps", "dpo_fused_chunked", "dpo_recompute", "kto"]


def _jobs(world: int) -> list[tuple[str, str, int]]:
    vocab = VOCAB[world]
    jobs = [(name, backend, vocab) for backend in ("torch", "cpp") for name in FLOAT32_CASES]
    if world == 2 and os.environ.get("TRITON_INTERPRET") == "1":  # Triton on CPU tensors: its interpreter
        jobs += [(name, "triton", vocab) for name in TRITON_CASES]
    jobs += [("bf16", "cpp", vocab), ("different_tokens", "cpp", vocab), ("refusals", "torch", vocab),
             ("gathered_weight_is_caught", "torch", vocab)]  # fmt: skip
    if world == 3:
        jobs += [("zero_rows", backend, 4) for backend in ("torch", "cpp")]
    return jobs


_RESULTS: dict[int, list[dict]] = {}


def group_results(world: int, tmp_path_factory) -> list[dict]:
    """Each rank's results of every job of ``world`` processes (one spawn per process count, cached)."""
    if world not in _RESULTS:
        out = tmp_path_factory.mktemp(f"tp{world}")
        threads = torch.get_num_threads()
        try:
            mp.start_processes(cases.run_group, args=(world, str(out), _jobs(world)), nprocs=world,
                               start_method="spawn")  # fmt: skip
        except mp.ProcessExitedException as exc:  # say whether it died during the cases or after them
            written = sorted(path.name for path in out.glob("rank*.json"))
            raise AssertionError(f"{exc}; results written before it ended: {written or 'none'}") from exc
        finally:
            torch.set_num_threads(threads)
        _RESULTS[world] = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]
    return _RESULTS[world]


def _result(world, name, backend, tmp_path_factory) -> list[dict]:
    """The job's result on every rank; a traceback on any rank fails the test with it."""
    per_rank = [ranks[f"{name}[{backend}]"] for ranks in group_results(world, tmp_path_factory)]
    for rank, result in enumerate(per_rank):
        if "traceback" in result:
            pytest.fail(f"rank {rank} of {world}:\n{result['traceback']}")
    return per_rank


def _assert_memory(result: dict, vocab: int, world: int, rank: int) -> None:
    memory = result["memory"]
    assert memory["backend_calls"] > 0 or vocab_parallel.split(vocab, world, rank)[1] == 0  # an empty rank calls none
    assert memory["backend_rows"] <= math.ceil(vocab / world), memory  # rows handed, columns returned
    if vocab > 24:  # every other dimension (N = 24 tokens, H = 8, a chunk) is shorter than the vocabulary
        assert memory["largest_dim"] < vocab, memory


@pytest.mark.parametrize(
    "world,name,backend",
    [(world, name, backend) for world in (2, 3) for name, backend, _ in _jobs(world) if name in FLOAT32_CASES],
)
def test_entry_matches_the_unsharded_head_within_float32_rounding(world, name, backend, tmp_path_factory):
    for rank, result in enumerate(_result(world, name, backend, tmp_path_factory)):
        assert result["errors"], name
        for key, error in result["errors"].items():
            assert error <= FLOAT32_TOLERANCE, (rank, key, error)
        _assert_memory(result, result["vocab"], world, rank)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_a_rank_without_a_row_of_the_head(backend, tmp_path_factory):
    """V = 4 over 3 processes: torch.chunk's split gives 2, 2 and 0 rows; the empty rank takes part in every
    collective and the result is the unsharded one."""
    for rank, result in enumerate(_result(3, "zero_rows", backend, tmp_path_factory)):
        assert result["errors"]
        assert max(result["errors"].values()) <= FLOAT32_TOLERANCE, result["errors"]
        _assert_memory(result, 4, 3, rank)


@pytest.mark.parametrize("world", [2, 3])
def test_bf16_head_is_as_accurate_as_the_unsharded_one(world, tmp_path_factory):
    """bfloat16: sharded and unsharded both within the 16-bit tolerances of the float64 result."""
    for rank, result in enumerate(_result(world, "bf16", "cpp", tmp_path_factory)):
        errors = result["errors"]
        for key, error in errors.items():
            if key.endswith("_vs_float64"):
                kind = "grads" if key.startswith("grad_") else "values"
                assert error <= BF16_TOLERANCE[kind], (key, error)
            elif key.startswith("grad_"):
                assert error <= BF16_TOLERANCE["grads"], (key, error)
        _assert_memory(result, VOCAB[world], world, rank)


@pytest.mark.parametrize("world", [2, 3])
def test_different_tokens_on_the_ranks_raise_on_every_rank(world, tmp_path_factory):
    results = _result(world, "different_tokens", "cpp", tmp_path_factory)
    for result in results:
        for what, quantity in (("labels", "label sum"), ("hidden", "hidden checksum"), ("count", "tokens from")):
            message = result["errors"][what]
            assert "were given different tokens" in message and quantity in message, (what, message)
    # hidden states that differ by just over 1e-3 of the smaller copy's checksum and just under 1e-3 of the larger's:
    # every rank judges with the group's numbers, so all pass (or all raise) alike. Judged by its own checksum, the
    # rank with the smaller copy raised alone and the others went on into the chunks' collectives (a hang).
    assert len({result["errors"]["hidden at the tolerance"] for result in results}) == 1, results


@pytest.mark.parametrize("world", [2, 3])
def test_reference_backend_an_unsharded_bias_and_other_placements_are_refused(world, tmp_path_factory):
    for result in _result(world, "refusals", "torch", tmp_path_factory):
        assert "backend='reference' forms the whole (N, V) logits" in result["errors"]["reference"]
        assert "bias must be sharded as weight is" in result["errors"]["plain bias"]
        assert "weight is a DTensor placed (Shard(dim=1),)" in result["errors"]["Shard(1)"]


@pytest.mark.parametrize("world", [2, 3])
def test_the_memory_check_fails_a_gathered_weight(world, tmp_path_factory):
    """The assertion has teeth: the same watch around a call that gathers the weight sees V rows."""
    for rank, result in enumerate(_result(world, "gathered_weight_is_caught", "torch", tmp_path_factory)):
        with pytest.raises(AssertionError):
            _assert_memory(result, VOCAB[world], world, rank)


@pytest.mark.parametrize("vocab", [1, 4, 5, 37, 50, 128256])
@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 8])
def test_split_is_torch_chunks(vocab, ranks):
    """``vocab_parallel.split`` is DTensor's Shard(0) layout: torch.chunk's pieces, then empty ranks."""
    pieces = [piece.shape[0] for piece in torch.empty(vocab, 0).chunk(ranks)]
    pieces += [0] * (ranks - len(pieces))
    offsets = [sum(pieces[:rank]) for rank in range(ranks)]
    assert [vocab_parallel.split(vocab, ranks, rank) for rank in range(ranks)] == list(zip(offsets, pieces))
