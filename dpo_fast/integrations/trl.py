"""``FastDPOTrainer``: TRL's ``DPOTrainer`` with dpo_fast computing the log-probs and the loss; ``DPOFastMixin``,
the same over any ``DPOTrainer`` subclass (a framework's, a user's).

Change one import, keep the ``DPOConfig``::

    from dpo_fast.integrations.trl import FastDPOTrainer   # instead of: from trl import DPOTrainer

    trainer = FastDPOTrainer(model=model, args=DPOConfig(...), train_dataset=data, processing_class=tokenizer)

or keep a framework's own trainer and put the mixin first::

    class MyTrainer(DPOFastMixin, FrameworkDPOTrainer): ...

Everything but the LM head and the loss is TRL's own: data preparation and collation, the reference
model (a copy, a PEFT policy with its adapters disabled, or log-probs precomputed before training),
the training loop, logging. The policy's loss and gradients come from
``dpo_fast.fused_linear_dpo_loss`` on its last hidden states (the LM-head gradients formed in the
forward pass, prompt and padding tokens never multiplied) and the reference log-probs from
``dpo_fast.sequence_logps``: never the ``N x V`` logits. Both run inside the model's forward
(``dpo_fast.integrations.hf``), so wrappers that shard parameters see an ordinary forward.

Tested with TRL 1.14.1 to 1.16 (``trl_versions.SUPPORTED_TRL``, the ``trl`` extra's range; outside it the
constructor raises). Every ``DPOConfig`` option of those releases' ``DPOTrainer`` keeps its meaning
(``trl_objective``: every loss type, several at once with ``loss_weights``, f-divergences, ``discopop_tau``, WPO's
``use_weighting``, LD-DPO's ``ld_alpha``), and a MoE policy's load-balancing loss is added as TRL adds it
(``router_aux_loss_coef``, logged as ``aux_loss``). ``aot`` and ``aot_unpaired`` sort within each micro-batch, as
TRL's do.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from .. import core, objectives, validate
from ..head import LMHead
from ..layout import IGNORE_INDEX
from .hf import HeadRows, token_metric_means, token_metric_sums
from .kto import FastKTOTrainer, KTOFastMixin
from .mixins import check_mixin_order, config_argument
from .prefix_sharing import check_model, collate_shared, pairs_from_trl_batch
from .trl_heads import ReferenceHead, full_logits_outputs, install_head, reference_context, run_policy
from .trl_versions import check_trl_version

__all__ = ["DPOFastMixin", "FastDPOTrainer", "FastKTOTrainer", "KTOFastMixin", "trl_objective"]

_NON_MODEL_KEYS = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
# TRL's loss types that divide each score by its completion's token count
AVERAGED_LOSSES = ("ipo", "sigmoid_norm")


def trl_objective(args: DPOConfig) -> objectives.DPOObjective:
    """The objective of a ``DPOConfig`` with TRL's semantics (1.14.1 to 1.16) (``objectives.trl_dpo_objective``).

    Every loss type, ``loss_weights``, ``label_smoothing`` where TRL reads it, the f-divergences,
    ``discopop_tau``, ``use_weighting`` (WPO) and ``ld_alpha`` (LD-DPO). A ``ValueError`` names an option
    TRL itself cannot run (e.g. ``use_weighting`` with ``aot``, or with ``"sft"`` where its in-place product fails).
    """
    return objectives.trl_dpo_objective(
        list(args.loss_type), beta=args.beta, loss_weights=args.loss_weights, label_smoothing=args.label_smoothing,
        f_divergence_type=args.f_divergence_type, f_alpha_divergence_coef=args.f_alpha_divergence_coef,
        discopop_tau=args.discopop_tau, use_weighting=args.use_weighting, ld_alpha=args.ld_alpha,
    )  # fmt: skip


@dataclass
class PolicyOutput(ModelOutput):
    """What the policy's forward returns under ``FastDPOTrainer``.

    Attributes:
        loss: () float32, differentiable: the objective, plus ``router_aux_loss_coef * aux_loss`` for a MoE policy.
        logps: (2P,) float32 summed completion log-probs (LD-DPO-weighted with ``ld_alpha``), chosen rows first,
            detached.
        token_sums: (8,) float64 sums and counts behind TRL's per-token metrics (``hf.token_metric_sums``), from
            the fused pass; None without ``token_metrics``.
        aux_loss: () the MoE load-balancing loss (unweighted), detached; None unless the router loss is on.
    """

    loss: torch.Tensor | None = None
    logps: torch.Tensor | None = None
    token_sums: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class PolicyHead:
    """The loss on the policy's rows; called inside the model's forward (``hf.add_dpo_fast_head``).

    Attributes:
        ref_logps: (2P,) the reference's sums (``ReferenceHead``: LD-DPO-weighted as the objective's), chosen first.
        router_aux_loss_coef: the weight of the rows' MoE load-balancing loss (0: none).
    """

    ref_logps: torch.Tensor
    objective: objectives.DPOObjective
    token_metrics: bool
    backend: str
    router_aux_loss_coef: float = 0.0

    def __call__(self, rows: HeadRows, head: LMHead) -> PolicyOutput:
        ref = self.ref_logps.to(device=rows.hidden.device, dtype=torch.float64)
        out = core.preference_loss(self.objective, rows.hidden, rows.layout(head.vocab), head, ref_sums=ref,
                                   token_metrics=self.token_metrics, backend=self.backend)  # fmt: skip
        logps = out.logps
        loss, aux_loss = out.loss, None
        if self.router_aux_loss_coef:
            if rows.aux_loss is None:
                raise ValueError("the router auxiliary loss is on but the backbone returned no router logits")
            aux_loss = rows.aux_loss
            loss = loss + self.router_aux_loss_coef * aux_loss.to(loss)
        token_sums = token_metric_sums(out.token_metrics, rows) if self.token_metrics else None
        return PolicyOutput(
            loss=loss,
            logps=logps.detach(),
            token_sums=token_sums,
            aux_loss=None if aux_loss is None else aux_loss.detach(),
        )


class DPOFastMixin:
    """dpo_fast's LM head and loss for any ``trl.DPOTrainer`` subclass: put it first among the bases,
    ``class MyTrainer(DPOFastMixin, SomeDPOTrainer)``; the subclass keeps its own behaviour (its loop, logging,
    optimizer, saving), and the log-probs and the loss become dpo_fast's, with TRL's semantics and metric names.

    It hooks TRL's narrowest points only: the model's forward (``hf.add_dpo_fast_head``, installed on the policy and
    the reference at construction), ``compute_loss`` and ``compute_ref_log_probs`` (public, with the same signature
    in every supported TRL release); it calls nothing underscored of ``DPOTrainer``'s loss path. A subclass that
    overrides ``compute_loss`` itself and calls ``super()`` gets this one.

    Takes (besides the trainer's own arguments, passed on unchanged):
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

    Raises at construction: ``TypeError`` when the class is not a ``DPOTrainer`` with the mixin before it in the
    method resolution order (TRL's loss would run); ``trl_versions.UnsupportedTRLVersion`` outside the tested TRL
    releases; ``ValueError`` for an option TRL itself cannot run or prefix sharing cannot reproduce.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        check_mixin_order(cls, DPOFastMixin, DPOTrainer, defining=True)

    def __init__(self, *trainer_args, token_metrics: bool = True, prefix_sharing: bool = False, backend: str = "auto",
                 **trainer_kwargs):  # fmt: skip
        check_mixin_order(type(self), DPOFastMixin, DPOTrainer)
        check_trl_version(type(self).__name__)
        validate.check_backend(backend)
        for flag, value in (("token_metrics", token_metrics), ("prefix_sharing", prefix_sharing)):
            validate.check_flag(flag, value)
        # refuse before TRL loads, tokenizes or precomputes anything (the precomputed reference reads ld_alpha)
        args = config_argument(trainer_args, trainer_kwargs)
        self._objective = None if args is None else trl_objective(args)
        if prefix_sharing and args is not None and args.truncation_mode == "keep_end" and args.max_length is not None:
            raise ValueError(
                f"{type(self).__name__}(prefix_sharing=True) needs DPOConfig(truncation_mode='keep_start'): 'keep_end' "
                "cuts each sequence's prompt by its own length, so a pair's two prompts may differ"
            )
        self._token_metrics, self._prefix_sharing, self._backend = token_metrics, prefix_sharing, backend
        super().__init__(*trainer_args, **trainer_kwargs)
        self._objective = trl_objective(self.args)
        if prefix_sharing and self.aux_loss_enabled:
            raise ValueError(
                f"{type(self).__name__}(prefix_sharing=True) cannot reproduce TRL's MoE load-balancing loss "
                f"(router_aux_loss_coef={self.router_aux_loss_coef}): the router sees each prompt once instead of "
                "twice. Set DPOConfig(router_aux_loss_coef=0.0), or prefix_sharing=False"
            )
        if prefix_sharing and self._is_vision_dataset:
            raise ValueError(
                f"{type(self).__name__}(prefix_sharing=True) takes text-only preference data, not vision data"
            )
        for module, trains in ((self.model, True), (self.ref_model, False)):
            if module is not None:
                causal_lm = self._install_head(module)
                if prefix_sharing:
                    check_model(causal_lm, self.accelerator.device if trains else None)

    def _install_head(self, model: torch.nn.Module) -> torch.nn.Module:
        return install_head(self, model)

    def _reference_context(self) -> contextlib.AbstractContextManager:
        return reference_context(self)

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
            return model(**head_inputs, dpo_fast_head=ReferenceHead(self._backend, self._objective)).logps

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch (TRL calls it to precompute them): (P,), (P,)."""
        self._install_head(model)
        return self._reference_logps(model, self._head_inputs(inputs)).chunk(2)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        completion_mask = inputs["completion_mask"]
        averages = any(term.loss_type in AVERAGED_LOSSES for term in self._objective.terms)
        if averages and bool(completion_mask[:, 0].any()):
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
        aux_coef = self.router_aux_loss_coef if self.aux_loss_enabled else 0.0
        head = PolicyHead(ref_logps, self._objective, self._token_metrics, self._backend, aux_coef)
        outputs = run_policy(model, head_inputs, head, self.aux_loss_enabled)
        self._record_metrics(mode, inputs, outputs, ref_logps)
        if not return_outputs:
            return outputs.loss
        model_inputs = {k: v for k, v in inputs.items() if k not in _NON_MODEL_KEYS}
        return outputs.loss, full_logits_outputs(model, {**model_inputs, "use_cache": False})

    def _record_metrics(self, mode: str, inputs: dict, outputs: PolicyOutput, ref_logps: torch.Tensor) -> None:
        """Append this step's metrics under TRL's names, gathered across processes as TRL gathers them."""
        metrics, gather = self._metrics[mode], self.accelerator.gather
        if outputs.aux_loss is not None:
            metrics["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
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


class FastDPOTrainer(DPOFastMixin, DPOTrainer):
    """TRL's ``DPOTrainer`` with the log-probs and the loss from dpo_fast: ``DPOFastMixin`` over TRL's class; the same
    arguments (and the mixin's ``token_metrics``, ``prefix_sharing``, ``backend``), the same logs."""
