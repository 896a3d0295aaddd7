"""Counts how many times each checkpoint unit's forward really ran."""

from __future__ import annotations

from collections import Counter
from typing import Any


class LayerCounter:
    """Per-layer execution counts, filled by instrumented layers.

    ``memory`` is the saved-activation probe that layer calls report their
    inputs to while it is active (None otherwise).

    Example:
        >>> c = LayerCounter()
        >>> c.hit("layers.0"); c.hit("layers.0")
        >>> c.counts["layers.0"]
        2
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.memory: Any = None

    def hit(self, name: str) -> None:
        """Record one execution of ``name``'s forward."""
        self.counts[name] += 1


def recompute_verdict(baseline: dict[str, int], actual: dict[str, int], expected: dict[str, bool]
                      ) -> tuple[int, list[str]]:
    """Compare counts with the rule: a checkpointed layer runs exactly twice as often as in
    the baseline (forward + one recompute), any other layer exactly as often.

    Returns the number of layers that were recomputed and one line per layer that broke the rule.

    Example:
        >>> recompute_verdict({"a": 1, "b": 1}, {"a": 2, "b": 1}, {"a": True, "b": True})
        (1, ['b ran 1 time(s), expected 2 (forward + one recompute)'])
    """
    recomputed, problems = 0, []
    for name, runs in baseline.items():
        if runs == 0:
            continue
        got = actual.get(name, 0)
        if got > runs:
            recomputed += 1
        want = 2 * runs if expected.get(name, True) else runs
        if got != want:
            if expected.get(name, True):
                problems.append(f"{name} ran {got} time(s), expected {want} (forward + one recompute)")
            else:
                problems.append(f"{name} ran {got} time(s), expected {want}: it has no trainable parameters "
                                "and the strategy promises to skip such layers")
    return recomputed, problems
