"""A lean DPO trainer for Hugging Face causal LMs on dpo_fast's fused loss.

    from dpo_fast.trainer import load_config, train
    metrics = train(load_config("run.yaml", max_steps=100))

Modules, in the order a run uses them: ``config`` (the knobs, typed), ``sources`` (local path or
hub name), ``output`` (what the output folder may hold, the metrics log), ``parallel`` (processes,
FSDP2 on CPU), ``data`` (rows -> tokens -> batches), ``model`` (backbone -> hidden states -> fused
loss), ``reference`` (precomputed, frozen copy, LoRA base or none), ``loop`` (the training loop),
``checkpoint`` (atomic save and exact resume), ``cli`` (``dpo-fast train``). Needs the ``train``
extra: ``pip install "dpo-fast[train]"``.
"""

from .config import TrainConfig, load_config


def train(cfg: TrainConfig) -> dict[str, float]:
    """Run DPO as ``cfg`` says; returns the last logged metrics (see ``dpo_fast.trainer.loop``)."""
    from .loop import train as run

    return run(cfg)


__all__ = ["TrainConfig", "load_config", "train"]
