"""Memory per rank of a DPO step whose LM head is split over the vocabulary (issue 28), by arithmetic and measured.

    python benchmarks/vocab_parallel_memory.py [--tp 2] [--out benchmarks/results] [--name vocab-parallel-memory]

Three ways to run the loss when each of ``tp`` ranks holds ``V / tp`` rows of the head ``W``:

- ``dpo_fast``: the vocabulary-parallel fused loss (``dpo_fast.vocab_parallel``): each rank's chunked row pass on its
  own rows, ``O(N)`` statistics all-reduced; never the logits of more than one chunk of tokens and ``V / tp`` columns.
- ``gathered logits``: the head as transformers' ``tp_plan`` (``colwise_gather_output``) or torchtitan's
  ``ColwiseParallel(output_layouts=Replicate())`` runs it: each rank forms its ``(positions, V / tp)`` logits, they
  are all-gathered into ``(positions, V)`` on every rank, and a logits-based DPO loss (log-softmax, gather, sums)
  runs on them, with autograd.
- ``gathered weight``: ``W`` all-gathered on every rank (``DTensor.full_tensor``), then dpo_fast's unsharded fused
  loss.

**Arithmetic** at the headline shape (H=4096, V=128256, 8 pairs x 1024 tokens, bf16; completion tokens a fraction
``--completion`` of the positions, since dpo_fast multiplies only those, while a logits-based loss forms the logits
of every position), for tp = 1, 2, 4, 8: the bytes each rank holds for the loss beyond the hidden states, counting
only what scales with V (``arithmetic``).

**Measured** on CPU at a small shape (4 pairs x 512 tokens, half prompt, H=256, V=32000, float32) on ``--tp`` gloo
processes: each rank's extra resident memory over one forward and backward (the growth of ``VmHWM``, reset just
before the step, as tests/kernels/test_memory.py measures it; gradients included), each route in fresh processes, and the
loss of each route (they agree).

Writes ``<out>/<name>.json`` (figures, command, machine, versions, code) and ``<out>/<name>.md`` (the tables).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _stack import environment  # noqa: E402

HEADLINE = {"hidden": 4096, "vocab": 128256, "pairs": 8, "length": 1024, "bytes": 2}
SMALL = {"pairs": 4, "length": 512, "hidden": 256, "vocab": 32000}
ROUTES = ("dpo_fast", "gathered_logits", "gathered_weight")
GIB = 2**30


def arithmetic(hidden: int, vocab: int, pairs: int, length: int, bytes: int, tp: int, completion: float,
               scratch_bytes: int) -> dict[str, dict[str, int]]:  # fmt: skip
    """Bytes per rank that scale with V, by route and item, for ``tp`` ranks (bf16 operands: ``bytes=2``).

    Common to every route (not counted): the rank's rows of ``W`` (``ceil(V/tp) * H * bytes``), their gradient and
    optimizer state, and the hidden states. ``scratch_bytes``: dpo_fast's chunk budget (1 GiB on CUDA by default).
    """
    positions = 2 * pairs * length
    tokens = int(positions * completion)
    rows = math.ceil(vocab / tp)
    return {
        "dpo_fast": {
            # one chunk's C x ceil(V/tp) logits (and dL/dx) under the budget, whatever N and tp
            "chunk scratch (the budget)": scratch_bytes,
            # a 16-bit weight's gradient over several chunks is summed in float32, rounded once
            "float32 sum of dL/dW of the rank's rows": rows * hidden * 4,
            # dL/dh all-reduced in float32; statistics, O(N) floats
            "dL/dh (float32 all-reduce) and per-token statistics": tokens * hidden * 4 + tokens * 4 * 12,
        },
        "gathered_logits": {
            "local logits (positions x V/tp)": positions * rows * bytes,
            "gathered logits (positions x V)": positions * vocab * bytes,
            "their gradient (positions x V)": positions * vocab * bytes,
            "float32 log-softmax of one sequence (T x V, per row as TRL does)": length * vocab * 4,
        },
        "gathered_weight": {
            "gathered W (V x H)": vocab * hidden * bytes,
            "float32 sum of dL/dW (V x H)": vocab * hidden * 4,
            "chunk scratch (the budget)": scratch_bytes,
        },
    }


def arithmetic_table(tps: list[int], completion: float, scratch_bytes: int) -> tuple[list[str], dict]:
    rows, figures = [], {}
    for tp in tps:
        routes = arithmetic(**HEADLINE, tp=tp, completion=completion, scratch_bytes=scratch_bytes)
        figures[tp] = {route: sum(items.values()) for route, items in routes.items()}
        figures[tp]["W rows per rank"] = math.ceil(HEADLINE["vocab"] / tp)
    header = ["| per rank, GiB | " + " | ".join(f"tp = {tp}" for tp in tps) + " |",
              "| --- |" + " ---: |" * len(tps)]  # fmt: skip
    for route in ROUTES:
        rows.append(
            f"| {route.replace('_', ' ')} | " + " | ".join(f"{figures[tp][route] / GIB:.2f}" for tp in tps) + " |"
        )
    rows.append("| (the rank's rows of W, bf16: in every route) | "
                + " | ".join(f"{figures[tp]['W rows per rank'] * HEADLINE['hidden'] * 2 / GIB:.2f}" for tp in tps)
                + " |")  # fmt: skip
    items = arithmetic(**HEADLINE, tp=tps[-1], completion=completion, scratch_bytes=scratch_bytes)
    detail = [f"Items at tp = {tps[-1]}:", ""]
    for route in ROUTES:
        detail.append(f"- {route.replace('_', ' ')}: " + "; ".join(
            f"{name} {value / GIB:.2f} GiB" for name, value in items[route].items()))  # fmt: skip
    return header + rows + [""] + detail, figures


# ---- the measurement: one process per rank per route


def _peak_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _inputs(rank_seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(rank_seed)
    pairs, length, hidden_dim, vocab = (SMALL[k] for k in ("pairs", "length", "hidden", "vocab"))
    hidden = torch.randn(2 * pairs, length, hidden_dim, generator=gen)
    weight = torch.randn(vocab, hidden_dim, generator=gen) * 0.05
    labels = torch.randint(0, vocab, (2 * pairs, length), generator=gen)
    labels[:, : length // 2] = -100  # half of every row is prompt
    ref = torch.randn(pairs, generator=gen) - 200
    return {"hidden": hidden, "weight": weight, "labels": labels, "ref": ref}


def _naive_dpo(logits: torch.Tensor, labels: torch.Tensor, ref: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """The sigmoid DPO loss from full logits (2P, T, V), as a logits-based trainer computes it."""
    valid = labels != -100
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, torch.where(valid, labels, 0)[..., None]).squeeze(-1)
    sums = (logp * valid).sum(-1)
    chosen, rejected = sums.chunk(2)
    return -torch.nn.functional.logsigmoid(beta * ((chosen - ref) - (rejected - ref))).mean()


def _route(name: str, mesh, batch: dict, hidden: torch.Tensor, weight) -> torch.Tensor:
    import dpo_fast

    if name == "dpo_fast":
        return dpo_fast.fused_linear_dpo_loss(hidden, weight, batch["labels"], ref_chosen_logps=batch["ref"],
                                              ref_rejected_logps=batch["ref"], backend="cpp").loss  # fmt: skip
    if name == "gathered_weight":
        return dpo_fast.fused_linear_dpo_loss(hidden, weight.full_tensor(), batch["labels"],
                                              ref_chosen_logps=batch["ref"], ref_rejected_logps=batch["ref"],
                                              backend="cpp").loss  # fmt: skip
    from torch.distributed.tensor import DTensor, Replicate, Shard

    # ColwiseParallel(output_layouts=Replicate()): replicated input, Shard(-1) logits, all-gathered
    local = hidden @ weight.to_local().t()
    logits = DTensor.from_local(local, mesh, [Shard(-1)], run_check=False,
                                shape=(*hidden.shape[:-1], weight.shape[0]),
                                stride=torch.empty(*hidden.shape[:-1], weight.shape[0], device="meta").stride())  # fmt: skip
    full = logits.redistribute(placements=[Replicate()]).to_local()
    return _naive_dpo(full, batch["labels"], batch["ref"])


def _rank(rank: int, world: int, route: str, out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    # the ranks meet through a file (as tests/vocab_parallel_cases.py): no port, no store server thread on rank 0
    dist.init_process_group("gloo", init_method=f"file://{Path(out, route + '-store')}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))  # fmt: skip
    mesh = init_device_mesh("cpu", (world,))
    batch = _inputs()
    weight = distribute_tensor(batch["weight"], mesh, [Shard(0)]).requires_grad_(True)
    del batch["weight"]
    # warm-up on a tiny batch: imports, one-time buffers, the process group's first collectives
    tiny = {"labels": batch["labels"][:2, -4:], "ref": batch["ref"][:1]}
    _route(route, mesh, tiny, batch["hidden"][:2, -4:].clone().requires_grad_(True), weight).backward()
    weight.grad = None
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _peak_mib()
    hidden = batch["hidden"].requires_grad_(True)
    loss = _route(route, mesh, batch, hidden, weight)
    loss.backward()
    extra = _peak_mib() - before
    Path(out, f"{route}-{rank}.json").write_text(json.dumps({"extra_mib": extra, "loss": loss.item(),
                                                             "rows": weight.to_local().shape[0]}))  # fmt: skip
    dist.barrier()
    dist.destroy_process_group()


def measure(tp: int) -> dict:
    import torch.multiprocessing as mp

    os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"  # as tests/kernels/test_memory.py: a stable heap
    results = {}
    with tempfile.TemporaryDirectory() as out:
        for route in ROUTES:
            mp.start_processes(_rank, args=(tp, route, out), nprocs=tp, start_method="spawn")
            results[route] = [json.loads(Path(out, f"{route}-{rank}.json").read_text()) for rank in range(tp)]
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, default=2, help="processes of the measurement (default 2)")
    parser.add_argument("--completion", type=float, default=0.5, help="completion share of the positions (0.5)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--name", default="vocab-parallel-memory")
    args = parser.parse_args(argv)
    meta = environment.describe(torch.device("cpu"))
    scratch = 1024 * 2**20  # dpo_fast's CUDA default (chunking.DEFAULT_SCRATCH_MIB)
    arith_lines, arith = arithmetic_table([1, 2, 4, 8], args.completion, scratch)
    measured = measure(args.tp)
    meta["device"]["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    shape = ", ".join(f"{k}={v}" for k, v in SMALL.items())
    table = [f"| route | rows of W per rank | extra MiB per rank ({', '.join(f'rank {r}' for r in range(args.tp))}) "
             "| loss |", "| --- | ---: | ---: | ---: |"]  # fmt: skip
    for route, ranks in measured.items():
        rows = ", ".join(str(r["rows"]) for r in ranks)
        extra = ", ".join(f"{r['extra_mib']:.0f}" for r in ranks)
        table.append(f"| {route.replace('_', ' ')} | {rows} | {extra} | {ranks[0]['loss']:.6f} |")
    command = ["python", "benchmarks/vocab_parallel_memory.py", *(argv if argv is not None else sys.argv[1:])]
    lines = [
        f"# {args.name}, {meta['date']}", "", f"`{shlex.join(command)}`", "",
        (f"{meta['device']['cpu']} ({meta['device']['cpu_cores_available']} cores), torch {meta['versions']['torch']}, "
         f"load average {meta['device']['load_average_1m']} at the start, {meta['device']['load_average_1m_end']} at "
         "the end."), "", environment.code_summary(meta["code"]), "",
        f"## Arithmetic: H={HEADLINE['hidden']}, V={HEADLINE['vocab']}, {HEADLINE['pairs']} pairs x "
        f"{HEADLINE['length']} tokens, bf16, completions {args.completion:.0%} of the positions, dpo_fast's chunk "
        f"budget {scratch // 2**20} MiB", "", *arith_lines, "",
        f"## Measured on CPU: {args.tp} gloo processes, {shape} (half prompt), float32", "",
        "Extra resident memory of one forward and backward on each rank (VmHWM growth), gradients included.", "",
        *table,
    ]  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    record = {"command": command, "meta": meta, "arithmetic_bytes_per_rank": arith, "measured_small": measured,
              "small_shape": SMALL, "headline_shape": HEADLINE, "completion": args.completion, "tp": args.tp}  # fmt: skip
    (args.out / f"{args.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
