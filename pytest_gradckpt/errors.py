"""The one exception type the engine raises for bad input.

Every message names the argument, the value that was given, and the fix, so a
user can act on it without reading our source.
"""

from __future__ import annotations


class GradckptUsageError(ValueError):
    """Raised when ``check()`` or the plugin is given input it cannot use.

    It subclasses :class:`ValueError` so callers that already catch bad values
    keep working.

    Example:
        >>> from pytest_gradckpt.errors import GradckptUsageError
        >>> try:
        ...     raise GradckptUsageError("rtol=-1 is negative; pass a tolerance >= 0")
        ... except ValueError as error:
        ...     print(error)
        rtol=-1 is negative; pass a tolerance >= 0
    """


class NotReplayable(Exception):
    """A checkpoint unit gave other outputs when run again from the same inputs and RNG state
    (state outside its parameters and buffers, randomness outside torch's generators): the
    layer-local baseline, which replays every unit, cannot judge that model.

    Example:
        >>> str(NotReplayable("blocks.0: outputs differ"))
        'blocks.0: outputs differ'
    """


class StrategyNotApplicable(Exception):
    """Raised by a strategy, while applying or running, when it cannot serve this model.

    The engine reports the strategy as ``skipped`` with this message instead of
    blaming it with ``error``.

    Example:
        >>> str(StrategyNotApplicable("hf_reentrant needs a transformers model"))
        'hf_reentrant needs a transformers model'
    """


class HarnessFailure(Exception):
    """The harness itself could not run a step (ranks that never met or ran past their time
    limit, a launch killed from outside): nothing was judged. Reported as ``error`` with a
    message that starts ``not judged:``, never as ``skipped`` and never as the strategy's verdict.

    Example:
        >>> describe_error(HarnessFailure("not judged: rank(s) [1] did not finish within 5 s"))
        'not judged: rank(s) [1] did not finish within 5 s'
    """

    already_described = True  # the message itself says what happened, in the verdict's words


class StrategyTimeout(Exception):
    """Raised inside a run that outlived its time limit; reported as ``error``."""


def describe_error(exc: BaseException) -> str:
    """``"Type: message"``, the form every verdict and report uses for an exception.

    Example:
        >>> describe_error(ValueError("bad"))
        'ValueError: bad'
    """
    if getattr(exc, "already_described", False):  # raised elsewhere and carried here as its description
        return str(exc)
    return f"{type(exc).__name__}: {exc}".strip()
