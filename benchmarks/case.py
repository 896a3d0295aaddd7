"""What a suite declares: its cases, as data.

A suite is one module of :mod:`benchmarks.suites` with ``ABOUT`` (one line), ``CASES`` (name ->
:class:`Case`) and ``run(params, repeats, emit)``, which calls ``emit(row)`` for every row it measures;
the runner (``python -m benchmarks``) writes the rows in the envelope of :mod:`benchmarks.envelope`.

Example:
    >>> Case("the 1.1B Llama, full fine-tuning", {"size": "1b"}, needs="cuda", repeats=10).needs
    'cuda'
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: what a case needs to run: "cpu" (any machine), "cuda" (one GPU), "cuda x2" (two GPUs), "torchvision"
NEEDS = ("cpu", "cuda", "cuda x2", "torchvision")
Emit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Case:
    """One named case: a sentence saying what it measures, its parameters, what it needs, its default repeats."""

    about: str
    params: dict[str, Any] = field(default_factory=dict)
    needs: str = "cpu"
    repeats: int = 1

    def __post_init__(self) -> None:
        if self.needs not in NEEDS:
            raise ValueError(f"Case.needs={self.needs!r}: use one of {NEEDS}")
