"""``bench_loss.py``'s own modules: ``cases`` (shapes, inputs, the float64 reference), ``implementations``
(one adapter per implementation), ``measure`` (time, memory and errors of one step) and ``tables`` (its
markdown tables, goals and plots). Named as ``_stack`` is (see there)."""
