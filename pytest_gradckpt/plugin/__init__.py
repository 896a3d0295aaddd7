"""The pytest plugin (entry point ``pytest_gradckpt.plugin``): options, the ``gradckpt`` marker,
fixtures, generated items and reports. One module per job:

- :mod:`~pytest_gradckpt.plugin.options`: the flags and ini twins, and how a check's options are layered;
- :mod:`~pytest_gradckpt.plugin.gate`: the ``gradckpt`` fixture, the marker and the gate;
- :mod:`~pytest_gradckpt.plugin.items`: items generated from ``--gradckpt-model``;
- :mod:`~pytest_gradckpt.plugin.checks`: one check run for an item, its results recorded;
- :mod:`~pytest_gradckpt.plugin.reporting`: the summary table, the JSON report, JUnit properties;
- :mod:`~pytest_gradckpt.plugin.launch`: membership of a torchrun launch;
- :mod:`~pytest_gradckpt.plugin.forking`: GPU ranks stay forkable whatever the test modules ask torch;
- :mod:`~pytest_gradckpt.plugin.session`: the session's state, in one object.

pytest registers this module, so the hooks and fixtures are imported here. It speaks pytest only:
checking lives in :mod:`pytest_gradckpt.pipeline.engine`, imported when a check actually runs, so loading
the plugin never imports torch.
"""

from __future__ import annotations

import pytest

from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.plugin.marker import marker_help
from pytest_gradckpt.plugin import forking, launch, reporting, session
from pytest_gradckpt.plugin.forking import pytest_load_initial_conftests
from pytest_gradckpt.plugin.checks import golden_problems, nothing_judged, run_check
from pytest_gradckpt.plugin.gate import (
    FIXTURES, OPT_IN_REASON, Checker, gradckpt, gradckpt_strategy, pytest_collection_modifyitems,
    pytest_generate_tests, pytest_runtest_call)
from pytest_gradckpt.plugin.items import GradckptItem, GradckptModels, load_factory
from pytest_gradckpt.plugin.options import (
    SESSION_FLAGS, add_notice, check_options, enabled, option, pytest_addoption, pytest_cmdline_main,
    session_check_values, strategies_help, usage)
from pytest_gradckpt.plugin.reporting import (
    PROPERTY, GradckptReporter, bisect_exit_code, pytest_report_header, record)
from pytest_gradckpt.plugin.session import GradckptSession

__all__ = [
    "FIXTURES", "OPT_IN_REASON", "PROPERTY", "SESSION_FLAGS", "Checker", "GradckptItem", "GradckptModels",
    "GradckptReporter", "GradckptSession", "add_notice", "bisect_exit_code", "check_options", "enabled",
    "golden_problems", "gradckpt", "gradckpt_strategy", "load_factory", "nothing_judged", "option",
    "pytest_addoption", "pytest_cmdline_main", "pytest_collection_modifyitems", "pytest_configure",
    "pytest_generate_tests", "pytest_load_initial_conftests", "pytest_report_header", "pytest_runtest_call",
    "pytest_unconfigure", "record", "run_check", "strategies_help"]


@pytest.hookimpl(tryfirst=True)  # before junitxml opens its file: only rank 0 writes it
def pytest_configure(config: pytest.Config) -> None:
    state = GradckptSession()
    config.pluginmanager.register(state, session.NAME)
    if enabled(config):
        launch.join(config, state, option(config, "gradckpt_device"))
    config.addinivalue_line("markers", marker_help())
    config.pluginmanager.register(GradckptReporter(config), reporting.NAME)
    if enabled(config):
        from pytest_gradckpt.suite import lines

        if lines.runs_the_suite(config.args):  # here, not in the suite's conftest: xdist's controller never loads it
            lines.register(config, add_notice, option)
    state.check_values = session_check_values(config)
    try:
        if option(config, "gradckpt_compare"):
            from pytest_gradckpt.release import golden

            state.golden = golden.load(option(config, "gradckpt_compare"))
    except GradckptUsageError as error:
        raise usage(error) from None


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.pluginmanager.get_plugin(session.NAME)
    if isinstance(state, GradckptSession):
        launch.leave(state)
    forking.put_back(config)
