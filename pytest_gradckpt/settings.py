"""Validated settings shared by the engine and the plugin. Torch-free, so the plugin
can reject a bad marker or option at collection without importing torch."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from pytest_gradckpt import outcomes
from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.pipeline.scenarios import SCENARIOS

#: What ``baseline=`` accepts. ``auto``: the step without checkpointing, and the layer-local
#: replay when that step runs out of device memory (see :mod:`pytest_gradckpt.pipeline.baselines`).
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


def check_timeout(value: Any, where: str = "timeout") -> float | None:
    """Validate the per-run time limit: a positive number of seconds, or None for no limit.

    Example:
        >>> check_timeout(30)
        30.0
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise GradckptUsageError(f"{where}={value!r}: pass a positive number of seconds, or None for no limit")
    return float(value)


def check_seed(value: Any, where: str = "seed") -> int:
    """Validate the seed every run is reseeded with: an int.

    Example:
        >>> check_seed(3)
        3
        >>> check_seed("3")
        Traceback (most recent call last):
        ...
        pytest_gradckpt.errors.GradckptUsageError: seed='3' is not an int; pass an int such as 0
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise GradckptUsageError(f"{where}={value!r} is not an int; pass an int such as 0")
    return value


def check_device(value: Any, where: str = "device") -> Any:
    """Validate a device named as text (``auto``, ``cpu``, ``cuda``, ``cuda:N``); None (where the model
    is) and ``torch.device`` objects pass unchanged (the subject resolves them). Torch-free.

    Example:
        >>> check_device("cuda:1")
        'cuda:1'
        >>> check_device("tpu", "--gradckpt-device")
        Traceback (most recent call last):
        ...
        pytest_gradckpt.errors.GradckptUsageError: --gradckpt-device='tpu': not a device; pass auto, cpu or cuda
    """
    if isinstance(value, str) and value not in ("auto", "cpu", "cuda") and not value.startswith("cuda:"):
        raise GradckptUsageError(f"{where}={value!r}: not a device; pass auto, cpu or cuda")
    return value


def check_flag(value: Any, where: str) -> bool:
    """Validate a yes/no setting.

    Example:
        >>> check_flag(True, "fingerprint")
        True
    """
    if not isinstance(value, bool):
        raise GradckptUsageError(f"{where}={value!r}: pass True or False")
    return value


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


#: ``distributed=`` settings and their defaults (see docs/multi-gpu.md).
DISTRIBUTED_DEFAULTS: dict[str, Any] = {"world_size": 2, "find_unused_parameters": False, "static_graph": False,
                                        "micro_batches": 1, "timeout": None, "start_method": "auto"}
START_METHODS = ("auto", "fork", "spawn")


def check_distributed(given: Mapping[str, Any] | None, where: str = "distributed") -> dict[str, Any]:
    """Validate ``distributed=`` settings; the defaults fill in what is not given.

    Example:
        >>> check_distributed({"static_graph": True})["world_size"]
        2
    """
    if given is not None and not isinstance(given, Mapping):
        raise GradckptUsageError(f"{where}={given!r}: pass a dict such as {{'world_size': 2}}")
    chosen = dict(DISTRIBUTED_DEFAULTS)
    unknown = sorted(set(given or {}) - set(DISTRIBUTED_DEFAULTS))
    if unknown:
        raise GradckptUsageError(f"{where}: unknown option(s) {', '.join(unknown)}; accepted: "
                                 f"{', '.join(DISTRIBUTED_DEFAULTS)}")
    chosen.update(given or {})
    if chosen["start_method"] not in START_METHODS:
        raise GradckptUsageError(f"{where}: start_method={chosen['start_method']!r}; pass one of "
                                 f"{', '.join(START_METHODS)}")
    for name in ("world_size", "micro_batches"):
        if isinstance(chosen[name], bool) or not isinstance(chosen[name], int) or chosen[name] < 1:
            raise GradckptUsageError(f"{where}: {name}={chosen[name]!r}; pass an int >= 1")
    limit = chosen["timeout"]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or not limit > 0):
        raise GradckptUsageError(f"{where}: timeout={limit!r}; pass seconds > 0 per step, or None (the default: "
                                 "a limit that scales with the measured model build and step times)")
    return chosen


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


def check_strategies(value: Any, where: str = "strategies") -> tuple[Any, ...] | None:
    """Validate ``strategies=``: None (every registered strategy), names (a list, or one text of
    names split at commas and spaces) and :class:`~pytest_gradckpt.strategies.Strategy` objects.

    Example:
        >>> check_strategies("reentrant, sac")
        ('reentrant', 'sac')
        >>> check_strategies([])
        Traceback (most recent call last):
        ...
        pytest_gradckpt.errors.GradckptUsageError: strategies is empty; pass at least one of reentrant, ...
    """
    from pytest_gradckpt.strategies import Strategy, available_strategies

    if value is None:
        return None
    if isinstance(value, str):
        items: Any = split_names(value) or []
    else:
        items = [value] if isinstance(value, Strategy) else value
    if not isinstance(items, Iterable):
        raise GradckptUsageError(f"{where}={value!r}: pass strategy names or Strategy objects")
    items = list(items)
    if not items:
        raise GradckptUsageError(f"{where} is empty; pass at least one of {', '.join(available_strategies(opt_in=True))}")
    for item in items:
        if not isinstance(item, (str, Strategy)):
            raise GradckptUsageError(f"{where}: {item!r} is neither a strategy name nor a Strategy; "
                                     f"pass names from {', '.join(available_strategies(opt_in=True))}")
    check_strategy_names([i for i in items if isinstance(i, str)], where)
    return tuple(items)


def check_scenarios(value: Any, where: str = "scenarios") -> tuple[Any, ...] | None:
    """Validate ``scenarios=``: None (``train``), names (a list, or one text of names) or
    :class:`~pytest_gradckpt.pipeline.scenarios.Scenario` objects.

    Example:
        >>> check_scenarios("train ddp")
        ('train', 'ddp')
    """
    from pytest_gradckpt.pipeline.scenarios import Scenario

    if value is None:
        return None
    items = (split_names(value) or []) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items:
        raise GradckptUsageError(f"{where}={value!r}: pass a non-empty list of names from {', '.join(SCENARIOS)}")
    check_scenario_names([i for i in items if not isinstance(i, Scenario)], where)
    return tuple(items)


def check_expect(expect: Any, where: str = "expect") -> dict[str, str] | None:
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
