"""What the trainer's tests share: one thread for the tiny models, the bundled tokenizer."""

import pytest


@pytest.fixture(scope="module", autouse=True)
def tiny_models_on_one_thread(one_thread):
    """Every trainer test module runs on one thread (``one_thread`` in tests/conftest.py)."""


@pytest.fixture(scope="module")
def tokenizer():
    """The bundled default run's tokenizer (``trainer_helpers.TOKENIZER``)."""
    transformers = pytest.importorskip("transformers")
    from trainer_helpers import TOKENIZER

    return transformers.AutoTokenizer.from_pretrained(TOKENIZER)
