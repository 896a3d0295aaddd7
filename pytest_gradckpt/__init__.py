"""pytest-gradckpt: prove gradient (activation) checkpointing is correct.

The public API is imported lazily, so loading the pytest plugin (which
imports this package) does not import torch.

Example:
    >>> import pytest_gradckpt as gc
    >>> "non_reentrant" in gc.available_strategies()
    True
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "check": "pytest_gradckpt.pipeline.engine",
    "Report": "pytest_gradckpt.report",
    "Result": "pytest_gradckpt.report",
    "Strategy": "pytest_gradckpt.strategies",
    "register_strategy": "pytest_gradckpt.strategies",
    "unregister_strategy": "pytest_gradckpt.strategies",
    "available_strategies": "pytest_gradckpt.strategies",
    "GradckptUsageError": "pytest_gradckpt.errors",
    "SCENARIOS": "pytest_gradckpt.pipeline.scenarios",
    "layer_of": "pytest_gradckpt.pipeline.units",
    "memory_probe_of": "pytest_gradckpt.pipeline.units",
    "check_trainer": "pytest_gradckpt.trainers",
    "plan": "pytest_gradckpt.planning",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pytest_gradckpt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
