"""Captures warnings raised during a run and classifies the ones that mean lost gradients.

:class:`WarningsProbe` is the probe (:mod:`pytest_gradckpt.probes.protocol`): it keeps what it
captured even when the step raised, since a warning often explains the failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

from pytest_gradckpt.probes.protocol import Probe, ProbeEvidence, ProbeStep

#: torch's reentrant checkpoint says this when no input requires grad: every
#: parameter inside that layer then silently gets no gradient.
SILENT_MARKERS = ("None of the inputs have requires_grad=True",)


@contextlib.contextmanager
def capture_warnings() -> Iterator[list[str]]:
    """Record every warning message raised inside, deduplicated, in order.

    The caller's warning filters are restored on exit (``catch_warnings`` does that).

    Example:
        >>> with capture_warnings() as seen:
        ...     warnings.warn("x"); warnings.warn("x")
        >>> seen
        ['UserWarning: x']
    """
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield messages
        finally:
            for w in caught:
                line = f"{w.category.__name__}: {w.message}"
                if line not in messages:
                    messages.append(line)


def silent_warning(messages: list[str]) -> str | None:
    """The first captured message that means gradients were lost, or None.

    Example:
        >>> silent_warning(["UserWarning: None of the inputs have requires_grad=True. Gradients will be None"])
        'UserWarning: None of the inputs have requires_grad=True. Gradients will be None'
    """
    return next((m for m in messages if any(marker in m for marker in SILENT_MARKERS)), None)


@dataclasses.dataclass
class Warned:
    """The warnings of one step, deduplicated, in order."""

    warnings: list[str] = dataclasses.field(default_factory=list)


class WarningsProbe(Probe[Warned]):
    """Every warning raised during the step (:func:`capture_warnings`)."""

    name = "warnings"
    measurement = Warned
    metric_keys = ("warnings",)

    def __init__(self, step: ProbeStep) -> None:
        super().__init__(step)
        self.messages: list[str] = []

    @contextlib.contextmanager
    def around_step(self) -> Iterator[None]:
        with capture_warnings() as self.messages:
            yield

    def read(self) -> Warned:
        return Warned(self.messages)

    def after_failure(self) -> Warned:
        return Warned(self.messages)  # a warning often says why the step failed

    @classmethod
    def metrics(cls, evidence: ProbeEvidence) -> Mapping[str, Any]:
        return {"warnings": evidence.run.of(cls).warnings}
