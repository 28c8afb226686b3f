"""The one measuring stack of ``benchmarks/``, used by ``bench_loss.py``, ``bench_train.py``, ``bench_memory.py``,
``record_figures.py`` and ``gpu_check.py``: one module a job.

- ``environment``: the record of the machine, the versions and the code every results file holds;
- ``memory``: the memory probe (peak resident set on CPU, peak allocated on CUDA) and its watchdog;
- ``worker``: a measurement in a fresh process (or in this one, for smoke runs);
- ``report``: the results files (JSON, markdown with the common header, plots).

A package with a leading underscore: ``python benchmarks/x.py`` puts ``benchmarks/`` first on
``sys.path``, where a plain name (``environment``, ``report``) would shadow, or be shadowed by, a
PyPI package of that name; a name starting with ``_`` cannot be a PyPI project's.
"""
