"""The training benchmarks' own modules (``bench_train.py``, ``bench_memory.py``): ``models`` (the models and the
synthetic pairs), ``arms`` (every trainer a step can run in), ``steps`` (each optimizer step measured from
outside the trainer), ``probe`` (the worker: one run of one arm) and ``search`` (the longest sequence or largest
batch that fits). Named as ``_stack`` is (see there)."""
