"""Probes measure one fact each; the engine judges. One probe, one module: a class of the probe
protocol (:mod:`pytest_gradckpt.probes.protocol`) listed in :data:`pytest_gradckpt.probes.registry.PROBES`.
The gradient comparison (:mod:`pytest_gradckpt.pipeline.comparison`) is the evidence's own and no
registered probe."""
