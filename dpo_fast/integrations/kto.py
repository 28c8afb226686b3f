"""``FastKTOTrainer``: TRL's ``KTOTrainer`` with dpo_fast computing the log-probs and the loss; ``KTOFastMixin``,
the same over any ``KTOTrainer`` subclass (``class MyTrainer(KTOFastMixin, FrameworkKTOTrainer)``).

Change one import, keep the ``KTOConfig``::

    from dpo_fast.integrations.kto import FastKTOTrainer   # instead of: from trl import KTOTrainer

    trainer = FastKTOTrainer(model=model, args=KTOConfig(...), train_dataset=data, processing_class=tokenizer)

Built like ``FastDPOTrainer``: everything but the LM head and the loss is TRL's own (data preparation, the
mismatched ``KL_`` completions and their collation, the reference model, the loop, logging). The policy's
loss and LM-head gradients come from ``dpo_fast.fused_linear_kto_loss`` on its last hidden states, inside
the model's forward (``dpo_fast.integrations.hf``); the reference's log-probs, and both models' log-probs of
the mismatched pairs (TRL's KL estimate, forward only), from ``sequence_logps``: never the ``N x V`` logits.

Tested with TRL 1.14.1 to 1.16 (``trl_versions.SUPPORTED_TRL``; outside it the constructor raises): ``loss_type`` ``kto`` and ``apo_zero_unpaired``,
``desirable_weight``, ``undesirable_weight``, ``precompute_ref_log_probs``, PEFT, ``sync_ref_model``, a MoE
policy's ``router_aux_loss_coef``; the logged metrics are TRL's, under TRL's names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput
from trl import KTOConfig, KTOTrainer
from trl.models.utils import disable_gradient_checkpointing

from .. import core, objectives, outputs, validate
from ..head import LMHead
from ..layout import IGNORE_INDEX
from .hf import HeadRows
from .mixins import check_mixin_order, config_argument
from .trl_heads import ReferenceHead, full_logits_outputs, install_head, reference_context, run_policy
from .trl_versions import check_trl_version

# batch keys that are not the model's inputs (TRL's KTOTrainer)
_NON_MODEL_KEYS = {"completion_mask", "KL_input_ids", "KL_attention_mask", "KL_completion_mask", "KL_token_type_ids",
                   "KL_mm_token_type_ids", "label", "ref_logps", "ref_KL_logps"}  # fmt: skip
_NON_KL_MODEL_KEYS = {"input_ids", "attention_mask", "completion_mask", "KL_completion_mask", "KL_token_type_ids",
                      "KL_mm_token_type_ids", "label", "ref_logps", "ref_KL_logps"}  # fmt: skip


def kto_objective(args: KTOConfig) -> objectives.KTOObjective:
    """The objective of a ``KTOConfig`` (TRL's names), or a ``ValueError`` naming the option it cannot take."""
    return objectives.KTOObjective(
        beta=args.beta, loss_type=args.loss_type, desirable_weight=args.desirable_weight,
        undesirable_weight=args.undesirable_weight,
    )  # fmt: skip


@dataclass
class KTOPolicyOutput(ModelOutput):
    """What the policy's forward returns under ``FastKTOTrainer``.

    Attributes:
        loss: () float32, differentiable: the KTO loss, plus ``router_aux_loss_coef * aux_loss`` for a MoE policy.
        logps: (B,) float32 summed completion log-probs, detached.
        rewards: (B,) ``beta * (logps - ref_logps)``, detached.
        token_sums: (6,) float64 sums and counts behind TRL's ``entropy``, ``logits/chosen``, ``logits/rejected``
            (``kto_token_sums``); None without ``token_metrics``.
        aux_loss: () the MoE load-balancing loss (unweighted), detached; None unless the router loss is on.
    """

    loss: torch.Tensor | None = None
    logps: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    token_sums: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def kto_token_sums(metrics, rows: HeadRows, desirable: torch.Tensor) -> torch.Tensor:
    """(6,) float64: TRL's KTO token metrics as (sum, count) pairs: the entropy over every completion token,
    the mean logit over the desirable and over the undesirable completions' tokens.

    Args:
        metrics: ``KTOOutput.token_metrics`` (labels' shape); rows: the (B, T) padded rows; desirable: (B,) bool.
    """
    valid = rows.labels != IGNORE_INDEX
    chosen = valid & desirable.to(valid.device)[:, None]
    rejected = valid & ~chosen
    entropy, mean_logit = metrics.entropy.double(), metrics.mean_logit.double()
    return torch.stack([
        entropy[valid].sum(), valid.sum().double(),
        mean_logit[chosen].sum(), chosen.sum().double(),
        mean_logit[rejected].sum(), rejected.sum().double(),
    ])  # fmt: skip


@dataclass
class KTOPolicyHead:
    """The KTO loss on the policy's rows; called inside the model's forward (``hf.add_dpo_fast_head``).

    Attributes:
        ref_logps: (B,) summed reference log-probs; desirable: (B,) bool (TRL's ``label``).
        kl: () the batch's KL estimate (TRL's, gathered and clamped), a constant.
        router_aux_loss_coef: the weight of the rows' MoE load-balancing loss (0: none).
    """

    ref_logps: torch.Tensor
    desirable: torch.Tensor
    kl: torch.Tensor
    objective: objectives.KTOObjective
    token_metrics: bool
    backend: str
    router_aux_loss_coef: float = 0.0

    def __call__(self, rows: HeadRows, head: LMHead) -> KTOPolicyOutput:
        device = rows.hidden.device
        desirable = self.desirable.to(device=device, dtype=torch.bool)
        ref = self.ref_logps.to(device=device, dtype=torch.float64)
        result = core.preference_loss(self.objective, rows.hidden, rows.layout(head.vocab), head, ref_sums=ref,
                                      desirable=desirable, kl=self.kl, token_metrics=self.token_metrics,
                                      backend=self.backend)  # fmt: skip
        out = outputs.kto_output(self.objective, result, ref)
        loss, aux_loss = out.loss, None
        if self.router_aux_loss_coef:
            if rows.aux_loss is None:
                raise ValueError("the router auxiliary loss is on but the backbone returned no router logits")
            aux_loss = rows.aux_loss
            loss = loss + self.router_aux_loss_coef * aux_loss.to(loss)
        token_sums = kto_token_sums(out.token_metrics, rows, desirable) if self.token_metrics else None
        return KTOPolicyOutput(
            loss=loss, logps=out.logps.detach(), rewards=out.rewards, token_sums=token_sums,
            aux_loss=None if aux_loss is None else aux_loss.detach(),
        )  # fmt: skip


class KTOFastMixin:
    """dpo_fast's LM head and loss for any ``trl.KTOTrainer`` subclass: put it first among the bases,
    ``class MyTrainer(KTOFastMixin, SomeKTOTrainer)``; the subclass keeps its own behaviour, and the log-probs, the KL
    estimate's log-probs and the loss become dpo_fast's, with TRL's semantics and metric names. Like
    ``trl.DPOFastMixin`` it hooks the model's forward, ``compute_loss`` and ``compute_ref_log_probs`` only.

    Takes (besides the trainer's own arguments, passed on unchanged):
        token_metrics: log TRL's per-token diagnostics (``entropy``, ``logits/chosen``, ``logits/rejected``),
            formed in the fused pass that forms the log-probs; ``False`` skips them.
        backend: dpo_fast's backend ("auto": Triton on CUDA, the C++ kernel on CPU once built, else chunked PyTorch).

    Raises at construction: ``TypeError`` when the class is not a ``KTOTrainer`` with the mixin before it in the
    method resolution order; ``trl_versions.UnsupportedTRLVersion`` outside the tested TRL releases; ``ValueError``
    for a bad weight or ``beta``.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        check_mixin_order(cls, KTOFastMixin, KTOTrainer, defining=True)

    def __init__(self, *trainer_args, token_metrics: bool = True, backend: str = "auto", **trainer_kwargs):
        check_mixin_order(type(self), KTOFastMixin, KTOTrainer)
        check_trl_version(type(self).__name__)
        validate.check_backend(backend)
        validate.check_flag("token_metrics", token_metrics)
        args = config_argument(trainer_args, trainer_kwargs)
        if args is not None:
            kto_objective(args)  # refuse before TRL loads, tokenizes or precomputes anything
        self._token_metrics, self._backend = token_metrics, backend
        super().__init__(*trainer_args, **trainer_kwargs)
        self._objective = kto_objective(self.args)
        for module in (self.model, self.ref_model):
            if module is not None:
                install_head(self, module)

    def _logps(self, model: torch.nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        """(B,) summed completion log-probs of ``model`` (forward only), through the fused head."""
        return model(**inputs, labels=labels, dpo_fast_head=ReferenceHead(self._backend)).logps

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one padded batch and of its mismatched (KL) pairs (TRL calls it to precompute
        them): (B,), and (B,) or None without the KL estimate."""
        install_head(self, model)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            reference_context(self),
            self.accelerator.autocast(),
        ):
            logps = self._logps(model, _model_inputs(inputs, ""), _labels(inputs, ""))
            kl_logps = (
                self._logps(model, _model_inputs(inputs, "KL_"), _labels(inputs, "KL_")) if self.calculate_KL else None
            )
        return logps, kl_logps

    def _kl_logps(self, model: torch.nn.Module, batch: dict) -> torch.Tensor | None:
        """(B,) summed log-probs of the mismatched (KL) completions under ``model``, without gradient (TRL's)."""
        if not self.calculate_KL:
            return None
        inputs = {key: value for key, value in batch.items() if key not in _NON_KL_MODEL_KEYS}
        inputs["input_ids"], inputs["attention_mask"] = inputs.pop("KL_input_ids"), inputs.pop("KL_attention_mask")
        for name in ("token_type_ids", "mm_token_type_ids"):
            if f"KL_{name}" in batch:
                inputs[name] = batch[f"KL_{name}"]
        with torch.no_grad():
            return self._logps(model, {**inputs, "use_cache": False}, _labels(batch, "KL_"))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        batch = {k: (v.to(self.accelerator.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
        desirable = torch.as_tensor(batch["label"], dtype=torch.bool, device=self.accelerator.device)
        kl_logps = self._kl_logps(model, batch)
        model_kwargs = {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}
        model_kwargs["use_cache"] = False
        labels = _labels(batch, "")
        if self.precompute_ref_logps:
            ref_logps, ref_kl_logps = batch["ref_logps"], batch.get("ref_KL_logps")
        else:
            ref_model = self.model if self.ref_model is None else self.ref_model
            with (
                torch.no_grad(),
                disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
                reference_context(self),
            ):
                ref_kl_logps = self._kl_logps(ref_model, batch)
                ref_logps = self._logps(ref_model, model_kwargs, labels)
        if self.calculate_KL:
            kl = (kl_logps - ref_kl_logps).mean().detach()
            kl = self.accelerator.gather_for_metrics(kl).mean().clamp(min=0)
        else:
            kl = torch.zeros(1, device=self.accelerator.device)
        aux_coef = self.router_aux_loss_coef if self.aux_loss_enabled else 0.0
        head = KTOPolicyHead(ref_logps, desirable, kl.reshape(()), self._objective, self._token_metrics, self._backend,
                             aux_coef)  # fmt: skip
        outputs = run_policy(model, {**model_kwargs, "labels": labels}, head, self.aux_loss_enabled)
        self._record_metrics(mode, batch, desirable, kl, outputs)
        if not return_outputs:
            return outputs.loss
        return outputs.loss, full_logits_outputs(model, model_kwargs)

    def _record_metrics(self, mode: str, batch: dict, desirable: torch.Tensor, kl: torch.Tensor,
                        outputs: KTOPolicyOutput) -> None:  # fmt: skip
        """Append this step's metrics under TRL's names, gathered across processes as TRL gathers them."""
        metrics, gather = self._metrics[mode], self.accelerator.gather_for_metrics
        metrics["kl"].append(kl.item())
        if outputs.token_sums is not None:
            sums = gather(outputs.token_sums[None]).sum(0).tolist()
            metrics["entropy"].append(sums[0] / sums[1] if sums[1] > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += gather(batch["attention_mask"].sum()).sum().item() // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        if outputs.token_sums is not None:
            for name, (total, count) in (("logits/chosen", sums[2:4]), ("logits/rejected", sums[4:6])):
                if count > 0:  # TRL logs a mean logit only where there are tokens
                    metrics[name].append(total / count)
        counts = {}
        for kind, rows in (("chosen", desirable), ("rejected", ~desirable)):
            counts[kind] = gather(rows.sum()).sum().item()
            if counts[kind] > 0:  # means over every process's completions of the kind
                metrics[f"rewards/{kind}"].append(gather(outputs.rewards[rows].nansum()).nansum().item() / counts[kind])
                metrics[f"logps/{kind}"].append(gather(outputs.logps[rows].nansum()).nansum().item() / counts[kind])
        if counts["chosen"] > 0 and counts["rejected"] > 0:
            metrics["rewards/margins"].append(metrics["rewards/chosen"][-1] - metrics["rewards/rejected"][-1])
        if outputs.aux_loss is not None:
            metrics["aux_loss"].append(gather(outputs.aux_loss).mean().item())


def _labels(batch: dict, prefix: str) -> torch.Tensor:
    """TRL's labels: the (``KL_``) input ids with -100 off the completion tokens."""
    return batch[f"{prefix}input_ids"].masked_fill(batch[f"{prefix}completion_mask"] == 0, IGNORE_INDEX)


def _model_inputs(batch: dict, prefix: str) -> dict:
    """The inputs TRL's ``compute_ref_log_probs`` gives the model: the (``KL_``) input ids and attention mask."""
    return {"input_ids": batch[f"{prefix}input_ids"], "attention_mask": batch[f"{prefix}attention_mask"]}


class FastKTOTrainer(KTOFastMixin, KTOTrainer):
    """TRL's ``KTOTrainer`` with the log-probs and the loss from dpo_fast: ``KTOFastMixin`` over TRL's class; the same
    arguments (and the mixin's ``token_metrics``, ``backend``), the same logs."""
