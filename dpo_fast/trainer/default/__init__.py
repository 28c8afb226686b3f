"""The bundled default run: ``config.yaml``, ``model.json``, ``tokenizer/``, ``train.jsonl`` and ``eval.jsonl`` (made by ``make_data.py``)."""
