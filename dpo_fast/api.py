"""The public functions: thin wrappers that build a head, a token layout and an objective, and call ``core``.

Arguments every entry shares (``docs/api.md`` has the whole contract):

- ``hidden``: (R, T, H) padded rows, or (N, H) packed with ``segment_ids`` (N,) giving each token's sequence;
  float32/bf16/fp16 (float64: reference, torch and cpp backends). Pairwise losses: R = 2P, rows [0, P) chosen,
  [P, 2P) rejected (TRL's order).
- ``weight``: (V, H) the lm_head weight; ``bias``: (V,) or None; ``softcap``: the model's
  ``final_logit_softcapping`` or None. ``labels``: hidden's leading shape, int64, ``labels[t]`` the target of
  ``hidden[t]`` (already shifted), ``ignore_index`` on prompt and padding (never multiplied).
- ``backend``: "auto" | "reference" | "torch" | "triton" | "cpp" | "cuda" (``dpo_fast.backends.resolve``);
  ``scratch_mib``: the memory budget of one chunk of tokens (default by device, ``chunking.DEFAULT_SCRATCH_MIB``).
- ``grads_in_forward``: None (default) forms the gradients during the call on the chunked backends (``6*N*H*V``
  FLOPs, ``backward`` only scales them); False recomputes the logits in backward (``8*N*H*V``).
- ``return_token_metrics``: also return the policy's per-token entropy, mean logit and top-1 flag, from the
  pass that forms the log-probs.

Precision: the head's product runs in the hidden states' dtype, or autocast's under ``torch.autocast``
(``dpo_fast.head``); statistics and losses are float32 (float64 for float64 inputs); gradients come back in each
input's dtype. Bad input raises a ``ValueError`` naming the argument; ``-inf`` logits take no probability;
``+inf``/NaN logits give NaN; under ``torch.compile`` out-of-range labels give NaN. The losses are differentiable
once (a ``create_graph=True`` backward raises); ``torch.func`` transforms are refused on the chunked backends.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import core, objectives, validate
from . import layout as layout_lib
from .head import LMHead
from .layout import IGNORE_INDEX, TokenLayout
from .outputs import DPOOutput, KTOOutput, kto_output, pair_output


def token_logps(hidden, weight, labels, *, bias=None, softcap: float | None = None, temperature: float = 1.0,
                ignore_index: int = IGNORE_INDEX, return_entropy: bool = False, backend: str = "auto",
                scratch_mib: float | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-token log-probs ``log softmax(z)[y]``, ``z = softcap*tanh((h W^T + b)/softcap) / temperature``.

    ``hidden`` may have any leading shape. Returns labels' shape, float32 (float64 for float64 inputs), 0 at
    ignored tokens; with ``return_entropy`` also each token's entropy. Both differentiable w.r.t. hidden, weight
    and bias for any upstream gradient.
    """
    validate.check_flag("return_entropy", return_entropy)
    head, layout = _head_and_layout(hidden, weight, labels, bias, softcap, ignore_index, temperature=temperature)
    logp, metrics = core.token_logps(hidden, layout, head, with_metrics=return_entropy, backend=backend,
                                     scratch_mib=scratch_mib)  # fmt: skip
    return (layout.per_token(logp), layout.per_token(metrics[0])) if return_entropy else layout.per_token(logp)


def sequence_logps(hidden, weight, labels, *, bias=None, ignore_index: int = IGNORE_INDEX,
                   average_log_prob: bool = False, softcap: float | None = None, temperature: float = 1.0,
                   segment_ids=None, num_segments: int | None = None, backend: str = "auto",
                   scratch_mib: float | None = None) -> torch.Tensor:  # fmt: skip
    """(R,) summed (``average_log_prob``: averaged, 0 for an empty sequence) completion log-probs per sequence, e.g.
    a reference model's under ``torch.no_grad()``. Packed input: ``num_segments`` defaults to ``segment_ids.max() +
    1``. Float32 (float64 for float64 inputs), differentiable w.r.t. hidden, weight and bias."""
    validate.check_flag("average_log_prob", average_log_prob)
    if segment_ids is None and isinstance(hidden, torch.Tensor) and hidden.dim() != 3:
        raise ValueError(f"hidden must be (R, T, H) for padded input, got {tuple(hidden.shape)}; for packed (N, H) "
                         "input pass segment_ids")  # fmt: skip
    head, layout = _head_and_layout(hidden, weight, labels, bias, softcap, ignore_index, segment_ids, num_segments,
                                    temperature=temperature)  # fmt: skip
    sums, counts = core.sequence_sums(hidden, layout, head, backend=backend, scratch_mib=scratch_mib)
    return sums / counts.clamp(min=1).to(sums.dtype) if average_log_prob else sums


def fused_linear_dpo_loss(hidden, weight, labels, *, bias=None, ref_chosen_logps=None, ref_rejected_logps=None,
                          beta: float = 0.1, loss_type: str | Sequence[str] = "sigmoid",
                          loss_weights: Sequence[float] | None = None, label_smoothing: float = 0.0,
                          f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
                          discopop_tau: float = 0.05, use_weighting: bool = False, ld_alpha: float | None = None,
                          reference_free: bool = False, average_log_prob: bool | None = None,
                          softcap: float | None = None, ignore_index: int = IGNORE_INDEX, segment_ids=None,
                          num_pairs: int | None = None, backend: str = "auto", scratch_mib: float | None = None,
                          grads_in_forward: bool | None = None, return_token_metrics: bool = False,
                          objective: objectives.DPOObjective | None = None) -> DPOOutput:  # fmt: skip
    """The DPO loss, every loss type of TRL 1.16's ``DPOTrainer``, from the last hidden states and the lm_head.

    ``ref_chosen_logps``, ``ref_rejected_logps``: (P,) the reference model's log-probs in the returned ones' units
    (length-averaged where the objective averages, LD-DPO-weighted with ``ld_alpha``), constants; not needed with
    ``reference_free=True`` or ``loss_type="sft"`` alone. ``loss_type``: one of ``dpo_fast.LOSS_TYPES`` or several
    (summed with ``loss_weights``); ``label_smoothing``: cDPO's flip rate for ``sigmoid`` and ``sigmoid_norm`` (TRL's
    sigmoid has none: ``objectives.trl_dpo_objective``), ``robust``'s, EXO's epsilon, ``aot``'s; f-divergences,
    ``discopop_tau``, WPO's ``use_weighting``, LD-DPO's ``ld_alpha`` as TRL 1.16; ``average_log_prob``: None is per
    loss type (``ipo``, ``sigmoid_norm``). ``num_pairs``: P for packed input without reference log-probs.
    ``objective``: a prebuilt ``objectives.DPOObjective`` in place of those keywords (which must keep their
    defaults). ``aot``/``aot_unpaired`` sort across the batch: their gradients wait for every pair's log-probs.
    """
    options = dict(beta=beta, loss_type=loss_type, loss_weights=loss_weights, label_smoothing=label_smoothing,
                   f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
                   discopop_tau=discopop_tau, use_weighting=use_weighting, ld_alpha=ld_alpha,
                   average_log_prob=average_log_prob)  # fmt: skip
    objective = _objective_or_options(objective, options, objectives.dpo_objective)
    validate.check_flag("reference_free", reference_free)
    pairs = layout_lib.pair_count(hidden, segment_ids, num_pairs, None if reference_free else ref_chosen_logps)
    head, layout = _head_and_layout(hidden, weight, labels, bias, softcap, ignore_index, segment_ids, 2 * pairs)
    ref = None
    if objective.needs.reference and not reference_free:
        validate.check_reference(ref_chosen_logps, ref_rejected_logps, pairs, hidden.device)
        ref = torch.cat([ref_chosen_logps, ref_rejected_logps]).detach()
    result = core.preference_loss(
        objective, hidden, layout, head,
        ref_sums=None if ref is None else objectives.sums_of_reported(objective, ref.double(), layout.counts()),
        backend=backend, scratch_mib=scratch_mib, grads_in_forward=grads_in_forward,
        token_metrics=return_token_metrics,
    )  # fmt: skip
    return pair_output(objective, result, ref)


def fused_linear_cpo_loss(hidden, weight, labels, *, bias=None, beta: float = 0.1, loss_type: str = "sigmoid",
                          label_smoothing: float = 0.0, nll_weight: float = 1.0, simpo_gamma: float = 0.5,
                          alpha: float = 0.0, average_log_prob: bool | None = None, softcap: float | None = None,
                          ignore_index: int = IGNORE_INDEX, segment_ids=None, num_pairs: int | None = None,
                          backend: str = "auto", scratch_mib: float | None = None,
                          grads_in_forward: bool | None = None, return_token_metrics: bool = False) -> DPOOutput:  # fmt: skip
    """CPO, SimPO and AlphaPO (TRL 1.16's ``CPOTrainer``): reference-free, plus ``nll_weight`` (TRL's ``cpo_alpha``)
    times the NLL of the chosen completion tokens, from one pass (``objectives.CPOObjective``). ``loss_type``: one
    of ``dpo_fast.CPO_LOSS_TYPES``; ``num_pairs``: P, required for packed input."""
    objective = objectives.CPOObjective(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                        nll_weight=nll_weight, simpo_gamma=simpo_gamma, alpha=alpha,
                                        average_log_prob=average_log_prob)  # fmt: skip
    pairs = layout_lib.pair_count(hidden, segment_ids, num_pairs, None)
    head, layout = _head_and_layout(hidden, weight, labels, bias, softcap, ignore_index, segment_ids, 2 * pairs)
    result = core.preference_loss(objective, hidden, layout, head, backend=backend, scratch_mib=scratch_mib,
                                  grads_in_forward=grads_in_forward, token_metrics=return_token_metrics)  # fmt: skip
    return pair_output(objective, result, None)


def fused_linear_orpo_loss(hidden, weight, labels, *, bias=None, beta: float = 0.1, nll_labels=None,
                           softcap: float | None = None, ignore_index: int = IGNORE_INDEX, segment_ids=None,
                           num_pairs: int | None = None, backend: str = "auto", scratch_mib: float | None = None,
                           grads_in_forward: bool | None = None, return_token_metrics: bool = False) -> DPOOutput:  # fmt: skip
    """ORPO (TRL 1.16's ``ORPOTrainer``): the NLL of the chosen tokens minus ``beta`` times the mean ``logsigmoid``
    of the log odds ratio of the averaged log-probs, from one pass. ``nll_labels``: the NLL's targets (default
    ``labels``; TRL's ORPO takes the chosen prompt too: the shifted input ids with only padding masked). An empty
    completion raises a ``ValueError`` (under ``torch.compile``, where it cannot, the loss is NaN)."""
    objective = objectives.ORPOObjective(beta=beta)
    pairs = layout_lib.pair_count(hidden, segment_ids, num_pairs, None)
    head, layout = _head_and_layout(hidden, weight, labels, bias, softcap, ignore_index, segment_ids, 2 * pairs)
    if nll_labels is not None:
        validate.check_nll_labels(nll_labels, labels, head.vocab, ignore_index)
    if not torch.compiler.is_compiling() and bool((layout.counts() == 0).any()):
        empty = int((layout.counts() == 0).nonzero()[0])
        raise ValueError(
            f"labels: sequence {empty} has no completion token; ORPO's odds of an empty completion (average log-prob "
            "0, probability 1) are infinite and its loss undefined. Give every completion a token"
        )
    result = core.preference_loss(objective, hidden, layout, head, nll_labels=nll_labels, backend=backend,
                                  scratch_mib=scratch_mib, grads_in_forward=grads_in_forward,
                                  token_metrics=return_token_metrics)  # fmt: skip
    return pair_output(objective, result, None)


def fused_linear_kto_loss(hidden, weight, labels, *, desirable, ref_logps=None, kl=None, bias=None, beta: float = 0.1,
                          loss_type: str = "kto", desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                          reference_free: bool = False, softcap: float | None = None,
                          ignore_index: int = IGNORE_INDEX, segment_ids=None, backend: str = "auto",
                          scratch_mib: float | None = None, grads_in_forward: bool | None = None,
                          return_token_metrics: bool = False) -> KTOOutput:  # fmt: skip
    """KTO (TRL 1.16's ``KTOTrainer``) on B unpaired completions, from one pass (``objectives.KTOObjective``).

    ``desirable``: (B,) bool (TRL's ``label``); ``ref_logps``: (B,) summed reference log-probs (not needed with
    ``reference_free=True``); ``kl``: the batch's KL estimate, a number or () tensor treated as a constant
    (``objectives.kto_kl_estimate``), required for ``loss_type="kto"`` (0.0 for none), unused by
    ``apo_zero_unpaired``. ``hidden``: (B, T, H), or (N, H) packed with ``segment_ids`` in [0, B).
    """
    objective = objectives.KTOObjective(beta=beta, loss_type=loss_type, desirable_weight=desirable_weight,
                                        undesirable_weight=undesirable_weight)  # fmt: skip
    validate.check_flag("reference_free", reference_free)
    size = layout_lib.sequence_count(hidden, segment_ids, desirable)
    validate.check_desirable(desirable, size, hidden.device)
    if objective.needs.kl:
        validate.check_kl(kl, hidden.device)
    head, layout = _head_and_layout(hidden, weight, labels, bias, softcap, ignore_index, segment_ids, size)
    if not reference_free:
        validate.check_reference_logps(ref_logps, size, hidden.device)
    ref = None if reference_free else ref_logps.detach()
    result = core.preference_loss(
        objective, hidden, layout, head, ref_sums=ref, desirable=desirable, kl=kl if objective.needs.kl else 0.0,
        backend=backend, scratch_mib=scratch_mib, grads_in_forward=grads_in_forward,
        token_metrics=return_token_metrics,
    )  # fmt: skip
    return kto_output(objective, result, ref)


class FusedLinearDPOLoss(torch.nn.Module):
    """``fused_linear_dpo_loss`` as a module holding the objective (its keywords, or ``objective=``) and options.

    ``forward(hidden, weight, labels, ref_chosen_logps=None, ref_rejected_logps=None, bias=None, segment_ids=None,
    num_pairs=None) -> DPOOutput``.
    """

    def __init__(self, beta: float = 0.1, loss_type: str | Sequence[str] = "sigmoid", label_smoothing: float = 0.0,
                 reference_free: bool = False, average_log_prob: bool | None = None, softcap: float | None = None,
                 ignore_index: int = IGNORE_INDEX, backend: str = "auto", scratch_mib: float | None = None,
                 grads_in_forward: bool | None = None, return_token_metrics: bool = False,
                 objective: objectives.DPOObjective | None = None, **objective_options):  # fmt: skip
        super().__init__()
        options = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                       average_log_prob=average_log_prob, **objective_options)  # fmt: skip
        self.objective = _objective_or_options(objective, options, objectives.dpo_objective)
        validate.check_backend(backend)
        self.options = dict(reference_free=reference_free, softcap=softcap, ignore_index=ignore_index,
                            backend=backend, scratch_mib=scratch_mib, grads_in_forward=grads_in_forward,
                            return_token_metrics=return_token_metrics)  # fmt: skip

    def forward(self, hidden, weight, labels, ref_chosen_logps=None, ref_rejected_logps=None, bias=None,
                segment_ids=None, num_pairs=None) -> DPOOutput:  # fmt: skip
        return fused_linear_dpo_loss(hidden, weight, labels, bias=bias, ref_chosen_logps=ref_chosen_logps,
                                     ref_rejected_logps=ref_rejected_logps, segment_ids=segment_ids,
                                     num_pairs=num_pairs, objective=self.objective, **self.options)  # fmt: skip

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in {"objective": self.objective, **self.options}.items())


def _objective_or_options(objective, options: dict, build) -> objectives.DPOObjective:
    """``objective`` when given (then every option must keep its default), else ``build(**options)``."""
    if objective is None:
        options = dict(options)
        return build(options.pop("loss_type"), **options)
    if not isinstance(objective, objectives.DPOObjective):
        raise ValueError(f"objective must be a dpo_fast.objectives.DPOObjective or None, got {objective!r}")
    defaults = dict(beta=0.1, loss_type="sigmoid", loss_weights=None, label_smoothing=0.0,
                    f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05,
                    use_weighting=False, ld_alpha=None, average_log_prob=None)  # fmt: skip
    given = [name for name, value in options.items() if name not in defaults or value != defaults[name]]
    if given:
        raise ValueError(f"objective= replaces the objective's keywords; got also {given}: set them in the objective")
    return objective


def _head_and_layout(hidden, weight, labels, bias, softcap, ignore_index, segment_ids=None, num_sequences=None, *,
                     temperature: float = 1.0) -> tuple[LMHead, TokenLayout]:  # fmt: skip
    head = LMHead(weight, bias, softcap, temperature)
    head.check(hidden)
    layout = TokenLayout.of(hidden, labels, vocab=head.vocab, segment_ids=segment_ids, num_sequences=num_sequences,
                            ignore_index=ignore_index)  # fmt: skip
    return head, layout
