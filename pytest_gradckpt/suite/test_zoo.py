"""Zoo x strategies x scenarios, each verdict compared with the expected one."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import pytest

from pytest_gradckpt.suite import expectations

if TYPE_CHECKING:
    from pytest_gradckpt.plugin import Checker
    from pytest_gradckpt.zoo import ZooEntry


@pytest.mark.gradckpt
def test_zoo(gradckpt: Checker, zoo_case: tuple[ZooEntry, str]) -> None:
    entry, scenario = zoo_case
    from pytest_gradckpt.strategies import available_strategies
    from pytest_gradckpt.zoo.transformers_models import NotTiny

    try:
        model, inputs = entry.build()
    except NotTiny as reason:
        gradckpt.skip(entry.name, scenario, str(reason))
    try:  # the engine deep-copies the model for every run; a few models cannot be copied: rebuild those
        copy.deepcopy(model)
        subject = model
    except Exception:  # noqa: BLE001
        subject = lambda: entry.build()[0]  # noqa: E731
    strategies = gradckpt.strategies or available_strategies()
    expect = expectations.for_entry(entry.name, strategies, scenario)
    gradckpt.check(subject, inputs, scenarios=[scenario], name=entry.name, expect=expect, strict=True,
                   reviewed=expectations.reviewed_against(), isolate=entry.isolate)
