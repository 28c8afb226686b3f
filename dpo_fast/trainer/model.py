"""The policy: any Hugging Face causal LM, run as backbone -> last hidden states -> fused DPO loss.

The full ``(2P, T, V)`` logits are never formed: ``DPOModel`` calls the model's decoder for the
last hidden states and hands them with the lm_head weight (tied or not), its bias and the
model's ``final_logit_softcapping`` to ``dpo_fast``. The loss is computed inside ``forward`` so
that DDP and FSDP see one module call per step (FSDP gathers the head's weight there).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .. import api, objectives
from . import sources
from .config import TrainConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# logit scalings some models apply after the head, which the fused loss does not take
_UNSUPPORTED_HEAD_SCALES = ("logit_scale", "logits_scaling")


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
    dtype = _DTYPES[cfg.dtype]
    path = sources.local_path("model", cfg.model)
    if path is None:
        model = sources.from_hub(
            "model", cfg.model, lambda: AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
        )
    elif path.is_file():
        model = AutoModelForCausalLM.from_config(_config_of(path), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    for key in _UNSUPPORTED_HEAD_SCALES:
        if getattr(model.config, key, None) not in (None, 1, 1.0):
            raise ValueError(f"model {cfg.model!r} scales its logits by config.{key}, which dpo_fast does not support")
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


class DPOModel(torch.nn.Module):
    """A causal LM and the DPO objective; ``forward`` gives the loss or the reference log-probs.

    Args:
        model: a ``transformers`` causal LM, or a PEFT model around one.
        cfg: the run's objective (``beta``, ``loss_type``, ``label_smoothing``) and ``backend``.
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig):
        super().__init__()
        self.model = model
        self.objective = {"beta": cfg.beta, "loss_type": cfg.loss_type, "label_smoothing": cfg.label_smoothing}
        self.average_log_prob = objectives.default_average_log_prob(cfg.loss_type)
        self.backend = cfg.backend
        self.softcap = getattr(self.hf_model.config, "final_logit_softcapping", None)
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
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        ref_logps: torch.Tensor | None = None,
    ) -> api.DPOOutput | torch.Tensor:
        """One forward of 2P sequences (``data.collate``'s layout), chosen first.

        Args:
            input_ids, labels, attention_mask: (2P, T) int64 padded; or input_ids, position_ids
                (1, N) with labels, segment_ids (N,) int64, padding-free.
            ref_logps: (2P,) float32 reference log-probs, chosen first. None: the reference pass.
        Returns:
            with ``ref_logps``: the ``DPOOutput`` (loss and TRL's statistics); without: (2P,)
            float32 per-sequence log-probs (length-averaged for ``ipo``), as the reference.
        """
        hidden = self.hf_model.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state  # (2P, T, H) or (1, N, H)
        if segment_ids is not None:
            hidden = hidden.squeeze(0)
        # Under autocast (bf16 mixed precision) the head runs in the autocast dtype, cast here once:
        # dpo_fast's kernels take their dtypes from their inputs, not from autocast.
        device = hidden.device.type
        if torch.is_autocast_enabled(device):
            hidden = hidden.to(torch.get_autocast_dtype(device))
        head = self.hf_model.get_output_embeddings()
        with torch.autocast(device, enabled=False):
            if ref_logps is None:
                return api.sequence_logps(
                    hidden, head.weight, labels, bias=head.bias, average_log_prob=self.average_log_prob,
                    softcap=self.softcap, segment_ids=segment_ids, backend=self.backend,
                )  # fmt: skip
            pairs = ref_logps.shape[0] // 2
            return api.fused_linear_dpo_loss(
                hidden, head.weight, labels, bias=head.bias, ref_chosen_logps=ref_logps[:pairs],
                ref_rejected_logps=ref_logps[pairs:], average_log_prob=self.average_log_prob, softcap=self.softcap,
                segment_ids=segment_ids, num_pairs=pairs if segment_ids is not None else None, backend=self.backend,
                **self.objective,
            )  # fmt: skip
