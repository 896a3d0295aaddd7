"""pytest-gradckpt's benchmarks: named suites of named cases, run by one command.

    python -m benchmarks --list                                  # every suite and its cases
    python -m benchmarks check-cost --case 1b-full-bf16 --repeats 3 [--out PATH] [--set key=value]

Each run writes one envelope (:mod:`benchmarks.envelope`) per case. GPU verdict campaigns are tests
(``tests/gpu/``, ``make test-gpu``); one-off investigations are frozen in ``benchmarks/evidence/``.
"""
