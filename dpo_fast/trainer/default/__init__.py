"""The bundled default run: ``config.yaml``, ``model.json``, ``tokenizer/``, ``train.jsonl``, ``eval.jsonl``.

The data and the tokenizer are made by ``make_data.py``.
"""
