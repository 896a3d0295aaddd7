"""Validated settings shared by the engine and the plugin. Torch-free, so the plugin
can reject a bad marker or option at collection without importing torch."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from pytest_gradckpt import outcomes
from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.scenarios import SCENARIOS

#: What ``baseline=`` accepts. ``auto``: the step without checkpointing, and the layer-local
#: replay when that step runs out of device memory (see :mod:`pytest_gradckpt.baselines`).
BASELINE_KINDS = ("auto", "whole-model", "layerwise")


def check_baseline(value: Any, where: str = "baseline") -> str:
    """Validate a baseline kind.

    Example:
        >>> check_baseline("layerwise")
        'layerwise'
    """
    if value not in BASELINE_KINDS:
        raise GradckptUsageError(f"{where}={value!r} is not a baseline kind; pass one of {', '.join(BASELINE_KINDS)} "
                                 "(layerwise: for models whose step only fits with checkpointing)")
    return value


def check_fraction(name: str, value: Any) -> float | None:
    """Validate a threshold in [0, 1).

    Example:
        >>> check_fraction("min_memory_reduction", 0.5)
        0.5
        >>> check_fraction("min_memory_reduction", 1.5)
        Traceback (most recent call last):
        ...
        pytest_gradckpt.errors.GradckptUsageError: min_memory_reduction=1.5 is out of range; pass a fraction in [0, 1), e.g. 0.3 for a 30% cut
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < 1):
        raise GradckptUsageError(
            f"{name}={value!r} is out of range; pass a fraction in [0, 1), e.g. 0.3 for a 30% cut")
    return float(value)


def check_tolerance(name: str, value: Any) -> float | None:
    """Validate rtol/atol: a finite number >= 0, or None for the per-dtype default.

    Example:
        >>> check_tolerance("atol", 1e-5)
        1e-05
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise GradckptUsageError(f"{name}={value!r} is not a usable tolerance; pass a finite number >= 0 "
                                 "or None for the per-dtype default")
    return float(value)


def check_timeout(value: Any) -> float | None:
    """Validate the per-run time limit: a positive number of seconds, or None for no limit.

    Example:
        >>> check_timeout(30)
        30.0
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise GradckptUsageError(f"timeout={value!r}: pass a positive number of seconds, or None for no limit")
    return float(value)


#: Where checkpoints sit in a model with compiled blocks (``compile_order=``; see docs/compile.md).
COMPILE_ORDERS = ("compile_outside", "checkpoint_outside")


def check_compile_order(value: Any, where: str = "compile_order") -> str | None:
    """Validate ``compile_order`` (None: the default, checkpoints inside the compiled code).

    Example:
        >>> check_compile_order("checkpoint_outside")
        'checkpoint_outside'
        >>> check_compile_order("sideways")
        Traceback (most recent call last):
        ...
        pytest_gradckpt.errors.GradckptUsageError: compile_order='sideways': pass one of compile_outside, checkpoint_outside
    """
    if value is not None and value not in COMPILE_ORDERS:
        raise GradckptUsageError(f"{where}={value!r}: pass one of {', '.join(COMPILE_ORDERS)}")
    return value


#: What ``isolate=`` accepts: True (every step in a child process), False (in this process), "auto"
#: (in a forked child where that is cheap: CPU, CUDA not yet used here; else in this process).
ISOLATE_CHOICES = (True, False, "auto")


def check_isolate(value: Any) -> bool | str:
    """Validate ``isolate``.

    Example:
        >>> check_isolate("auto")
        'auto'
        >>> check_isolate("yes")
        Traceback (most recent call last):
        ...
        pytest_gradckpt.errors.GradckptUsageError: isolate='yes': pass True, False or 'auto'
    """
    if not any(value is choice or (isinstance(value, str) and value == choice) for choice in ISOLATE_CHOICES):
        raise GradckptUsageError(f"isolate={value!r}: pass True, False or 'auto'")
    return value


def split_names(value: str | Iterable[str] | None) -> list[str] | None:
    """``"a, b"`` or ``["a", "b"]`` -> ``["a", "b"]``; empty -> None.

    Example:
        >>> split_names("reentrant, sac")
        ['reentrant', 'sac']
    """
    if value is None:
        return None
    items = value.replace(",", " ").split() if isinstance(value, str) else [str(v).strip() for v in value]
    return [i for i in items if i] or None


def check_strategy_names(names: Iterable[str] | None, where: str) -> list[str] | None:
    """Every name must be registered; the message lists what is."""
    import pytest_gradckpt.compile_budget  # noqa: F401 - registers the opt-in strategy
    from pytest_gradckpt.strategies import available_strategies

    if names is None:
        return None
    known = available_strategies(opt_in=True)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise GradckptUsageError(f"{where}: unknown strategy {', '.join(map(repr, unknown))}; available: "
                                 f"{', '.join(known)} (register your own with pytest_gradckpt.register_strategy)")
    return list(names)


def check_scenario_names(names: Iterable[str] | None, where: str) -> list[str] | None:
    """Every name must be a known scenario."""
    if names is None:
        return None
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise GradckptUsageError(
            f"{where}: unknown scenario {', '.join(map(repr, unknown))}; available: {', '.join(SCENARIOS)}")
    return list(names)


def check_expect(expect: Any, where: str) -> dict[str, str] | None:
    """``expect`` maps ``strategy`` or ``strategy/scenario`` to a non-pass outcome.

    Example:
        >>> check_expect({"reentrant": "silent"}, "marker")
        {'reentrant': 'silent'}
    """
    if expect is None:
        return None
    if not isinstance(expect, Mapping):
        raise GradckptUsageError(f"{where}: expect={expect!r} must be a dict like {{'reentrant': 'silent'}}")
    for key, outcome in expect.items():
        strategy, _, scenario = str(key).partition("/")
        check_strategy_names([strategy], f"{where}: expect key {key!r}")
        if scenario:
            check_scenario_names([scenario], f"{where}: expect key {key!r}")
        if outcome not in outcomes.ALL or outcome in (outcomes.PASS, outcomes.SKIPPED):
            choices = ", ".join(o for o in outcomes.SEVERITY if o not in (outcomes.PASS, outcomes.SKIPPED))
            raise GradckptUsageError(f"{where}: expect[{key!r}]={outcome!r} is not an outcome a hazard can have; "
                                     f"use one of {choices}")
    return dict(expect)
