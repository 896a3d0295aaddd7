"""Generated items: ``--gradckpt-model=module:factory`` becomes one item per model x strategy x
scenario, ``gradckpt::<model>[<strategy>-<scenario>]``, each a check of its own.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.plugin.checks import run_check
from pytest_gradckpt.plugin.options import check_options, option, selected_strategies, usage
from pytest_gradckpt.plugin.session import GradckptSession


def load_factory(spec: str) -> Callable[[], Any]:
    """Import ``package.module:factory``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise GradckptUsageError(f"--gradckpt-model={spec!r}: expected 'package.module:factory'")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as error:
        raise GradckptUsageError(f"--gradckpt-model={spec!r}: cannot load it ({type(error).__name__}: {error}); "
                                 "is the module importable from the current directory or installed?") from None
    if not callable(target):
        raise GradckptUsageError(f"--gradckpt-model={spec!r}: {attr} is not callable; it must return "
                                 "(model, inputs) or (model, inputs, loss)")
    return target


def generated_items(session: pytest.Session, config: pytest.Config) -> list[pytest.Item]:
    """One item per ``--gradckpt-model`` factory x selected strategy x scenario."""
    specs = option(config, "gradckpt_model") or []
    if not specs:
        return []
    from pytest_gradckpt.strategies import available_strategies

    strategies = selected_strategies(config, {}) or available_strategies()
    scenarios = list(GradckptSession.of(config).check_values.get("scenarios") or ["train"])
    parent = GradckptModels.from_parent(session, name="gradckpt")
    items: list[pytest.Item] = []
    for spec in specs:
        try:
            load_factory(spec)
        except GradckptUsageError as error:
            raise usage(error) from None
        model_name = spec.rpartition(":")[2]
        for strategy in strategies:
            for scenario in scenarios:
                items.append(GradckptItem.from_parent(parent, name=f"{model_name}[{strategy}-{scenario}]",
                                                      spec=spec, strategy=strategy, scenario=scenario))
    return items


class GradckptModels(pytest.Collector):
    """The parent of generated items, so their ids read ``gradckpt::<model>[<strategy>-<scenario>]``."""

    def collect(self) -> list[pytest.Item]:  # pragma: no cover - items are made directly
        return []


class GradckptItem(pytest.Item):
    """One model x strategy x scenario check, generated from ``--gradckpt-model``."""

    def __init__(self, *, spec: str, strategy: str, scenario: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.spec, self.strategy, self.scenario = spec, strategy, scenario
        self.add_marker(pytest.mark.gradckpt(strategies=[strategy], scenarios=[scenario]))

    def _subject(self) -> tuple[Any, Any, Any]:
        cache = GradckptSession.of(self.config).factories
        if self.spec not in cache:
            made = load_factory(self.spec)()
            if not isinstance(made, tuple) or len(made) not in (2, 3):
                raise GradckptUsageError(f"--gradckpt-model={self.spec!r} returned {type(made).__name__}; it must "
                                         "return (model, inputs) or (model, inputs, loss)")
            cache[self.spec] = made if len(made) == 3 else (*made, None)
        return cache[self.spec]

    def runtest(self) -> None:
        try:
            model, inputs, loss = self._subject()
        except GradckptUsageError as error:
            pytest.fail(f"pytest-gradckpt: {error}", pytrace=False)
        run_check(self, model, inputs, loss=loss, name=self.spec.rpartition(":")[2],
                  options=check_options(self.config, {"scenarios": [self.scenario]}, [self.strategy]))

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"gradckpt: {self.name}"
