"""``FastDPOTrainer``: TRL's ``DPOTrainer`` with dpo_fast computing the log-probs and the loss.

Change one import, keep the ``DPOConfig``::

    from dpo_fast.integrations.trl import FastDPOTrainer   # instead of: from trl import DPOTrainer

    trainer = FastDPOTrainer(model=model, args=DPOConfig(...), train_dataset=data, processing_class=tokenizer)

Everything but the LM head and the loss is TRL's own: data preparation and collation, the reference
model (a copy, a PEFT policy with its adapters disabled, or log-probs precomputed before training),
the training loop, logging. The policy's loss and gradients come from
``dpo_fast.fused_linear_dpo_loss`` on its last hidden states (the LM-head gradients formed in the
forward pass, prompt and padding tokens never multiplied) and the reference log-probs from
``dpo_fast.sequence_logps``: never the ``N x V`` logits. Both run inside the model's forward
(``dpo_fast.integrations.hf``), so wrappers that shard parameters see an ordinary forward.

Tested with TRL 1.16 (the ``trl`` extra pins the range). Each ``DPOConfig`` option that changes the
math and that dpo_fast does not implement raises a ``ValueError`` naming it; none is dropped silently.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from transformers.utils import ModelOutput
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import maybe_gather_lm_head_ctx, use_adapter

import dpo_fast

from .. import validate
from .hf import HeadParams, add_dpo_fast_head
from .token_stats import token_stats

IGNORE_INDEX = -100
_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}

# TRL 1.16 loss type -> (dpo_fast loss type, on length-averaged log-probs, takes label_smoothing).
# TRL's "sigmoid" ignores label_smoothing (cDPO is dpo_fast's sigmoid with label_smoothing > 0).
PAIR_LOSSES = {
    "sigmoid": ("sigmoid", False, False),
    "sigmoid_norm": ("sigmoid", True, False),
    "robust": ("robust", False, True),
    "hinge": ("hinge", False, False),
    "ipo": ("ipo", True, False),
    "exo_pair": ("exo_pair", False, True),
    "nca_pair": ("nca_pair", False, False),
    "bco_pair": ("bco_pair", False, False),
    "sppo_hard": ("sppo_hard", False, False),
    "apo_zero": ("apo_zero", False, False),
    "apo_down": ("apo_down", False, False),
}
REFUSED_LOSSES = {
    "aot": "it sorts the log-ratios across the batch, so a pair's gradient is not its own",
    "aot_unpaired": "it sorts the log-ratios across the batch, so a pair's gradient is not its own",
    "discopop": "it needs discopop_tau, which dpo_fast's objectives do not take yet",
}


@dataclass(frozen=True)
class TrlObjective:
    """TRL's loss as dpo_fast computes it: ``weight * mean pair loss + sft_weight * chosen-token NLL``.

    Attributes:
        loss_type: dpo_fast's name of the pairwise loss (``dpo_fast.LOSS_TYPES``).
        average_log_prob: the pair loss sees length-averaged log-ratios (TRL's ipo, sigmoid_norm).
        label_smoothing: what TRL 1.16 applies for this loss type (0 where it ignores the option).
        weight, sft_weight: the ``loss_weights`` of the pair loss and of ``"sft"`` (0 without it).
    """

    loss_type: str
    beta: float
    label_smoothing: float
    average_log_prob: bool
    weight: float
    sft_weight: float


def trl_objective(args: DPOConfig) -> TrlObjective:
    """The objective of a ``DPOConfig``, or a ``ValueError`` naming the option dpo_fast cannot honour."""
    _refuse_unsupported_options(args)
    loss_types = list(args.loss_type)
    weights = list(args.loss_weights or [1.0] * len(loss_types))
    for loss_type in loss_types:
        if loss_type in REFUSED_LOSSES:
            raise ValueError(
                f"FastDPOTrainer does not support DPOConfig(loss_type={loss_type!r}): {REFUSED_LOSSES[loss_type]}. "
                f"Use one of {sorted(PAIR_LOSSES)} (optionally with 'sft'), or trl.DPOTrainer for this loss."
            )
        if loss_type not in PAIR_LOSSES and loss_type != "sft":
            raise ValueError(f"DPOConfig(loss_type={loss_type!r}) is not a loss type TRL 1.16 knows")
    pair_types = [t for t in loss_types if t != "sft"]
    if len(pair_types) != 1 or loss_types.count("sft") > 1:
        raise ValueError(
            f"FastDPOTrainer supports one pairwise loss type, optionally with 'sft' (RPO's NLL term); got "
            f"DPOConfig(loss_type={loss_types}). Combine several pairwise losses with trl.DPOTrainer."
        )
    name, average, takes_smoothing = PAIR_LOSSES[pair_types[0]]
    label_smoothing = args.label_smoothing if takes_smoothing else 0.0
    validate.check_objective(args.beta, name, label_smoothing)
    return TrlObjective(
        loss_type=name,
        beta=args.beta,
        label_smoothing=label_smoothing,
        average_log_prob=average,
        weight=weights[loss_types.index(pair_types[0])],
        sft_weight=weights[loss_types.index("sft")] if "sft" in loss_types else 0.0,
    )


def _refuse_unsupported_options(args: DPOConfig) -> None:
    if args.ld_alpha is not None:
        raise ValueError(
            f"FastDPOTrainer does not support DPOConfig(ld_alpha={args.ld_alpha}) (LD-DPO's weighting of the tokens "
            "past the shared length): set ld_alpha=None, or use trl.DPOTrainer"
        )
    if args.use_weighting:
        raise ValueError(
            "FastDPOTrainer does not support DPOConfig(use_weighting=True) (WPO's pair weights need sum_v p_v^2 per "
            "token): set use_weighting=False, or use trl.DPOTrainer"
        )
    reverse_kl = args.f_divergence_type == "reverse_kl" or (
        args.f_divergence_type == "alpha_divergence" and abs(args.f_alpha_divergence_coef - 1.0) < 1e-6
    )  # TRL's alpha-divergence at alpha = 1 is reverse KL
    if not reverse_kl:
        raise ValueError(
            f"FastDPOTrainer does not support DPOConfig(f_divergence_type={args.f_divergence_type!r}): only "
            "'reverse_kl' (standard DPO); use trl.DPOTrainer for f-DPO"
        )


@dataclass
class PolicyOutput(ModelOutput):
    """What the policy's forward returns under ``FastDPOTrainer``.

    Attributes:
        loss: () float32, differentiable.
        logps: (2P,) float32 summed completion log-probs, chosen rows first, detached.
        entropy, mean_logit, is_top1: (2P, T-1) per-token statistics, or None without ``token_metrics``.
    """

    loss: torch.Tensor | None = None
    logps: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    mean_logit: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None


@dataclass
class ReferenceOutput(ModelOutput):
    """``logps``: (2P,) float32 summed completion log-probs of the reference model."""

    logps: torch.Tensor | None = None


@dataclass
class PolicyHead:
    """The loss on the policy's hidden states; called inside the model's forward (``add_dpo_fast_head``).

    Attributes:
        ref_logps: (2P,) summed reference log-probs, chosen rows first.
    """

    ref_logps: torch.Tensor
    objective: TrlObjective
    token_metrics: bool
    backend: str

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor, head: HeadParams) -> PolicyOutput:
        """hidden: (2P, T-1, H); labels: (2P, T-1) int64, -100 off the completions."""
        objective, pairs = self.objective, hidden.shape[0] // 2
        hidden, bias = head.prepare(hidden)
        counts = (labels != IGNORE_INDEX).sum(1)
        ref = self.ref_logps.to(device=hidden.device, dtype=torch.float32)
        if objective.average_log_prob:
            ref = ref / counts.clamp(min=1)
        with torch.autocast(hidden.device.type, enabled=False):
            out = dpo_fast.fused_linear_dpo_loss(
                hidden, head.weight, labels, bias=bias, ref_chosen_logps=ref[:pairs], ref_rejected_logps=ref[pairs:],
                beta=objective.beta, loss_type=objective.loss_type, label_smoothing=objective.label_smoothing,
                average_log_prob=objective.average_log_prob, softcap=head.softcap, ignore_index=IGNORE_INDEX,
                backend=self.backend,
            )  # fmt: skip
            logps = torch.cat([out.chosen_logps, out.rejected_logps])
            if objective.average_log_prob:
                logps = logps * counts
            loss = objective.weight * out.loss
            if objective.sft_weight:
                # TRL's "sft": the mean NLL over all chosen completion tokens of the batch
                loss = loss - objective.sft_weight * logps[:pairs].sum() / counts[:pairs].sum().clamp(min=1)
            stats = None
            if self.token_metrics:
                stats = token_stats(hidden.detach(), head.weight, labels, bias=bias, softcap=head.softcap)
        return PolicyOutput(
            loss=loss,
            logps=logps.detach(),
            entropy=None if stats is None else stats.entropy,
            mean_logit=None if stats is None else stats.mean_logit,
            is_top1=None if stats is None else stats.is_top1,
        )


@dataclass
class ReferenceHead:
    """Summed completion log-probs of the reference model, forward only; called inside its forward."""

    backend: str

    def __call__(self, hidden: torch.Tensor, labels: torch.Tensor, head: HeadParams) -> ReferenceOutput:
        hidden, bias = head.prepare(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            logps = dpo_fast.sequence_logps(
                hidden, head.weight, labels, bias=bias, softcap=head.softcap, ignore_index=IGNORE_INDEX,
                backend=self.backend,
            )  # fmt: skip
        return ReferenceOutput(logps=logps)


class FastDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` with the log-probs and the loss from dpo_fast; same arguments, same logs.

    Args (besides ``DPOTrainer``'s):
        token_metrics: log TRL's per-token diagnostics (``entropy``, ``logits/chosen``,
            ``logits/rejected``, ``mean_token_accuracy``). They take a forward-only pass over the
            vocabulary (``2*N*H*V`` FLOPs on the completion tokens, a third of the fused loss's
            ``6*N*H*V``); ``False`` skips that pass and those four metrics.
        backend: dpo_fast's backend ("auto": Triton on CUDA, chunked PyTorch elsewhere).
    """

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, *trainer_args,
                 token_metrics: bool = True, backend: str = "auto", **trainer_kwargs):  # fmt: skip
        validate.check_backend(backend)
        if args is not None:
            trl_objective(args)  # refuse before TRL loads, tokenizes or precomputes anything
        self._token_metrics, self._backend = token_metrics, backend
        super().__init__(model, ref_model, args, *trainer_args, **trainer_kwargs)
        self._objective = trl_objective(self.args)
        if self.aux_loss_enabled:
            raise ValueError(
                f"FastDPOTrainer does not add the MoE load-balancing loss (router_aux_loss_coef="
                f"{self.router_aux_loss_coef}): set DPOConfig(router_aux_loss_coef=0.0), or use trl.DPOTrainer"
            )
        for module in (self.model, self.ref_model):
            if module is not None:
                self._install_head(module)

    def _install_head(self, model: torch.nn.Module) -> None:
        causal_lm = self.accelerator.unwrap_model(model)
        if is_peft_model(causal_lm):
            causal_lm = causal_lm.get_base_model()
        add_dpo_fast_head(causal_lm, gather=maybe_gather_lm_head_ctx)

    def _reference_context(self) -> contextlib.AbstractContextManager:
        """A PEFT policy without a separate reference runs as the reference with its adapters off (or "ref" on)."""
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    def _reference_logps(self, model: torch.nn.Module, model_kwargs: dict, labels: torch.Tensor) -> torch.Tensor:
        """(2P,) summed reference log-probs, as TRL's reference pass computes them."""
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._reference_context(),
            self.accelerator.autocast(),
        ):
            return model(**model_kwargs, labels=labels, dpo_fast_head=ReferenceHead(self._backend)).logps

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch (TRL calls it to precompute them): (P,), (P,)."""
        self._install_head(model)
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
        return self._reference_logps(model, model_kwargs, labels).chunk(2)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, IGNORE_INDEX)
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        if self._objective.average_log_prob and bool(completion_mask[:, 0].any()):
            raise ValueError(
                "a completion starts at the first token of its sequence (an empty prompt): TRL's length-averaged "
                "losses (ipo, sigmoid_norm) then count a token that has no log-prob, which dpo_fast does not. "
                "Give every example a non-empty prompt (e.g. a BOS token), or use trl.DPOTrainer"
            )
        if self.precompute_ref_logps:
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        else:
            ref_model = self.model if self.ref_model is None else self.ref_model
            ref_logps = self._reference_logps(ref_model, model_kwargs, labels)
        head = PolicyHead(ref_logps, self._objective, self._token_metrics, self._backend)
        outputs = model(**model_kwargs, labels=labels, dpo_fast_head=head)
        self._record_metrics(mode, inputs, outputs, ref_logps)
        if not return_outputs:
            return outputs.loss
        warnings.warn(
            "`return_outputs=True` (logits for `compute_metrics`) recomputes the full logits with an extra forward "
            "pass, as TRL does; it is deprecated in TRL and will be removed in v2.0.0.",
            FutureWarning,
            stacklevel=2,
        )
        with torch.no_grad():
            return outputs.loss, model(**model_kwargs)

    def _record_metrics(self, mode: str, inputs: dict, outputs: PolicyOutput, ref_logps: torch.Tensor) -> None:
        """Append this step's metrics under TRL 1.16's names, gathered across processes as TRL gathers them."""
        metrics, gather = self._metrics[mode], self.accelerator.gather
        if outputs.entropy is not None:
            self._record_token_metrics(metrics, inputs["completion_mask"][:, 1:], outputs)
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        chosen_logps, rejected_logps = outputs.logps.chunk(2)
        chosen_rewards, rejected_rewards = (self.beta * (outputs.logps - ref_logps.to(outputs.logps))).chunk(2)
        metrics["rewards/chosen"].append(gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(gather(chosen_logps).mean().item())
        metrics["logps/rejected"].append(gather(rejected_logps).mean().item())

    def _record_token_metrics(self, metrics: dict, mask: torch.Tensor, outputs: PolicyOutput) -> None:
        """entropy (all completion tokens), logits/chosen, logits/rejected, mean_token_accuracy (chosen tokens).

        mask: (2P, T-1) the shifted completion mask; prompt-learning PEFT prepends virtual tokens to
        the outputs, so only their last T-1 positions are the real ones.
        """
        gather, length = self.accelerator.gather_for_metrics, mask.shape[1]
        entropy, mean_logit, is_top1 = (t[:, -length:] for t in (outputs.entropy, outputs.mean_logit, outputs.is_top1))

        def mean_over(values: torch.Tensor, where: torch.Tensor) -> float:
            total, count = gather(values[where].sum()).sum().item(), gather(where.sum()).sum().item()
            return total / count if count > 0 else 0.0

        mask = mask.bool()
        chosen, rejected = mask.chunk(2)
        metrics["entropy"].append(mean_over(entropy, mask))
        metrics["logits/chosen"].append(mean_over(mean_logit.chunk(2)[0], chosen))
        metrics["logits/rejected"].append(mean_over(mean_logit.chunk(2)[1], rejected))
        metrics["mean_token_accuracy"].append(mean_over(is_top1.chunk(2)[0].float(), chosen))
