"""The packaged regression suite: ``pytest --gradckpt --pyargs pytest_gradckpt.suite``.

It runs zoo x strategies x scenarios and compares every verdict with
``expected/transformers-<line>.json``: known hazards are expected (raw ``reentrant`` on frozen-embedding
LoRA is ``silent``, torch's checkpoint on BatchNorm is ``buffers``), everything else
must pass. So the suite passes when the engine detects exactly what it should, and a
framework upgrade that changes any verdict fails it.
"""
