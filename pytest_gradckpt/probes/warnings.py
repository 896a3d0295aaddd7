"""Captures warnings raised during a run and classifies the ones that mean lost gradients."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

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
