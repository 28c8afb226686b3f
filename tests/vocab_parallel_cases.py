"""The cases of tests/kernels/test_vocab_parallel.py, run on every rank of a gloo group (``run_group``).

Each case builds its inputs from a seed (the same on every rank), computes the unsharded result with the whole
weight, then the sharded one with the weight (and bias) a ``DTensor`` placed ``Shard(0)`` on the group's 1-D mesh,
and returns the relative error (``helpers.rel_err``) of every output, gradient and token metric. While the sharded
call runs (forward and backward), ``MemoryWatch`` records what each backend is handed and returns and every tensor
any operation makes, so the test can assert that no rank holds more than ``ceil(V / tp)`` rows of the head or any
tensor as long as the vocabulary (a gathered weight ``(V, H)``, gathered logits ``(N, V)`` or their flattening).
"""

from __future__ import annotations

import contextlib
import json
import math
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import IGNORE, Case, rel_err
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.utils._python_dispatch import TorchDispatchMode

import dpo_fast
from dpo_fast import backends


class MemoryWatch(TorchDispatchMode):
    """Records, while active, the largest dimension and element count of every plain tensor an operation returns,
    and the rows of the weight each chunked backend is handed and the columns of what it returns."""

    def __init__(self):
        super().__init__()
        self.largest_dim = 0
        self.largest_numel = 0
        self.backend_rows = 0
        self.calls = 0
        self._patched = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if type(tensor) is torch.Tensor:
                self.largest_dim = max([self.largest_dim, *tensor.shape])
                self.largest_numel = max(self.largest_numel, tensor.numel())
        return out

    def _note(self, *tensors):
        self.calls += 1
        for tensor in tensors:
            if tensor is not None:
                self.backend_rows = max(self.backend_rows, tensor.shape[-1] if tensor.dim() == 2 else 0)

    def __enter__(self):
        for name in backends.CHUNKED_BACKENDS:
            module = backends.get(name)
            stats, grad = module.logits_stats, module.logits_grad

            def logits_stats(chunk, with_metrics, keep_logits, _stats=stats):
                self.backend_rows = max(self.backend_rows, chunk.weight.shape[0])
                out = _stats(chunk, with_metrics, keep_logits)
                self._note(out.logits)
                return out

            def logits_grad(chunk, stats, grad_logp, grad_entropy, _grad=grad):
                self.backend_rows = max(self.backend_rows, chunk.weight.shape[0])
                out = _grad(chunk, stats, grad_logp, grad_entropy)
                self._note(out)
                return out

            self._patched.append((module, stats, grad))
            module.logits_stats, module.logits_grad = logits_stats, logits_grad
        return super().__enter__()

    def __exit__(self, *exc):
        for module, stats, grad in self._patched:
            module.logits_stats, module.logits_grad = stats, grad
        self._patched.clear()
        return super().__exit__(*exc)

    def report(self) -> dict:
        return {"largest_dim": self.largest_dim, "largest_numel": self.largest_numel,
                "backend_rows": self.backend_rows, "backend_calls": self.calls}  # fmt: skip


class Ctx:
    """What a case gets: the mesh, the backend, and ``sharded(tensor)``: a whole tensor as a Shard(0) DTensor leaf."""

    def __init__(self, mesh, backend: str):
        self.mesh, self.backend = mesh, backend
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.watch = MemoryWatch()

    def sharded(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None:
            return None
        return distribute_tensor(tensor.detach(), self.mesh, [Shard(0)]).requires_grad_(tensor.requires_grad)


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _whole(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _errors(sharded: dict, whole: dict) -> dict:
    """``rel_err`` of each entry (DTensors gathered first, outside the watch); booleans compared exactly."""
    errors = {}
    for key, expected in whole.items():
        got = _whole(sharded[key])
        if expected is None:
            errors[key] = 0.0 if got is None else float("inf")
        elif expected.dtype == torch.bool:
            errors[key] = float((got != expected).sum())
        else:
            got, expected = got.double(), expected.double()
            finite = torch.isfinite(expected)
            # an infinite value (a -inf mean logit of a masked vocabulary) must be the same infinity
            same_inf = bool((got[~finite] == expected[~finite]).all())
            errors[key] = rel_err(got[finite], expected[finite]) if same_inf else float("inf")
    return errors


def _batch(vocab: int, seed: int, *, bias=True, softcap=None, packed=False, pairs=2, length=6, hidden_dim=8,
           dtype=torch.float32) -> dict:  # fmt: skip
    batch = Case(pairs, length, hidden_dim, vocab, dtype, bias, softcap, packed, seed).build("cpu")
    labels = batch["labels"]
    first = labels.reshape(-1, labels.shape[-1])[:, -1] if not packed else None
    if first is not None:  # every sequence keeps a completion token (ORPO refuses an empty one)
        last = labels.reshape(-1, labels.shape[-1])
        last[:, -1] = torch.where(first == IGNORE, (seed + torch.arange(last.shape[0])) % vocab, first)
    return batch


def _run(ctx: Ctx, fn, batch: dict, grads_of=("hidden", "weight", "bias"), upstream=None,
         keep: bool = False) -> tuple[dict, dict]:  # fmt: skip
    """``fn(hidden, weight, bias) -> dict of outputs`` unsharded, then sharded under the watch; backward of the
    ``loss`` output (or of ``upstream(outputs)``) in both. Returns (errors, memory report); ``keep``: the errors also
    hold ``_results``, the two results (unsharded, sharded)."""
    results = []
    for shard in (False, True):
        hidden, weight, bias = _leaves(batch["hidden"], batch["weight"], batch["bias"])
        if shard:
            weight, bias = ctx.sharded(weight), ctx.sharded(bias)
        watch = ctx.watch if shard else contextlib.nullcontext()
        with watch:
            out = fn(hidden, weight, bias)
            loss = out["loss"] if upstream is None else upstream(out)
            if loss.requires_grad:
                loss.backward()
        named = {"hidden": hidden, "weight": weight, "bias": bias}
        for key in grads_of:
            if named[key] is not None:
                out[f"grad_{key}"] = named[key].grad
        results.append({k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in out.items()})
    errors = _errors(results[1], results[0])
    if keep:
        errors["_results"] = results
    return errors, ctx.watch.report()


def _dpo_outputs(out) -> dict:
    values = {"loss": out.loss, "chosen_logps": out.chosen_logps, "rejected_logps": out.rejected_logps,
              "chosen_rewards": out.chosen_rewards, "rejected_rewards": out.rejected_rewards}  # fmt: skip
    if out.nll_loss is not None:
        values["nll_loss"] = out.nll_loss
    if out.token_metrics is not None:
        metrics = out.token_metrics
        values.update(entropy=metrics.entropy, mean_logit=metrics.mean_logit, is_top1=metrics.is_top1)
    return values


# ---- the cases: name -> (vocab for 2 ranks, vocab for 3 ranks) and a function of (ctx, vocab)


def case_token_logps(ctx, vocab):
    """token_logps with entropies, bias, softcap and temperature; backward of a random mix of both."""
    batch = _batch(vocab, 1, softcap=3.0)
    gen = torch.Generator().manual_seed(5)
    mix = torch.randn(batch["labels"].shape, generator=gen), torch.randn(batch["labels"].shape, generator=gen)

    def fn(hidden, weight, bias):
        logp, entropy = dpo_fast.token_logps(hidden, weight, batch["labels"], bias=bias, softcap=3.0, temperature=0.7,
                                             return_entropy=True, backend=ctx.backend, scratch_mib=0.002)  # fmt: skip
        return {"logp": logp, "entropy": entropy}

    return _run(ctx, fn, batch, upstream=lambda out: (out["logp"] * mix[0] + out["entropy"] * mix[1]).sum())


def case_sequence_logps(ctx, vocab):
    """sequence_logps, packed with segment ids, averaged, differentiable; and a reference's under no_grad."""
    batch = _batch(vocab, 2, packed=True)

    def fn(hidden, weight, bias):
        out = dpo_fast.sequence_logps(hidden, weight, batch["labels"], bias=bias, segment_ids=batch["segment_ids"],
                                      num_segments=4, average_log_prob=True, backend=ctx.backend)  # fmt: skip
        with torch.no_grad():
            reference = dpo_fast.sequence_logps(hidden, weight, batch["labels"], bias=bias, temperature=2.0,
                                                segment_ids=batch["segment_ids"], backend=ctx.backend)  # fmt: skip
        return {"logps": out, "reference": reference}

    return _run(ctx, fn, batch, upstream=lambda out: (out["logps"] * torch.arange(1.0, 5.0)).sum())


def _dpo_case(seed, *, softcap=None, packed=False, scratch_mib=None, **options):
    def case(ctx, vocab):
        batch = _batch(vocab, seed, softcap=softcap, packed=packed)

        def fn(hidden, weight, bias):
            out = dpo_fast.fused_linear_dpo_loss(
                hidden, weight, batch["labels"], bias=bias, ref_chosen_logps=batch["ref_chosen_logps"],
                ref_rejected_logps=batch["ref_rejected_logps"], softcap=softcap,
                segment_ids=batch.get("segment_ids"), backend=ctx.backend, scratch_mib=scratch_mib,
                return_token_metrics=True, **options,
            )  # fmt: skip
            return _dpo_outputs(out)

        return _run(ctx, fn, batch)

    return case


def case_cpo_simpo(ctx, vocab):
    batch = _batch(vocab, 7, softcap=2.0)

    def fn(hidden, weight, bias):
        out = dpo_fast.fused_linear_cpo_loss(hidden, weight, batch["labels"], bias=bias, loss_type="simpo",
                                             softcap=2.0, backend=ctx.backend, scratch_mib=0.003,
                                             return_token_metrics=True)  # fmt: skip
        return _dpo_outputs(out)

    return _run(ctx, fn, batch)


def case_orpo(ctx, vocab):
    batch = _batch(vocab, 8)
    nll_labels = torch.where(batch["labels"] == IGNORE, (torch.arange(batch["labels"].numel()) % vocab).view_as(
        batch["labels"]), batch["labels"])  # fmt: skip

    def fn(hidden, weight, bias):
        out = dpo_fast.fused_linear_orpo_loss(hidden, weight, batch["labels"], bias=bias, nll_labels=nll_labels,
                                              backend=ctx.backend, scratch_mib=0.002)  # fmt: skip
        return _dpo_outputs(out)

    return _run(ctx, fn, batch)


def case_kto(ctx, vocab):
    batch = _batch(vocab, 9, softcap=4.0)
    rows = batch["hidden"].shape[0]
    desirable = torch.arange(rows) % 2 == 0
    ref = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])

    def fn(hidden, weight, bias):
        out = dpo_fast.fused_linear_kto_loss(hidden, weight, batch["labels"], desirable=desirable, ref_logps=ref,
                                             kl=0.3, bias=bias, softcap=4.0, backend=ctx.backend,
                                             return_token_metrics=True)  # fmt: skip
        metrics = out.token_metrics
        return {"loss": out.loss, "logps": out.logps, "rewards": out.rewards, "entropy": metrics.entropy,
                "mean_logit": metrics.mean_logit, "is_top1": metrics.is_top1}  # fmt: skip

    return _run(ctx, fn, batch)


def case_module(ctx, vocab):
    """FusedLinearDPOLoss, the module."""
    batch = _batch(vocab, 10)
    module = dpo_fast.FusedLinearDPOLoss(beta=0.2, loss_type="ipo", backend=ctx.backend)

    def fn(hidden, weight, bias):
        return _dpo_outputs(module(hidden, weight, batch["labels"], batch["ref_chosen_logps"],
                                   batch["ref_rejected_logps"], bias=bias))  # fmt: skip

    return _run(ctx, fn, batch)


def case_masked_shard(ctx, vocab):
    """A rank whose columns are all -inf (a -inf bias on its rows, targets elsewhere) contributes no probability and
    no NaN: the result is the finite unsharded one."""
    batch = _batch(vocab, 11)
    per_rank = -(-vocab // ctx.world)
    masked = slice(per_rank, 2 * per_rank)  # rank 1's rows
    batch["bias"][masked] = float("-inf")
    labels = batch["labels"]
    labels[(labels >= masked.start) & (labels < masked.stop)] = 0
    return _run(ctx, _dpo_fn(ctx, batch), batch)


def case_frozen_head(ctx, vocab):
    """A frozen head (LoRA): only dL/dh, summed over the group, from the fused pass."""
    batch = _batch(vocab, 18, softcap=2.0)
    fn = _dpo_fn(ctx, batch, softcap=2.0, scratch_mib=0.002)
    return _run(ctx, lambda hidden, weight, bias: fn(hidden, weight.detach(), bias.detach()), batch,
                grads_of=("hidden",))  # fmt: skip


def _dpo_fn(ctx, batch, **options):
    def fn(hidden, weight, bias):
        out = dpo_fast.fused_linear_dpo_loss(
            hidden, weight, batch["labels"], bias=bias, ref_chosen_logps=batch["ref_chosen_logps"],
            ref_rejected_logps=batch["ref_rejected_logps"], backend=ctx.backend, return_token_metrics=True, **options,
        )  # fmt: skip
        return _dpo_outputs(out)

    return fn


def case_bf16(ctx, vocab):
    """A bfloat16 head (16-bit dL/dx, column 0's recomputed gradient rounded as the backend rounds its own): the errors
    of the sharded and the unsharded result, each against the float64 unsharded one (returned as ``*_vs_float64``)."""
    batch = _batch(vocab, 12, softcap=3.0, dtype=torch.bfloat16)
    batch64 = {
        k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in batch.items()
    }
    fn64 = _dpo_fn(Ctx(ctx.mesh, "torch"), batch64, softcap=3.0)
    hidden, weight, bias = _leaves(batch64["hidden"], batch64["weight"], batch64["bias"])
    out64 = fn64(hidden, weight, bias)
    out64["loss"].backward()
    out64.update(grad_hidden=hidden.grad, grad_weight=weight.grad, grad_bias=bias.grad)
    errors, memory = _run(ctx, _dpo_fn(ctx, batch, softcap=3.0), batch, keep=True)
    results = errors.pop("_results")
    for which, values in zip(("unsharded", "sharded"), results):
        for key, value in _errors(values, out64).items():
            errors[f"{key}_{which}_vs_float64"] = value
    return errors, memory


def case_zero_rows(ctx, vocab):
    """A vocabulary smaller than the group needs: torch.chunk's split leaves the last rank no row at all."""
    batch = _batch(vocab, 13, softcap=2.0)
    return _run(ctx, _dpo_fn(ctx, batch, softcap=2.0, scratch_mib=0.0005), batch)


def case_replicated_hidden(ctx, vocab):
    """Hidden states given as a replicated DTensor: their gradient is the group's sum, the same on every rank."""
    from torch.distributed.tensor import Replicate

    batch = _batch(vocab, 14)

    def fn(hidden, weight, bias):
        if isinstance(weight, DTensor):
            hidden = DTensor.from_local(hidden, ctx.mesh, [Replicate()])
        return {"loss": dpo_fast.sequence_logps(hidden, weight, batch["labels"], bias=bias, backend=ctx.backend).sum()}

    return _run(ctx, fn, batch)


def case_different_tokens(ctx, vocab):
    """Ranks given different labels, different hidden states or different token counts: the same ValueError on every
    rank, no hang. Returns the messages."""
    messages = {}
    for what in ("labels", "hidden", "count", "hidden at the tolerance"):
        batch = _batch(vocab, 15)
        if what == "hidden at the tolerance":
            # positive rows summing to ~1e6: rank 1's copy 1.0005e-3 larger lies beyond rank 0's allowed 1e-3 of its
            # own checksum and within rank 1's of its own; every rank must judge alike (with the group's scale)
            batch["hidden"] = (batch["hidden"].abs() + 1) * 1000 * (1 + 1.0005e-3 * (ctx.rank == 1))
        elif ctx.rank == 1:
            if what == "labels":
                labels = batch["labels"]
                labels[labels != IGNORE] = (labels[labels != IGNORE] + 1) % vocab
            elif what == "hidden":
                batch["hidden"] = batch["hidden"] * 1.5
            else:
                batch = _batch(vocab, 15, length=7)
        weight, bias = ctx.sharded(batch["weight"].requires_grad_()), ctx.sharded(batch["bias"])
        try:
            _dpo_fn(ctx, batch)(batch["hidden"], weight, bias)
            messages[what] = "no error"
        except ValueError as error:
            messages[what] = str(error)
    return messages, {}


def case_refusals(ctx, vocab):
    """backend='reference' (the whole logits), a bias not sharded as the weight and a weight split over its hidden
    dimension are refused."""
    batch = _batch(vocab, 16)
    weight = ctx.sharded(batch["weight"])
    by_column = distribute_tensor(batch["weight"], ctx.mesh, [Shard(1)])
    messages = {}
    for what, call in (
        ("reference", lambda: dpo_fast.token_logps(batch["hidden"], weight, batch["labels"], backend="reference")),
        ("plain bias", lambda: dpo_fast.token_logps(batch["hidden"], weight, batch["labels"], bias=batch["bias"])),
        ("Shard(1)", lambda: dpo_fast.token_logps(batch["hidden"], by_column, batch["labels"])),
    ):
        try:
            call()
            messages[what] = "no error"
        except ValueError as error:
            messages[what] = str(error)
    return messages, {}


def case_gathered_weight_is_caught(ctx, vocab):
    """The memory watch has teeth: a call that gathers the weight (``full_tensor``) is seen holding a tensor with V
    rows (the report the test's memory assertion rejects)."""
    batch = _batch(vocab, 17)
    weight = ctx.sharded(batch["weight"])
    with ctx.watch:
        dpo_fast.token_logps(batch["hidden"], weight.full_tensor(), batch["labels"], backend=ctx.backend)
    return {}, ctx.watch.report()


CASES = {
    "token_logps": case_token_logps,
    "sequence_logps": case_sequence_logps,
    # fused: the gradients in the forward pass, several groups and a unit longer than the kept chunk
    "dpo_fused_chunked": _dpo_case(3, softcap=2.5, scratch_mib=0.002),
    "dpo_recompute": _dpo_case(4, packed=True, grads_in_forward=False),
    "dpo_wpo_ld_several_types": _dpo_case(
        5, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], use_weighting=True, ld_alpha=0.5, scratch_mib=0.003
    ),  # fmt: skip
    "dpo_aot_not_pair_local": _dpo_case(6, loss_type="aot", scratch_mib=0.002),
    "cpo_simpo": case_cpo_simpo,
    "orpo": case_orpo,
    "kto": case_kto,
    "module": case_module,
    "masked_shard": case_masked_shard,
    "frozen_head": case_frozen_head,
    "bf16": case_bf16,
    "zero_rows": case_zero_rows,
    "replicated_hidden": case_replicated_hidden,
    "different_tokens": case_different_tokens,
    "refusals": case_refusals,
    "gathered_weight_is_caught": case_gathered_weight_is_caught,
}


def run_group(rank: int, world: int, out_dir: str, jobs: list[tuple[str, str, int]]) -> None:
    """One rank: init gloo, run every ``(case, backend, vocab)`` of ``jobs``, write ``rank<r>.json``.

    The ranks meet through a file in ``out_dir`` (a ``FileStore``, as PyTorch's own multi-process tests do) rather
    than a TCP store: no port to find free, and no store server thread on rank 0 to outlive its clients at exit
    (a 3-process run on CI once ended with rank 0 killed by SIGABRT, "terminate called without an active
    exception"; when in the run is not known). All ranks wait for each other before the group is torn down.
    """
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{Path(out_dir, 'store')}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))  # fmt: skip
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name, backend, vocab in jobs:
        key = f"{name}[{backend}]"
        try:
            errors, memory = CASES[name](Ctx(mesh, backend), vocab)
            results[key] = {"errors": errors, "memory": memory, "vocab": vocab}
        except Exception:  # reported by the test, on every rank
            results[key] = {"traceback": traceback.format_exc()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results, default=float))
    dist.barrier()
    dist.destroy_process_group()


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / b)
