"""Packaging: ``dpo_fast`` plus the top-level ``kernels/`` folder installed as ``dpo_fast.kernels``."""

from setuptools import setup

setup(
    packages=["dpo_fast", "dpo_fast.backends", "dpo_fast.integrations", "dpo_fast.kernels"],
    package_dir={"dpo_fast.kernels": "kernels"},
)
