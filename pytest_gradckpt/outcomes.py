"""The fixed vocabulary of verdicts, ordered from worst to best.

When several problems show up in one run, the worst one is reported: a
``silent`` failure is never downgraded to a ``mismatch``, and a ``mismatch`` is
never hidden behind a memory complaint. :data:`SEVERITY` is the one place this order
lives: :data:`pytest_gradckpt.pipeline.verdicts.RULES` is sorted by it.
"""

from __future__ import annotations

ERROR = "error"
SILENT = "silent"
MISMATCH = "mismatch"
BUFFERS = "buffers"
RECOMPUTE = "recompute"
NOT_APPLIED = "not_applied"
SKIPPED = "skipped"
PASS = "pass"

#: Worst first. ``silent`` outranks ``error``: when torch warned that no input
#: requires grad and the step then raised, the warning is the real cause.
SEVERITY: tuple[str, ...] = (SILENT, ERROR, MISMATCH, BUFFERS, RECOMPUTE, NOT_APPLIED, SKIPPED, PASS)

ALL: frozenset[str] = frozenset(SEVERITY)
