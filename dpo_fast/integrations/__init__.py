"""Integrations with training frameworks, each imported on its own (``import dpo_fast`` imports none).

- ``dpo_fast.integrations.trl``: ``FastDPOTrainer``, a drop-in for TRL's ``DPOTrainer``; ``DPOFastMixin``, the same
  over any ``DPOTrainer`` subclass.
- ``dpo_fast.integrations.kto``: ``FastKTOTrainer``, a drop-in for TRL's ``KTOTrainer``; ``KTOFastMixin``.
- ``dpo_fast.integrations.axolotl``: ``DPOFastPlugin``, axolotl's DPO, IPO and KTO trainers with the mixins (needs
  axolotl).
- ``dpo_fast.integrations.hf``: the forward patch that hands a Hugging Face causal LM's last hidden
  states and LM head to a dpo_fast call inside the model's own forward.
"""
