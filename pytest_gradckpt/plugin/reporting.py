"""Reporting: results ride on each test report (so xdist's controller and JUnit XML see them), and
one reporter per session prints the summary table and writes the JSON report and golden record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from pytest_gradckpt.release import environment
import pytest_gradckpt.plugin.launch as launch
from pytest_gradckpt.plugin.options import enabled, option
from pytest_gradckpt.plugin.session import GradckptSession
from pytest_gradckpt.report import Result, format_table

#: The user property (and JUnit ``<property>``) each result is recorded under.
PROPERTY = "gradckpt"
#: The name the reporter is registered under (the packaged suite's release lines read its results).
NAME = "gradckpt-reporter"


def record(node: pytest.Item, results: list[Result]) -> None:
    """Attach results to the item as user properties: xdist ships them to the controller,
    JUnit XML writes them as <property> elements."""
    for result in results:
        node.user_properties.append((PROPERTY, json.dumps({"test": node.nodeid, **result.to_dict()},
                                                          default=str, sort_keys=True)))


def pytest_report_header(config: pytest.Config) -> str | None:
    if not enabled(config):
        return None
    import torch  # noqa: F401 - the run needs it anyway; it makes the device facts available

    facts = environment.versions()
    return "gradckpt: " + ", ".join(f"{k} {v}" for k, v in facts.items())


class GradckptReporter:
    """Collects results from test reports (on the xdist controller too), prints the summary
    table and writes the JSON report. One per pytest config."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.results: list[dict[str, Any]] = []
        self.import_errors: list[str] = []

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed and any(name in report.longreprtext for name in ("ImportError", "ModuleNotFoundError")):
            self.import_errors.append(report.nodeid)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call":
            self.results.extend(json.loads(str(value)) for key, value in report.user_properties if key == PROPERTY)

    def sorted_results(self) -> list[dict[str, Any]]:
        # Completion order differs between serial and xdist runs; the report must not.
        return sorted(self.results, key=lambda r: (r["test"], r["strategy"], r["scenario"]))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        found = self.sorted_results()
        if not found or not GradckptSession.of(self.config).reports_here:
            return
        terminalreporter.write_sep("=", "gradient checkpointing")
        for notice in GradckptSession.of(self.config).notices:
            terminalreporter.write_line(f"gradckpt: {notice}")
        results = [Result(**{k: r[k] for k in ("strategy", "scenario", "outcome", "message", "metrics", "model")})
                   for r in found]
        terminalreporter.write_line(format_table(results))
        counts: dict[str, int] = {}
        for result in results:
            counts[result.outcome] = counts.get(result.outcome, 0) + 1
        terminalreporter.write_line("gradckpt: " + ", ".join(f"{n} {o}" for o, n in sorted(counts.items())))
        models = {r.model for r in results}
        not_run = {r.model for r in results if r.strategy == "all"} - {r.model for r in results if r.strategy != "all"}
        terminalreporter.write_line(f"gradckpt: {len(models)} model(s), {len(models) - len(not_run)} checked, "
                                    f"{len(not_run)} could not run (reasons above and in the JSON report)")
        path = option(self.config, "gradckpt_report")
        if path and not hasattr(self.config, "workerinput"):
            terminalreporter.write_line(f"gradckpt: JSON report written to {path}")

    def _write(self, name: str, document: dict[str, Any]) -> None:
        target = Path(option(self.config, name))
        if not target.is_absolute():
            target = Path(self.config.invocation_params.dir) / target
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(document, indent=2, sort_keys=True, default=str) + os.linesep)

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        state = GradckptSession.of(self.config)
        exitstatus = launch.agreed_exit_status(state, session, exitstatus)
        if hasattr(self.config, "workerinput") or not state.reports_here:
            return  # xdist workers: the controller writes the merged files; under torchrun, rank 0
        if option(self.config, "gradckpt_report"):
            self._write("gradckpt_report", {"versions": environment.versions(), "results": self.sorted_results(),
                                            "notices": state.notices})
        if option(self.config, "gradckpt_record"):
            from pytest_gradckpt.release import golden

            self._write("gradckpt_record", golden.build_record(self.sorted_results(), environment.versions()))
        if option(self.config, "gradckpt_bisect"):
            session.exitstatus = bisect_exit_code(int(exitstatus), bool(self.import_errors))


def bisect_exit_code(exitstatus: int, import_failed: bool) -> int:
    """pytest's exit status in ``git bisect run``'s terms: 0 good, 1 bad, 125 skip (the code under
    test cannot be imported, or nothing ran), 128 abort (a usage or internal error: fix the setup).

    Example:
        >>> bisect_exit_code(1, False), bisect_exit_code(2, True), bisect_exit_code(4, False)
        (1, 125, 128)
    """
    if import_failed or exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        return 125
    if exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        return int(exitstatus)
    return 128
