"""The policy: any Hugging Face causal LM, run as backbone -> last hidden states -> fused preference loss.

The full ``(2P, T, V)`` logits are never formed: ``DPOModel`` runs the model through
``dpo_fast.integrations.hf`` (the module that owns "backbone, then the fused head": the lm_head
weight, tied or not, its bias, the logit scale, the softcap, the autocast dtype), as the TRL
drop-in does, so both accept the same models. The loss is computed inside ``forward`` so that DDP
and FSDP see one module call per step (FSDP gathers the head's weight there).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import ModelOutput

from .. import core, objectives, outputs
from ..head import LMHead
from ..integrations import hf
from ..integrations.prefix_sharing import SharedPrefixBatch, check_model
from . import objective as objective_lib
from . import sources
from .config import TrainConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(cfg: TrainConfig):
    """``cfg.tokenizer``, else the model's own; a pad token is set to EOS when there is none."""
    key, source = ("tokenizer", cfg.tokenizer) if cfg.tokenizer else ("model", cfg.model)
    path = sources.local_path(key, source)
    if path is None:
        tokenizer = sources.from_hub(key, source, lambda: AutoTokenizer.from_pretrained(source))
    elif path.is_file():
        raise ValueError(f"{key} {source!r} is a file: set tokenizer to a tokenizer folder or hub name")
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {source!r} has no EOS token, which ends every completion; set eos_token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: TrainConfig) -> PreTrainedModel:
    """The HF model of ``cfg.model`` (folder or hub name; a ``.json`` config gives a random init
    seeded by the caller), in ``cfg.dtype``, with LoRA adapters when ``cfg.lora_r > 0``."""
    options = {"dtype": _DTYPES[cfg.dtype]}
    if cfg.attn_implementation is not None:
        options["attn_implementation"] = cfg.attn_implementation
    path = sources.local_path("model", cfg.model)
    if path is None:
        model = sources.from_hub("model", cfg.model, lambda: AutoModelForCausalLM.from_pretrained(cfg.model, **options))
    elif path.is_file():
        model = AutoModelForCausalLM.from_config(_config_of(path), **options)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **options)
    if cfg.gradient_checkpointing:  # named activation_checkpointing_enable from transformers 5.23 on
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_target_modules
        targets = [name.strip() for name in targets.split(",")] if "," in targets else targets
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")  # fmt: skip
        model = get_peft_model(model, lora)
    return model


def built_from_config(cfg: TrainConfig) -> bool:
    """The run's model is a random init from a config file: its base weights exist nowhere but in the run."""
    path = sources.local_path("model", cfg.model)
    return path is not None and path.is_file()


def _config_of(path: Path):
    """The ``transformers`` config of a model config ``.json`` file, or a ``ValueError`` saying what is wrong."""
    if path.suffix != ".json":
        raise ValueError(
            f"model {str(path)!r} is a file but not a config .json: give a model folder, a hub name or a .json"
        )
    try:
        values = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"model config {str(path)!r} is not valid JSON: {error}") from None
    if not isinstance(values, dict) or "model_type" not in values:
        raise ValueError(f"model config {str(path)!r} needs a 'model_type' (e.g. 'llama')")
    return AutoConfig.for_model(**values)


def check_prefix_sharing(model: PreTrainedModel, device: torch.device) -> None:
    """Refuse, before anything runs, a model whose prefix cannot be shared exactly (``prefix_sharing.check_model``)."""
    try:
        check_model(model, training_device=device)
    except ValueError as error:
        raise ValueError(f"prefix_sharing: {error}") from None


@dataclass
class StepOutput(ModelOutput):
    """One policy forward: the fused loss and TRL's statistics, tensors only.

    A ``ModelOutput`` (a dict) with the loss at its top level: DeepSpeed ZeRO-3 finds the tensors a module returns
    and hooks the parameters it gathered for the forward to be gathered again before the backward.

    Attributes:
        loss: () the objective's fused loss (``fused_linear_dpo_loss``, ``..._cpo_loss``, ``..._orpo_loss`` or
            ``..._kto_loss``; KTO: 2P completions, the P chosen first), differentiable.
        pair_sums: float64 TRL's pair metrics of the objective summed over the pairs, then the pair count
            (``objective.pair_sums``), detached.
        token_sums: (8,) float64 sums and counts behind TRL's per-token metrics (``hf.token_metric_sums``),
            from the same pass.
    """

    loss: torch.Tensor | None = None
    pair_sums: torch.Tensor | None = None
    token_sums: torch.Tensor | None = None


class DPOModel(torch.nn.Module):
    """A causal LM and the run's preference objective; ``forward`` gives the loss or the reference log-probs.

    Args:
        model: a ``transformers`` causal LM, or a PEFT model around one.
        cfg: the run's objective keys (``objective``, ``beta``, ``loss_type``, ...; ``trainer.objective``) and
            ``backend``.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig):
        super().__init__()
        self.model = model
        self.objective = objective_lib.build(cfg)
        # ORPO's NLL covers the chosen prompt tokens too (TRL's ORPOTrainer)
        self.nll_on_prompt = cfg.objective == "orpo"
        self.backend = cfg.backend
        # FSDP's auto-wrap policy reads the decoder-layer classes from here
        self._no_split_modules = getattr(self.hf_model, "_no_split_modules", None)

    def tie_weights(self, *args, **kwargs) -> None:
        """The HF model's ``tie_weights``: accelerate's FSDP2 calls it on the module it shards (this one) after
        moving it to the meta device and back (``cpu_ram_efficient_loading``, on by default in ``accelerate
        launch``); without it a tied lm_head comes back as a second, separately trained copy of the embedding."""
        self.hf_model.tie_weights(*args, **kwargs)

    @property
    def hf_model(self) -> PreTrainedModel:
        """The transformers model (inside the PEFT wrapper, adapters in place, when there is one)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        shared: SharedPrefixBatch | None = None,
        ref_logps: torch.Tensor | None = None,
        kl: torch.Tensor | None = None,
    ) -> StepOutput | torch.Tensor:
        """One forward of P pairs in one of ``data.collate``'s layouts, chosen first.

        Args:
            input_ids, labels, attention_mask: (2P, T) int64 padded; or input_ids, position_ids
                (1, N) with labels, segment_ids (N,) int64, padding-free; or ``shared``, the
                prefix-shared layout (padded or packed) alone.
            ref_logps: (2P,) float32 reference sums, chosen first, weighted as the objective's (``_reference_logps``;
                zeros for an objective without a reference). None: the reference pass.
            kl: () KTO's KL estimate of the step (``objective: kto``), a constant.
        Returns:
            with ``ref_logps``: the ``StepOutput`` (loss, TRL's statistics and token metrics); without: (2P,)
            float32 per-sequence sums of the completion log-probs, weighted as the objective's (LD-DPO with
            ``ld_alpha``), as the reference.
        """
        if shared is not None:
            inputs = {"shared": shared}
        else:
            pairs = None if ref_logps is None else ref_logps.shape[0] // 2
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                      "labels": labels, "segment_ids": segment_ids, "num_pairs": pairs}  # fmt: skip
        if ref_logps is None:
            return hf.run_head(self.hf_model, self._reference_logps, **inputs)
        nll_labels = _next_tokens(input_ids, attention_mask, segment_ids) if self.nll_on_prompt else None
        return hf.run_head(
            self.hf_model, lambda rows, head: self._policy_step(rows, head, ref_logps, nll_labels, kl), **inputs
        )

    def _reference_logps(self, rows: hf.HeadRows, head: LMHead) -> torch.Tensor:
        """(2P,) the objective's sums of ``rows`` (LD-DPO-weighted as the policy's), chosen first."""
        sums, _counts = core.sequence_sums(rows.hidden, rows.layout(head.vocab), head, objective=self.objective,
                                           backend=self.backend)  # fmt: skip
        return sums.detach()

    def _policy_step(self, rows: hf.HeadRows, head: LMHead, ref_logps: torch.Tensor,
                     nll_labels: torch.Tensor | None, kl: torch.Tensor | None) -> StepOutput:  # fmt: skip
        """The objective's fused loss on ``rows``; KTO takes the 2P completions unpaired, the P chosen desirable."""
        objective, layout = self.objective, rows.layout(head.vocab)
        ref = ref_logps.to(device=rows.hidden.device, dtype=torch.float64)
        kto = isinstance(objective, objectives.KTOObjective)
        desirable = torch.arange(layout.num_sequences, device=ref.device) < layout.num_sequences // 2 if kto else None
        result = core.preference_loss(
            objective, rows.hidden, layout, head, ref_sums=ref if objective.needs.reference else None,
            desirable=desirable, kl=0.0 if kl is None else kl, token_metrics=True, backend=self.backend,
            nll_labels=None if nll_labels is None else nll_labels.to(rows.labels.device),
        )  # fmt: skip
        if kto:
            out = outputs.kto_output(objective, result, ref)
        else:
            reported_ref = (
                objectives.reported_logps(objective, ref, result.counts) if objective.needs.reference else None
            )
            out = outputs.pair_output(objective, result, reported_ref)
        pair_sums = objective_lib.pair_sums(objective, out)
        return StepOutput(out.loss, pair_sums, hf.token_metric_sums(result.token_metrics, rows).to(pair_sums))


def _next_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 segment_ids: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """The target of every position that has a next token in its own sequence (``IGNORE_INDEX`` elsewhere), in
    ``labels``' layout: (2P, T) padded, or (N,) packed. TRL's ORPO takes its NLL over these (the chosen rows')."""
    if segment_ids is None:
        targets = torch.full_like(input_ids, hf.IGNORE_INDEX)
        real_next = attention_mask[:, 1:].bool()
        targets[:, :-1] = torch.where(real_next, input_ids[:, 1:], hf.IGNORE_INDEX)
        return targets
    tokens = input_ids.reshape(-1)
    targets = torch.full_like(tokens, hf.IGNORE_INDEX)
    same_sequence = segment_ids[1:] == segment_ids[:-1]
    targets[:-1] = torch.where(same_sequence, tokens[1:], hf.IGNORE_INDEX)
    return targets
