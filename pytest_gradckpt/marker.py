"""The ``@pytest.mark.gradckpt(...)`` marker: one function whose signature is what the marker
accepts, whose docstring is the marker's help, and whose body validates the values.

``pytest --markers`` prints :func:`marker_help`, the plugin validates a marker with
:func:`marker_settings`, so the two cannot drift apart. Torch-free.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from pytest_gradckpt import settings
from pytest_gradckpt.errors import GradckptUsageError


def gradckpt(*, strategies: list[str] | str | None = None, scenarios: list[str] | str | None = None,
             layers: Any = None, rtol: float | None = None, atol: float | None = None,
             min_memory_reduction: float | None = None, min_cuda_memory_reduction: float | None = None,
             expect: Mapping[str, str] | None = None, seed: int = 0, timeout: float | None = None,
             baseline: str = "auto", isolate: bool | str = "auto",
             compile_order: str | None = None) -> dict[str, Any]:
    """A gradient-checkpointing check: configures the 'gradckpt' fixture, whose gradckpt.check(model, inputs)
    the test must call (a marked test that checks nothing fails). Runs only with --gradckpt.

    Args:
        strategies: strategy names to run (default: all registered, or --gradckpt-strategies).
        scenarios: scenario names (default: train, or --gradckpt-scenarios).
        layers: checkpoint units: dotted path, module class, or list of modules.
        rtol: relative tolerance (default per dtype).
        atol: absolute tolerance (default per dtype).
        min_memory_reduction: required cut of the saved-activation peak, a fraction in [0, 1).
        min_cuda_memory_reduction: required cut of the CUDA allocator peak, a fraction in [0, 1).
        expect: {'strategy' or 'strategy/scenario': outcome} for known hazards.
        seed: seed for every run (default 0).
        timeout: seconds one run may take before it ends as error.
        baseline: auto (whole-model, layerwise if that runs out of memory), whole-model or layerwise.
        isolate: True: every step in a child process; 'auto' (default): in a forked child where that is
            cheap (CPU), so a crash in native code is an error verdict, not the end of the session.
        compile_order: for a model with compiled blocks: compile_outside (default) or checkpoint_outside.

    Returns every setting, validated and normalised (names split, ``expect`` a dict).

    Example:
        >>> gradckpt(strategies="reentrant, non_reentrant", seed=1)["strategies"]
        ['reentrant', 'non_reentrant']
    """
    given = dict(locals())
    given["strategies"] = settings.check_strategy_names(settings.split_names(strategies), "strategies")
    given["scenarios"] = settings.check_scenario_names(settings.split_names(scenarios), "scenarios")
    settings.check_tolerance("rtol", rtol)
    settings.check_tolerance("atol", atol)
    settings.check_fraction("min_memory_reduction", min_memory_reduction)
    settings.check_fraction("min_cuda_memory_reduction", min_cuda_memory_reduction)
    settings.check_timeout(timeout)
    settings.check_baseline(baseline)
    settings.check_isolate(isolate)
    settings.check_compile_order(compile_order)
    given["expect"] = settings.check_expect(expect, "expect")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise GradckptUsageError(f"seed={seed!r} must be an int")
    return given


_PARAMETERS = inspect.signature(gradckpt).parameters


def marker_settings(args: tuple[Any, ...], kwargs: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Validate a marker's arguments against :func:`gradckpt`; return the ones given (the others
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
    unknown = sorted(set(kwargs) - set(_PARAMETERS))
    if unknown:
        raise GradckptUsageError(f"{where}: @pytest.mark.gradckpt got unknown argument(s) {', '.join(unknown)}; "
                                 f"accepted: {', '.join(_PARAMETERS)}")
    try:
        validated = gradckpt(**kwargs)
    except GradckptUsageError as error:
        raise GradckptUsageError(f"{where}: {error}") from None
    return {name: validated[name] for name in kwargs}


def marker_help() -> str:
    """The line ``pytest --markers`` shows, built from :func:`gradckpt`'s signature and docstring.

    Example:
        >>> marker_help().startswith("gradckpt(strategies=None, scenarios=None, layers=None,")
        True
        >>> "isolate='auto'" in marker_help()
        True
    """
    arguments = ", ".join(f"{name}={p.default!r}" for name, p in _PARAMETERS.items())
    summary = " ".join((gradckpt.__doc__ or "").split("\n\n")[0].split())
    return f"gradckpt({arguments}): {summary}"
