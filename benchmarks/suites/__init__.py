"""The suites: name -> module. Each module declares ``ABOUT``, ``CASES`` and ``run`` (see :mod:`benchmarks.case`);
they are imported only when listed or run, so listing needs none of their dependencies."""

SUITES = {
    "check-cost": "benchmarks.suites.check_cost",
    "compile": "benchmarks.suites.compile",
    "compile-truth": "benchmarks.suites.compile_truth",
    "deepspeed": "benchmarks.suites.deepspeed",
    "dist": "benchmarks.suites.dist",
    "dist-cost": "benchmarks.suites.dist_cost",
    "isolation-cost": "benchmarks.suites.isolation_cost",
    "layerwise": "benchmarks.suites.layerwise",
    "promises": "benchmarks.suites.promises",
    "strategies-gpu": "benchmarks.suites.strategies_gpu",
    "vision-models": "benchmarks.suites.vision_models",
    "zoo-sweep": "benchmarks.suites.zoo_sweep",
}
