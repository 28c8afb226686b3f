"""Integrations with training frameworks, each imported on its own (``import dpo_fast`` imports none).

- ``dpo_fast.integrations.trl``: ``FastDPOTrainer``, a drop-in for TRL's ``DPOTrainer``.
- ``dpo_fast.integrations.kto``: ``FastKTOTrainer``, a drop-in for TRL's ``KTOTrainer``.
- ``dpo_fast.integrations.hf``: the forward patch that hands a Hugging Face causal LM's last hidden
  states and LM head to a dpo_fast call inside the model's own forward.
"""
