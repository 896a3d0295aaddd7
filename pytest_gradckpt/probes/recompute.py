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
        self.in_backward: set[str] = set()
        self.memory: Any = None

    def hit(self, name: str) -> None:
        """Record one execution of ``name``'s forward."""
        self.counts[name] += 1

    def saw_output(self, name: str, output: Any) -> None:
        """Note whether ``name``'s output joins the autograd graph, i.e. backward will reach it."""
        if name not in self.in_backward and _any_requires_grad(output):
            self.in_backward.add(name)


def _any_requires_grad(value: Any) -> bool:
    if getattr(value, "requires_grad", False) is True:
        return True
    if isinstance(value, (tuple, list)):
        return any(_any_requires_grad(v) for v in value)
    if isinstance(value, dict):
        return any(_any_requires_grad(v) for v in value.values())
    return False


def recompute_verdict(baseline: dict[str, int], actual: dict[str, int], expected: dict[str, bool],
                      in_backward: set[str]) -> tuple[int, int, list[str]]:
    """Compare counts with the rules, where ``b`` is a layer's run count without checkpointing:

    - a layer the strategy checkpoints, and that backward reaches, runs ``2b`` times
      (forward + one recompute);
    - one that backward never reaches (frozen, with no grad-requiring input) may run
      ``b`` or ``2b`` times: not recomputing it is correct, recomputing it is waste but
      no broken promise;
    - a layer a ``skips_frozen`` strategy must skip runs exactly ``b`` times.

    Returns (layers recomputed, layers that had to be, one line per broken rule).

    Example:
        >>> recompute_verdict({"a": 1, "b": 1}, {"a": 2, "b": 1}, {"a": True, "b": True}, {"a", "b"})
        (1, 2, ['b ran 1 time(s), expected 2 (forward + one recompute)'])
    """
    recomputed, required, problems = 0, 0, []
    for name, runs in baseline.items():
        if runs == 0:
            continue
        got = actual.get(name, 0)
        recomputed += got > runs
        if not expected.get(name, True):
            if got != runs:
                problems.append(f"{name} ran {got} time(s), expected {runs}: it has no trainable parameters "
                                "and the strategy promises to skip such layers")
            continue
        allowed = (2 * runs,) if name in in_backward else (runs, 2 * runs)
        required += name in in_backward
        if got not in allowed:
            problems.append(f"{name} ran {got} time(s), expected {allowed[0]} (forward + one recompute)")
    return recomputed, required, problems
