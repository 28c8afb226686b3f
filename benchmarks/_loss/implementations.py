"""The implementations the benchmark measures, each behind one small interface.

An ``Implementation`` says which modes it runs (see ``cases.GEMM_PRODUCTS``), why it cannot run
here (a missing package, a device it does not support), and builds a step: ``make_step(batch,
mode)`` returns a function that runs one forward pass and returns ``StepOutputs``, whose
``backward()`` runs the rest of the step. Setup (imports, modules, preallocated buffers) happens
in ``make_step``, outside the timed region.

- ``naive``: dpo_fast's ``reference`` backend: full ``N x V`` logits, ``log_softmax``, gather.
- ``dpo_fast-<backend>``: every chunked backend in ``dpo_fast.backends.CHUNKED_BACKENDS`` (a new
  backend appears here by itself); ``-recompute`` is ``grads_in_forward=False``.
- Per-token peers (TRL, PyTorch, verl, Cut Cross-Entropy, a compiled chunked step) get the
  valid tokens only, as TRL's trainer gives them, and are followed by the same masked
  per-sequence sums and DPO loss in PyTorch (``cases.dpo_loss``). In the ``dpo-metrics`` mode
  dpo_fast returns TRL's token metrics (``return_token_metrics=True``) and TRL's fused head is
  asked for the same statistics (entropy, mean logit, top-1); the other peers cannot form them.
- ``liger``: Liger-Kernel's ``LigerFusedLinearDPOLoss``, which takes the padded batch; in the simpo
  and kto modes its ``LigerFusedLinearSimPOLoss`` and ``LigerFusedLinearKTOLoss``, beside dpo_fast's
  ``fused_linear_cpo_loss(loss_type="simpo")`` and ``fused_linear_kto_loss`` (and the naive step).
- ``gemm``: the GEMM line, the mode's products on valid tokens into preallocated outputs.
- ``quack``, ``liger-cute``: the CuTe-DSL kernels, reported with the reason they cannot run.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from _loss.cases import (
    BETA,
    GEMM_PRODUCTS,
    IGNORE,
    METRICS_MODES,
    MODES,
    OBJECTIVE_MODES,
    SIMPO_BETA,
    SIMPO_GAMMA,
    Batch,
    desirable,
    dpo_loss,
    kto_kl,
)  # fmt: skip

# TRL's DPOTrainer passes this vocabulary tile width (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE, trl 1.16)
TRL_VOCAB_CHUNK = 32768
# Scratch budget of the compiled chunked step, as dpo_fast's defaults (dpo_fast.chunking.DEFAULT_SCRATCH_MIB)
COMPILED_CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}
CUTE_DSL_REASON = (
    "needs the CuTe DSL (nvidia-cutlass-dsl, a wheel of about 92 MB): the GPU machine has no network and "
    "does not have it, and it is larger than the 64 MiB that travel with the project's tree"
)


@dataclass
class StepOutputs:
    """What one forward pass returns.

    loss: () the scalar whose backward is the step's backward (None in the forward mode);
    seq_logps: (2P,) per-sequence log-probs; token_logps: (2P, T), 0 where ignored (token mode);
    backward_fn: replaces ``loss.backward`` (the GEMM line).
    """

    loss: torch.Tensor | None = None
    seq_logps: torch.Tensor | None = None
    token_logps: torch.Tensor | None = None
    backward_fn: Callable[[], None] | None = None

    def backward(self) -> None:
        if self.backward_fn is not None:
            self.backward_fn()
        else:
            self.loss.backward()


StepFactory = Callable[[Batch, str], Callable[[], StepOutputs]]


@dataclass(frozen=True)
class Implementation:
    """name: as reported; modes: those it runs; unavailable(device, dtype): why not here, or None;
    make_step: see the module docstring (None: reported only); compiles: uses torch.compile."""

    name: str
    description: str
    modes: tuple[str, ...]
    unavailable: Callable[[torch.device, torch.dtype], str | None]
    make_step: StepFactory | None
    compiles: bool = False


def _import_reason(module: str, hint: str) -> Callable[[torch.device, torch.dtype], str | None]:
    """Availability of a peer: None when ``module`` imports, else the error and how to install it."""

    def check(device: torch.device, dtype: torch.dtype) -> str | None:
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 (any failure to import is a reason to report)
            return f"{type(error).__name__}: {error} ({hint})"
        return None

    return check


def _cuda_only(check: Callable, what: str) -> Callable[[torch.device, torch.dtype], str | None]:
    def on_cuda(device: torch.device, dtype: torch.dtype) -> str | None:
        if device.type != "cuda":
            return f"{what} run on CUDA GPUs only"
        return check(device, dtype)

    return on_cuda


# ----------------------------------------------------------------------------------------------
# dpo_fast, and the naive step (its reference backend)


def _dpo_fast_step(backend: str, grads_in_forward: bool | None) -> StepFactory:
    import dpo_fast

    def make_step(batch: Batch, mode: str) -> Callable[[], StepOutputs]:
        rows_desirable = desirable(batch.case, batch.hidden.device)

        def forward() -> StepOutputs:
            if mode == "forward":
                return StepOutputs(seq_logps=dpo_fast.sequence_logps(batch.hidden, batch.weight, batch.labels,
                                                                     backend=backend))  # fmt: skip
            if mode == "token":
                tokens = dpo_fast.token_logps(batch.hidden, batch.weight, batch.labels, backend=backend)
                return StepOutputs(loss=(tokens * batch.upstream).sum(), token_logps=tokens)
            if mode == "simpo":
                out = dpo_fast.fused_linear_cpo_loss(
                    batch.hidden, batch.weight, batch.labels, loss_type="simpo", beta=SIMPO_BETA,
                    simpo_gamma=SIMPO_GAMMA, nll_weight=0.0, backend=backend, grads_in_forward=grads_in_forward,
                )  # fmt: skip
                return StepOutputs(loss=out.loss, seq_logps=torch.cat([out.chosen_logps, out.rejected_logps]))
            if mode == "kto":
                out = dpo_fast.fused_linear_kto_loss(
                    batch.hidden, batch.weight, batch.labels, desirable=rows_desirable, reference_free=True,
                    kl=kto_kl(batch.case), beta=BETA, backend=backend, grads_in_forward=grads_in_forward,
                )  # fmt: skip
                return StepOutputs(loss=out.loss, seq_logps=out.logps)
            out = dpo_fast.fused_linear_dpo_loss(
                batch.hidden, batch.weight, batch.labels, reference_free=True, beta=BETA, backend=backend,
                grads_in_forward=grads_in_forward, return_token_metrics=mode in METRICS_MODES,
            )  # fmt: skip
            return StepOutputs(loss=out.loss, seq_logps=torch.cat([out.chosen_logps, out.rejected_logps]))

        return forward

    return make_step


def _dpo_fast_reason(backend: str) -> Callable[[torch.device, torch.dtype], str | None]:
    def check(device: torch.device, dtype: torch.dtype) -> str | None:
        from dpo_fast import backends

        try:
            return backends.get(backend).unavailable_reason(device, dtype)
        except Exception as error:  # noqa: BLE001 (e.g. an extension that is not built)
            return f"{type(error).__name__}: {error}"

    return check


def _dpo_fast_implementations() -> list[Implementation]:
    from dpo_fast import backends

    found = [
        Implementation("naive", "dpo_fast backend='reference': full logits, log_softmax, gather (autograd)", MODES,
                       lambda device, dtype: None, _dpo_fast_step("reference", None)),
    ]  # fmt: skip
    for backend in backends.CHUNKED_BACKENDS:
        reason = _dpo_fast_reason(backend)
        found.append(Implementation(f"dpo_fast-{backend}", f"dpo_fast backend='{backend}' (grads_in_forward for "
                                    "the DPO loss)", MODES, reason, _dpo_fast_step(backend, True)))  # fmt: skip
        found.append(Implementation(f"dpo_fast-{backend}-recompute", f"dpo_fast backend='{backend}', "
                                    "grads_in_forward=False", ("dpo", "frozen"), reason,
                                    _dpo_fast_step(backend, False)))  # fmt: skip
    return found


# ----------------------------------------------------------------------------------------------
# Per-token peers: valid tokens in, (N_valid,) float32 log-probs out


def _per_token_step(token_logps: Callable[[], Callable], with_metrics: Callable[[], Callable] | None = None
                    ) -> StepFactory:  # fmt: skip
    """A step from a per-token peer: its log-probs on valid tokens, then the PyTorch sums and loss.

    ``with_metrics``: the peer's log-probs that also form TRL's token metrics, for the metrics modes.
    """

    def make_step(batch: Batch, mode: str) -> Callable[[], StepOutputs]:
        fn = (with_metrics if mode in METRICS_MODES else token_logps)()
        width = batch.case.hidden

        def forward() -> StepOutputs:
            hidden = batch.hidden.reshape(-1, width).index_select(0, batch.valid_index)
            targets = batch.labels.reshape(-1).index_select(0, batch.valid_index)
            logp = fn(hidden, batch.weight, targets).float()
            tokens = logp.new_zeros(batch.labels.numel()).index_copy(0, batch.valid_index, logp)
            tokens = tokens.view(batch.labels.shape)
            if mode == "token":
                return StepOutputs(loss=(tokens * batch.upstream).sum(), token_logps=tokens)
            seq_logps = tokens.sum(-1)
            return StepOutputs(loss=None if mode == "forward" else dpo_loss(seq_logps), seq_logps=seq_logps)

        return forward

    return make_step


def _trl() -> Callable:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    # log-probs only (no entropy or other statistics): the least work TRL's kernel can be asked for
    return lambda h, w, y: ChunkedLogProbFunction.apply(h, w, None, y, 1.0, TRL_VOCAB_CHUNK, None, 1.0, ())[0]


def _trl_with_metrics() -> Callable:
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    # the statistics TRL 1.16's DPOTrainer asks its fused head for, to log entropy, logits/* and mean_token_accuracy
    metrics = ("entropy", "mean_logits", "is_top1")
    return lambda h, w, y: ChunkedLogProbFunction.apply(h, w, None, y, 1.0, TRL_VOCAB_CHUNK, None, 1.0, metrics)[0]


def _torch_lce() -> Callable:
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda h, w, y: -F.linear_cross_entropy(h, w, y, reduction="none", ignore_index=IGNORE, options=options)


def _torch_lce_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return (
            f"torch {torch.__version__} has no chunked linear_cross_entropy (LinearCrossEntropyOptions, torch >= 2.13)"
        )
    return None


def _cce() -> Callable:
    from cut_cross_entropy import linear_cross_entropy

    def logps(h, w, y):
        impl = "cce" if h.is_cuda else "torch_compile"  # its Triton kernels on GPU; its compiled path on CPU
        return -linear_cross_entropy(h, w, y, reduction="none", impl=impl)

    return logps


def _verl_kernel_module() -> types.ModuleType:
    """verl's ``utils/kernel/linear_cross_entropy.py`` alone, without running verl's package ``__init__``.

    ``import verl`` pulls in its whole RL stack (ray, tensordict, ...); the kernel needs only torch,
    triton and ``verl.utils.device``. The parent packages are registered as bare namespaces over the
    installed folders, so only the kernel's own modules execute.
    """
    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("verl is not installed")
    root = spec.submodule_search_locations[0]
    for name, folder in (
        ("verl", root),
        ("verl.utils", f"{root}/utils"),
        ("verl.utils.kernel", f"{root}/utils/kernel"),
    ):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [folder]
            sys.modules[name] = package
    importlib.import_module("verl.utils.kernel.kernels")  # imported lazily by the Function; fail here instead
    return importlib.import_module("verl.utils.kernel.linear_cross_entropy")


def _verl() -> Callable:
    linear_cross_entropy = _verl_kernel_module().linear_cross_entropy
    return lambda h, w, y: linear_cross_entropy(h.contiguous(), w, y, 1.0, "none")[0]


def _verl_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    try:
        _verl_kernel_module()
    except Exception as error:  # noqa: BLE001 (any failure to import is a reason to report)
        return f"{type(error).__name__}: {error} (pip install --no-deps verl==0.9.1)"
    return None


@functools.cache
def _compiled_chunk_logps() -> Callable:
    def chunk_logps(hidden, weight, targets):
        logits = (hidden @ weight.t()).float()
        return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)

    return torch.compile(chunk_logps, dynamic=True)


def _compiled_chunked() -> Callable:
    """A step anyone can write: chunks of valid tokens through a compiled log_softmax, each checkpointed
    (its logits recomputed in backward), chunks sized to dpo_fast's default scratch budget."""
    fn = _compiled_chunk_logps()

    def logps(h, w, y):
        step = max(1, COMPILED_CHUNK_BYTES.get(h.device.type, 32 << 20) // (4 * w.shape[0]))
        return torch.cat(
            [checkpoint(fn, hc, w, yc, use_reentrant=False) for hc, yc in zip(h.split(step), y.split(step))]
        )

    return logps


# ----------------------------------------------------------------------------------------------
# Liger's DPO loss, the GEMM line, the CuTe-DSL probes


def _liger_step(batch: Batch, mode: str) -> Callable[[], StepOutputs]:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss, LigerFusedLinearKTOLoss, LigerFusedLinearSimPOLoss

    # compiled on GPU (its default); on CPU uncompiled, as the issue asks
    compiled = batch.hidden.is_cuda
    if mode == "kto":
        kto = LigerFusedLinearKTOLoss(beta=BETA, use_ref_model=False, compiled=compiled)
        preference = desirable(batch.case, batch.hidden.device)
        kl = torch.tensor(kto_kl(batch.case), device=batch.hidden.device)

        def kto_forward() -> StepOutputs:
            # (B, T, H) rows as Liger's unpaired base takes them; it returns sums over the desirable and the
            # undesirable rows, not per-row log-probs
            loss, _ = kto(batch.hidden, batch.weight, batch.labels, preference_labels=preference, kl=kl)
            return StepOutputs(loss=loss)

        return kto_forward
    if mode == "simpo":
        loss_fn = LigerFusedLinearSimPOLoss(beta=SIMPO_BETA, alpha=0.0, gamma=SIMPO_GAMMA, compiled=compiled)
    else:
        loss_fn = LigerFusedLinearDPOLoss(beta=BETA, use_ref_model=False, compiled=compiled)

    def forward() -> StepOutputs:
        loss, (chosen, rejected, *_) = loss_fn(batch.weight, batch.hidden, batch.labels)
        return StepOutputs(loss=None if mode == "forward" else loss, seq_logps=torch.cat([chosen, rejected]))

    return forward


def _gemm_step(batch: Batch, mode: str) -> Callable[[], StepOutputs]:
    """The mode's products on valid tokens, outputs preallocated: ``hW^T`` forward; ``dZ W``, ``dZ^T h`` backward."""
    hidden = batch.hidden.detach().reshape(-1, batch.case.hidden).index_select(0, batch.valid_index)
    weight = batch.weight.detach()
    logits = hidden.new_empty(hidden.shape[0], weight.shape[0])
    grad_logits = torch.randn_like(logits)
    grad_hidden, grad_weight = torch.empty_like(hidden), torch.empty_like(weight)
    products = GEMM_PRODUCTS[mode]

    def backward() -> None:
        torch.mm(grad_logits, weight, out=grad_hidden)
        if products == 3:
            torch.mm(grad_logits.t(), hidden, out=grad_weight)

    def forward() -> StepOutputs:
        torch.mm(hidden, weight.t(), out=logits)
        return StepOutputs(backward_fn=backward)

    return forward


def _cute_dsl_reason(module: str) -> Callable[[torch.device, torch.dtype], str | None]:
    def check(device: torch.device, dtype: torch.dtype) -> str:
        if importlib.util.find_spec("cutlass") is None or importlib.util.find_spec(module) is None:
            return CUTE_DSL_REASON
        return "installed, but this harness has no adapter for it yet (no GPU was at hand to write one against)"

    return check


def all_implementations() -> list[Implementation]:
    """Every implementation the harness knows, in report order."""
    per_token = [
        ("trl", "TRL 1.x fused LM head (trl.kernels.chunked_logprob), as its DPOTrainer calls it", _trl,
         _import_reason("trl.kernels.chunked_logprob", "pip install trl"), False),
        ("torch-lce", "torch.nn.functional.linear_cross_entropy(reduction='none', options=LinearCrossEntropyOptions())",
         _torch_lce, _torch_lce_reason, False),
        ("verl", "verl's Triton linear_cross_entropy (verl/utils/kernel)", _verl,
         _cuda_only(_verl_reason, "its Triton kernels"), False),
        ("cce", "Cut Cross-Entropy linear_cross_entropy(reduction='none'): impl 'cce' on GPU, 'torch_compile' on CPU",
         _cce, _import_reason("cut_cross_entropy", "pip install cut-cross-entropy"), True),
        ("compiled-chunked", "torch.compile'd log_softmax on checkpointed chunks of valid tokens", _compiled_chunked,
         lambda device, dtype: None, True),
    ]  # fmt: skip
    # the per-token peers are followed by the DPO loss: they run the DPO modes; those that can form
    # TRL's token metrics run the metrics mode too
    with_metrics = {"trl": _trl_with_metrics}
    dpo_modes = tuple(mode for mode in MODES if mode not in OBJECTIVE_MODES)
    plain_modes = tuple(mode for mode in dpo_modes if mode not in METRICS_MODES)
    return [
        *_dpo_fast_implementations(),
        Implementation("gemm", "the GEMM line: the mode's products on valid tokens, preallocated outputs", MODES,
                       lambda device, dtype: None, _gemm_step),
        *[Implementation(name, text, dpo_modes if name in with_metrics else plain_modes, reason,
                         _per_token_step(fn, with_metrics.get(name)), compiles)
          for name, text, fn, reason, compiles in per_token],
        Implementation("liger", "Liger-Kernel LigerFusedLinearDPOLoss, -SimPOLoss, -KTOLoss (compiled on GPU, "
                       "compiled=False on CPU)", ("dpo", "frozen", "forward", *OBJECTIVE_MODES),
                       _import_reason("liger_kernel.chunked_loss", "pip install liger-kernel"), _liger_step),
        Implementation("quack", "QuACK chunked_linear_cross_entropy (CuTe DSL; scalar CE only)", (),
                       _cute_dsl_reason("quack"), None),
        Implementation("liger-cute", "Liger LigerFusedLinearScaledCrossEntropy (CuTe DSL, Hopper)", (),
                       _cute_dsl_reason("liger_kernel"), None),
    ]  # fmt: skip
