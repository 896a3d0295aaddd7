"""The ``@pytest.mark.gradckpt(...)`` marker: its keywords, defaults and help are the marker's rows
of the option table (:data:`pytest_gradckpt.spec.MARKER_OPTIONS`), and each keyword is validated
by that option's one validator.

``pytest --markers`` prints :func:`marker_help`, the plugin validates a marker with
:func:`marker_settings`, so the two cannot drift apart, nor from ``check()``. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pytest_gradckpt import settings
from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.spec import MARKER_OPTIONS, OPTION

#: The keywords the marker accepts, in order.
KEYWORDS: tuple[str, ...] = tuple(o.name for o in MARKER_OPTIONS)


def gradckpt(**given: Any) -> dict[str, Any]:
    """A gradient-checkpointing check: configures the 'gradckpt' fixture, whose gradckpt.check(model, inputs)
    the test must call (a marked test that checks nothing fails). Runs only with --gradckpt.

    Returns the settings given, validated and normalised (names split, ``expect`` a dict); an
    empty list of strategies or scenarios is the same as none given.

    Example:
        >>> gradckpt(strategies="reentrant, non_reentrant", seed=1)
        {'strategies': ('reentrant', 'non_reentrant'), 'seed': 1}
    """
    chosen = {}
    for name, value in given.items():
        if name in ("strategies", "scenarios") and not isinstance(value, str) and value is not None \
                and settings.split_names(value) is None:
            value = None  # an empty list on the marker: the options' or the default choice
        chosen[name] = OPTION[name].validate(value)
    return chosen


gradckpt.__doc__ = (gradckpt.__doc__ or "") + "\n    Args:\n" + "".join(
    f"        {o.name}: {o.doc}\n" for o in MARKER_OPTIONS)


def marker_settings(args: tuple[Any, ...], kwargs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Validate a marker's arguments (:func:`gradckpt`); return the ones given (the others
    come from options and ini); the usage error names the test.

    Example:
        >>> marker_settings((), {"colour": "red"}, "test_x.py::test_x")
        Traceback (most recent call last):
        ...
        pytest_gradckpt.errors.GradckptUsageError: test_x.py::test_x: @pytest.mark.gradckpt got unknown argument(s) colour; accepted: strategies, scenarios, layers, rtol, atol, min_memory_reduction, min_cuda_memory_reduction, expect, seed, timeout, baseline, isolate, compile_order
    """
    if args:
        raise GradckptUsageError(f"{where}: @pytest.mark.gradckpt takes keyword arguments only, got positional "
                                 f"{args!r}; e.g. @pytest.mark.gradckpt(strategies=['non_reentrant'])")
    unknown = sorted(set(kwargs) - set(KEYWORDS))
    if unknown:
        raise GradckptUsageError(f"{where}: @pytest.mark.gradckpt got unknown argument(s) {', '.join(unknown)}; "
                                 f"accepted: {', '.join(KEYWORDS)}")
    try:
        return gradckpt(**kwargs)
    except GradckptUsageError as error:
        raise GradckptUsageError(f"{where}: {error}") from None


def marker_help() -> str:
    """The line ``pytest --markers`` shows, built from the option table and :func:`gradckpt`'s docstring.

    Example:
        >>> marker_help().startswith("gradckpt(strategies=None, scenarios=None, layers=None,")
        True
        >>> "isolate='auto'" in marker_help()
        True
    """
    arguments = ", ".join(f"{o.name}={o.shown_default!r}" for o in MARKER_OPTIONS)
    summary = " ".join((gradckpt.__doc__ or "").split("\n\n")[0].split())
    return f"gradckpt({arguments}): {summary}"
