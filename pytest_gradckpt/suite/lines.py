"""The packaged suite's release-line reporting, registered by the plugin on the process that
reports (the xdist controller too, which never loads the suite's conftest): the report opens with
"newer than every reviewed line" where that is so, and ``--gradckpt-update-expected`` writes the
installed line's verdicts at the end of the session.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pytest_gradckpt.suite import expectations

#: ``plugin.add_notice`` and ``plugin.option``, handed over by the plugin (no import back into it)
Notify = Callable[[pytest.Config, str], None]
Option = Callable[[pytest.Config, str], Any]


def runs_the_suite(args: list[str]) -> bool:
    """Whether pytest's arguments select the packaged suite (``--pyargs pytest_gradckpt.suite`` or its path).

    Example:
        >>> runs_the_suite(["pytest_gradckpt.suite"]), runs_the_suite(["pytest_gradckpt/suite/test_zoo.py::x"])
        (True, True)
        >>> runs_the_suite(["tests", "pytest_gradckpt"])
        False
    """
    return any(arg.startswith("pytest_gradckpt.suite") or "pytest_gradckpt/suite" in arg for arg in map(str, args))


class ReleaseLines:
    """Session hooks of the packaged suite's release lines."""

    def __init__(self, config: pytest.Config, notify: Notify, option: Option):
        self.config, self.notify, self.option = config, notify, option

    @pytest.hookimpl(trylast=True)  # before the terminal summary, which reports what was written
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if hasattr(self.config, "workerinput") or not self.option(self.config, "gradckpt_update_expected"):
            return  # xdist workers: the controller has every worker's results
        reporter = self.config.pluginmanager.get_plugin("gradckpt-reporter")
        if reporter is not None and reporter.sorted_results():
            self.notify(self.config, expectations.write_updated_line(reporter.sorted_results()))


def register(config: pytest.Config, notify: Notify, option: Option) -> None:
    """Open the report with the newer-than-reviewed line where it applies, and add the session hooks."""
    if hasattr(config, "workerinput"):
        return
    notice = expectations.newer_than_reviewed()
    if notice:
        notify(config, notice)
    config.pluginmanager.register(ReleaseLines(config, notify, option), "gradckpt-release-lines")
