"""Packaging: ``dpo_fast`` plus the top-level ``kernels/`` folder installed as ``dpo_fast.kernels``."""

from setuptools import setup

setup(
    packages=[
        "dpo_fast",
        "dpo_fast.backends",
        "dpo_fast.integrations",
        "dpo_fast.kernels",
        "dpo_fast.trainer",
        "dpo_fast.trainer.default",
    ],
    package_dir={"dpo_fast.kernels": "kernels"},
    package_data={"dpo_fast.trainer.default": ["*.json", "*.jsonl", "*.yaml", "tokenizer/*"]},
)
