"""Parametrizes the packaged suite over zoo entries x scenarios (``--gradckpt-models``)."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_gradckpt import plugin
from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.settings import split_names

#: Representative transformers models are also checked beyond ``train``.
EXTRA_SCENARIOS = ("eval_mode", "frozen_inputs", "autograd_grad")


def _cases(config: pytest.Config) -> list[tuple[Any, str]]:
    from pytest_gradckpt import zoo

    names = split_names(plugin.option(config, "gradckpt_models"))
    try:
        selected = zoo.select(names)
    except GradckptUsageError as error:
        raise pytest.UsageError(f"pytest-gradckpt: {error}") from None
    cases = []
    for entry in selected:
        scenarios = entry.scenarios
        if entry.family == "transformers" and entry.name in zoo.REPRESENTATIVE:
            scenarios = scenarios + EXTRA_SCENARIOS
        cases += [(entry, scenario) for scenario in scenarios]
    return cases


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "zoo_case" in metafunc.fixturenames:
        cases = _cases(metafunc.config)
        metafunc.parametrize("zoo_case", cases, ids=[f"{e.name}-{s}" for e, s in cases])


def pytest_configure(config: pytest.Config) -> None:
    # Import-time deprecations inside torch and transformers are not ours to act on.
    config.addinivalue_line("filterwarnings", "ignore::DeprecationWarning:torch.jit._script")
