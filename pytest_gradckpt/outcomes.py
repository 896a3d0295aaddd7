"""The fixed vocabulary of verdicts, ordered from worst to best.

When several problems show up in one run, the worst one is reported: a
``silent`` failure is never downgraded to a ``mismatch``, and a ``mismatch`` is
never hidden behind a memory complaint.
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

DESCRIPTIONS: dict[str, str] = {
    PASS: "gradients, loss, outputs and buffers equal the baseline; every layer recomputed as promised",
    MISMATCH: "loss, outputs or gradients differ from the baseline beyond tolerance",
    SILENT: "nothing raised, yet a parameter lost its gradient (None or all zero)",
    ERROR: "the strategy raised",
    NOT_APPLIED: "no layer was recomputed, or activation memory did not drop enough",
    RECOMPUTE: "a layer ran a wrong number of times, or a frozen layer was recomputed needlessly",
    BUFFERS: "buffers (e.g. BatchNorm running statistics) differ after the step",
    SKIPPED: "the strategy does not apply to this model",
}


def worst(outcomes: list[str]) -> str:
    """Return the most severe outcome of ``outcomes`` (``pass`` when empty).

    Example:
        >>> worst(["pass", "mismatch", "silent"])
        'silent'
        >>> worst([])
        'pass'
    """
    if not outcomes:
        return PASS
    return min(outcomes, key=SEVERITY.index)
