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

from .. import objectives, validate
from .hf import HeadRows, LMHead, add_dpo_fast_head, token_metric_means, token_metric_sums
from .prefix_sharing import check_model, collate_shared, pairs_from_trl_batch

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
    objectives.dpo_objective(name, beta=args.beta, label_smoothing=label_smoothing)
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
        token_sums: (8,) float64 sums and counts behind TRL's per-token metrics (``hf.token_metric_sums``), from
            the fused pass; None without ``token_metrics``.
    """

    loss: torch.Tensor | None = None
    logps: torch.Tensor | None = None
    token_sums: torch.Tensor | None = None


@dataclass
class ReferenceOutput(ModelOutput):
    """``logps``: (2P,) float32 summed completion log-probs of the reference model."""

    logps: torch.Tensor | None = None


@dataclass
class PolicyHead:
    """The loss on the policy's rows; called inside the model's forward (``hf.add_dpo_fast_head``).

    Attributes:
        ref_logps: (2P,) summed reference log-probs, chosen rows first.
    """

    ref_logps: torch.Tensor
    objective: TrlObjective
    token_metrics: bool
    backend: str

    def __call__(self, rows: HeadRows, head: LMHead) -> PolicyOutput:
        objective, pairs = self.objective, rows.pairs
        counts = rows.completion_lengths()
        ref = self.ref_logps.to(device=rows.hidden.device, dtype=torch.float32)
        if objective.average_log_prob:
            ref = ref / counts.clamp(min=1)
        out = head.dpo_loss(
            rows, ref_chosen_logps=ref[:pairs], ref_rejected_logps=ref[pairs:], beta=objective.beta,
            loss_type=objective.loss_type, label_smoothing=objective.label_smoothing,
            average_log_prob=objective.average_log_prob, return_token_metrics=self.token_metrics, backend=self.backend,
        )  # fmt: skip
        logps = torch.cat([out.chosen_logps, out.rejected_logps])
        if objective.average_log_prob:
            logps = logps * counts
        loss = objective.weight * out.loss
        if objective.sft_weight:
            # TRL's "sft": the mean NLL over all chosen completion tokens of the batch
            loss = loss - objective.sft_weight * logps[:pairs].sum() / counts[:pairs].sum().clamp(min=1)
        token_sums = token_metric_sums(out.token_metrics, rows) if self.token_metrics else None
        return PolicyOutput(loss=loss, logps=logps.detach(), token_sums=token_sums)


@dataclass
class ReferenceHead:
    """Summed completion log-probs of the reference model, forward only; called inside its forward."""

    backend: str

    def __call__(self, rows: HeadRows, head: LMHead) -> ReferenceOutput:
        return ReferenceOutput(logps=head.sequence_logps(rows, backend=self.backend))


class FastDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` with the log-probs and the loss from dpo_fast; same arguments, same logs.

    Args (besides ``DPOTrainer``'s):
        token_metrics: log TRL's per-token diagnostics (``entropy``, ``logits/chosen``,
            ``logits/rejected``, ``mean_token_accuracy``). They come from the fused pass that forms the
            log-probs (no extra product over the vocabulary: ``6*N*H*V`` FLOPs per step with a
            trainable head, as without them); ``False`` skips their few operations per logit in that
            pass, and the metrics.
        prefix_sharing: an extension of TRL's semantics, off by default: each pair runs through the
            model as one sequence ``[prompt][chosen][rejected]`` whose mask and positions give every
            completion token exactly what it sees alone (``dpo_fast.integrations.prefix_sharing``),
            so the prompt runs once; the reference pass (live or precomputed) shares it too. The
            losses, log-probs, gradients and logs are TRL's within float32 rounding. Models the layout
            cannot reproduce exactly are refused at construction (``prefix_sharing.check_model``), as
            are ``truncation_mode="keep_end"`` (it cuts a pair's two prompts apart) and vision data.
        backend: dpo_fast's backend ("auto": Triton on CUDA, the C++ kernel on CPU once built, else chunked PyTorch).
    """

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, *trainer_args,
                 token_metrics: bool = True, prefix_sharing: bool = False, backend: str = "auto",
                 **trainer_kwargs):  # fmt: skip
        validate.check_backend(backend)
        for flag, value in (("token_metrics", token_metrics), ("prefix_sharing", prefix_sharing)):
            validate.check_flag(flag, value)
        if args is not None:
            trl_objective(args)  # refuse before TRL loads, tokenizes or precomputes anything
            if prefix_sharing and args.truncation_mode == "keep_end" and args.max_length is not None:
                raise ValueError(
                    "FastDPOTrainer(prefix_sharing=True) needs DPOConfig(truncation_mode='keep_start'): 'keep_end' "
                    "cuts each sequence's prompt by its own length, so a pair's two prompts may differ"
                )
        self._token_metrics, self._prefix_sharing, self._backend = token_metrics, prefix_sharing, backend
        super().__init__(model, ref_model, args, *trainer_args, **trainer_kwargs)
        self._objective = trl_objective(self.args)
        if self.aux_loss_enabled:
            raise ValueError(
                f"FastDPOTrainer does not add the MoE load-balancing loss (router_aux_loss_coef="
                f"{self.router_aux_loss_coef}): set DPOConfig(router_aux_loss_coef=0.0), or use trl.DPOTrainer"
            )
        if prefix_sharing and self._is_vision_dataset:
            raise ValueError("FastDPOTrainer(prefix_sharing=True) takes text-only preference data, not vision data")
        for module, trains in ((self.model, True), (self.ref_model, False)):
            if module is not None:
                causal_lm = self._install_head(module)
                if prefix_sharing:
                    check_model(causal_lm, self.accelerator.device if trains else None)

    def _install_head(self, model: torch.nn.Module) -> torch.nn.Module:
        """Patch the causal LM inside ``model``'s wrappers (``hf.add_dpo_fast_head``); returns that causal LM."""
        causal_lm = self.accelerator.unwrap_model(model)
        if is_peft_model(causal_lm):
            causal_lm = causal_lm.get_base_model()
        add_dpo_fast_head(causal_lm, gather=maybe_gather_lm_head_ctx)
        return causal_lm

    def _reference_context(self) -> contextlib.AbstractContextManager:
        """A PEFT policy without a separate reference runs as the reference with its adapters off (or "ref" on)."""
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    def _head_inputs(self, inputs: dict) -> dict:
        """The keywords that give the patched forward its rows: TRL's padded batch and labels, or the shared layout."""
        if self._prefix_sharing:
            pad_id = getattr(self.processing_class, "pad_token_id", None) or 0
            shared = collate_shared(pairs_from_trl_batch(inputs), pad_id=pad_id)
            return {"dpo_fast_shared": shared.to(self.accelerator.device)}
        model_kwargs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
        return {**model_kwargs, "use_cache": False, "labels": labels}

    def _reference_logps(self, model: torch.nn.Module, head_inputs: dict) -> torch.Tensor:
        """(2P,) summed reference log-probs, as TRL's reference pass computes them."""
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._reference_context(),
            self.accelerator.autocast(),
        ):
            return model(**head_inputs, dpo_fast_head=ReferenceHead(self._backend)).logps

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch (TRL calls it to precompute them): (P,), (P,)."""
        self._install_head(model)
        return self._reference_logps(model, self._head_inputs(inputs)).chunk(2)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        if self._objective.average_log_prob and bool(completion_mask[:, 0].any()):
            raise ValueError(
                "a completion starts at the first token of its sequence (an empty prompt): TRL's length-averaged "
                "losses (ipo, sigmoid_norm) then count a token that has no log-prob, which dpo_fast does not. "
                "Give every example a non-empty prompt (e.g. a BOS token), or use trl.DPOTrainer"
            )
        head_inputs = self._head_inputs(inputs)
        if self.precompute_ref_logps:
            ref_logps = torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]])
        else:
            ref_model = self.model if self.ref_model is None else self.ref_model
            ref_logps = self._reference_logps(ref_model, head_inputs)
        head = PolicyHead(ref_logps, self._objective, self._token_metrics, self._backend)
        outputs = model(**head_inputs, dpo_fast_head=head)
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
            return outputs.loss, model(**{k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}, use_cache=False)

    def _record_metrics(self, mode: str, inputs: dict, outputs: PolicyOutput, ref_logps: torch.Tensor) -> None:
        """Append this step's metrics under TRL 1.16's names, gathered across processes as TRL gathers them."""
        metrics, gather = self._metrics[mode], self.accelerator.gather
        if outputs.token_sums is not None:
            # each process's sums and counts, added up: TRL's token-weighted means over all processes
            sums = self.accelerator.gather_for_metrics(outputs.token_sums[None]).sum(0)
            for name, value in token_metric_means(sums).items():
                metrics[name].append(value)
        if mode == "train":
            # TRL's count: every token of the padded batch's attention mask, shared prefix or not
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
