"""What the plugin keeps for one pytest session, in one object (pytest-memray's ``Manager`` is the
model): created at configure, registered with the plugin manager, found again with
:meth:`GradckptSession.of`. Nothing of a session lives in module-level state.
"""

from __future__ import annotations

from typing import Any

import pytest

#: The name the session object is registered under.
NAME = "gradckpt-session"


class GradckptSession:
    """The plugin's state for one pytest session (one per process: each xdist worker and torchrun
    rank has its own).

    Example:
        >>> session = GradckptSession()
        >>> session.count_check("test_x.py::test_x"), session.checks_of("test_x.py::test_x")
        (1, 1)
    """

    def __init__(self) -> None:
        #: the check options set by flags and ini, validated at configure (None until then)
        self.check_values: dict[str, Any] = {}
        #: ``--gradckpt-model`` factories' (model, inputs, loss), by factory spec: built once per session
        self.factories: dict[str, tuple[Any, Any, Any]] = {}
        #: baselines shared by the session's checks of one model (``check(cache=...)``)
        self.baselines: dict[Any, Any] = {}
        #: this process's rank under ``torchrun -m pytest --gradckpt`` (None otherwise)
        self.rank: int | None = None
        #: the golden record ``--gradckpt-compare`` names, loaded once
        self.golden: dict[str, Any] | None = None
        #: validated marker settings (or the usage error), by the marker object's id (items share one)
        self.markers: dict[int, tuple[pytest.Mark, dict[str, Any] | pytest.UsageError]] = {}
        #: how many times each item (by node id) reached a check; a gate that never does fails
        self.checks: dict[str, int] = {}
        #: lines the report opens with (e.g. the packaged suite's 'newer than every reviewed line')
        self.notices: list[str] = []

    @staticmethod
    def of(config: pytest.Config) -> GradckptSession:
        """The session object of ``config`` (registered by the plugin's ``pytest_configure``)."""
        found = config.pluginmanager.get_plugin(NAME)
        if not isinstance(found, GradckptSession):
            raise RuntimeError("pytest-gradckpt: no session object; was the plugin's pytest_configure skipped?")
        return found

    def count_check(self, nodeid: str) -> int:
        """Note that ``nodeid`` reached a check; returns how many it has reached."""
        self.checks[nodeid] = self.checks.get(nodeid, 0) + 1
        return self.checks[nodeid]

    def checks_of(self, nodeid: str) -> int:
        return self.checks.get(nodeid, 0)

    @property
    def under_launch(self) -> bool:
        """Whether this process is a rank of a torchrun launch of pytest."""
        return self.rank is not None

    @property
    def reports_here(self) -> bool:
        """Under torchrun every rank runs the same checks to the same verdicts: rank 0 reports them."""
        return self.rank in (None, 0)
