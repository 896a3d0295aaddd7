"""The fixture and the gate: the ``gradckpt`` fixture's :class:`Checker` (``check()`` configured from
the marker, options and ini), the marker validated once per marker object, one item per strategy
for ``gradckpt_strategy``, opt-in skipping without ``--gradckpt``, and the rule that a gate cannot
pass without checking.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.plugin.marker import marker_settings
from pytest_gradckpt.plugin.checks import nothing_judged, run_check
from pytest_gradckpt.plugin.items import GradckptItem, generated_items
from pytest_gradckpt.plugin.options import check_options, enabled, option, selected_strategies, usage
from pytest_gradckpt.plugin.reporting import record
from pytest_gradckpt.plugin.session import GradckptSession
from pytest_gradckpt.report import Result, format_table
from pytest_gradckpt.spec import TRAINER_OPTIONS

OPT_IN_REASON = "gradient-checkpointing checks are opt-in: run pytest with --gradckpt (or set 'gradckpt = true' in the ini file)"
FIXTURES = ("gradckpt", "gradckpt_strategy")


def marker_settings_of(node: Any) -> dict[str, Any]:
    """The node's marker settings, validated once per marker object (a parametrized test's
    items and its definition share one)."""
    marker = node.get_closest_marker("gradckpt")
    if marker is None:
        return {}
    validated = GradckptSession.of(node.config).markers
    if id(marker) not in validated:
        try:
            validated[id(marker)] = (marker, marker_settings(marker.args, marker.kwargs, node.nodeid))
        except GradckptUsageError as error:
            validated[id(marker)] = (marker, usage(error))
    found = validated[id(marker)][1]
    if isinstance(found, pytest.UsageError):
        raise found
    return found


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "gradckpt_strategy" not in metafunc.fixturenames:
        return
    from pytest_gradckpt.strategies import available_strategies

    try:
        marker = marker_settings_of(metafunc.definition)
    except pytest.UsageError:
        marker = {}  # raised here it would be a collection error with a traceback: it is raised after collection
    names = selected_strategies(metafunc.config, marker) or available_strategies()
    metafunc.parametrize("gradckpt_strategy", names, ids=names, indirect=True)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    selected_strategies(config, {})  # unknown names in options are a usage error, even with no marked test
    if enabled(config):
        items.extend(generated_items(session, config))
    skip = pytest.mark.skip(reason=OPT_IN_REASON)
    for item in items:
        uses_fixture = any(name in getattr(item, "fixturenames", ()) for name in FIXTURES)
        if item.get_closest_marker("gradckpt") is None and not uses_fixture and not isinstance(item, GradckptItem):
            continue
        marker_settings_of(item)
        if not enabled(config):
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """The gate cannot pass without checking: a test marked ``gradckpt`` (or using the ``gradckpt``
    fixture) that returned without reaching ``gradckpt.check`` fails. A test that raised, failed or
    skipped keeps its own outcome."""
    result = yield
    if enabled(item.config) and not isinstance(item, GradckptItem) \
            and not GradckptSession.of(item.config).checks_of(item.nodeid):
        problem = _unchecked_problem(item)
        if problem:
            pytest.fail(problem, pytrace=False)
    return result


def _unchecked_problem(item: pytest.Item) -> str | None:
    """Why ``item`` is a gate that checked nothing, or None when it is not a gate."""
    fixtures = getattr(item, "fixturenames", ())
    if item.get_closest_marker("gradckpt") is not None and "gradckpt" not in fixtures:
        return (f"pytest-gradckpt: {item.nodeid} is marked @pytest.mark.gradckpt but does not use the 'gradckpt' "
                "fixture, so nothing was checked. Add the fixture and call it: "
                "def test_...(gradckpt): gradckpt.check(model, inputs)")
    if "gradckpt" in fixtures:
        return (f"pytest-gradckpt: {item.nodeid} requested the 'gradckpt' fixture but never called "
                "gradckpt.check(model, inputs) (or gradckpt.check_trainer(trainer)), so nothing was checked. "
                "Call it (or gradckpt.skip(model, scenario, reason) when the model cannot run), or drop the marker "
                "and the fixture")
    return None


class Checker:
    """What the ``gradckpt`` fixture returns: ``check()`` configured from marker, options and ini.

    Example (inside a test)::

        @pytest.mark.gradckpt(strategies=["non_reentrant"])
        def test_my_model(gradckpt):
            gradckpt.check(MyModel(), {"input_ids": ids})
    """

    def __init__(self, request: pytest.FixtureRequest):
        self._request = request
        self._config = request.config
        self.settings = marker_settings_of(request.node)
        strategy = getattr(request.node, "callspec", None)
        parametrized = strategy.params.get("gradckpt_strategy") if strategy is not None else None
        self.strategies = [parametrized] if parametrized else selected_strategies(self._config, self.settings)

    def check(self, model: Any, inputs: Any, *, loss: Callable[..., Any] | None = None, layers: Any = None,
              name: str | None = None, expect: dict[str, str] | None = None, strict: bool = False,
              reviewed: tuple[str, str] | None = None, **overrides: Any) -> Any:
        """Run the engine; fail the test unless every result passed (or matched ``expect``).

        ``expect`` here replaces the marker's; with ``strict=True`` every result must equal
        its expected outcome exactly (``pass`` and ``skipped`` included), as the packaged
        suite requires; ``reviewed=(where expect was reviewed, what runs here)`` names both
        sides of a difference.
        """
        kwargs = check_options(self._config, self.settings, self.strategies)
        kwargs.update(overrides)
        if layers is not None:
            kwargs["layers"] = layers
        return run_check(self._request.node, model, inputs, loss=loss, name=name, options=kwargs,
                         expect=self.settings.get("expect") if expect is None else expect, strict=strict,
                         reviewed=reviewed)

    def plan(self, model: Any, inputs: Any, *, memory_budget: Any = None, **kwargs: Any) -> Any:
        """:func:`pytest_gradckpt.planning.plan` inside a test: rank the correct configurations, write the
        plan's JSON and PNG beside ``--gradckpt-report`` (``<report>.plan-<test>.json``), and fail the
        test when no correct configuration fits ``memory_budget``.

        Example (inside a test)::

            def test_which_checkpointing(gradckpt):
                found = gradckpt.plan(MyModel(), {"input_ids": ids}, memory_budget="40GiB")
                assert found.recommended == "sac"
        """
        from pytest_gradckpt.planning import plan

        node = self._request.node
        GradckptSession.of(self._config).count_check(node.nodeid)
        try:
            found = plan(model, inputs, memory_budget=memory_budget, report=self._plan_path(), **kwargs)
        except GradckptUsageError as error:
            pytest.fail(f"pytest-gradckpt: {error}", pytrace=False)
        record(node, found.results)
        if found.recommended is None:
            pytest.fail(f"pytest-gradckpt plan: {found.why}\n\n{found.table()}", pytrace=False)
        return found

    def _plan_path(self) -> Path | None:
        report = option(self._config, "gradckpt_report")
        if not report:
            return None
        target = Path(report)
        if not target.is_absolute():
            target = Path(self._config.invocation_params.dir) / target
        test = "".join(c if c.isalnum() or c in "-_" else "_" for c in self._request.node.name)
        return target.with_name(f"{target.stem}.plan-{test}.json")

    def check_trainer(self, trainer: Any, *, name: str | None = None, expect: dict[str, str] | None = None,
                      **overrides: Any) -> Any:
        """Check ``trainer`` as configured (:func:`pytest_gradckpt.check_trainer`); fail the test unless
        it passed or matched ``expect`` (``{"trainer": "silent"}``, or keyed by the configuration's label).
        Marker settings used: ``rtol``, ``atol``, ``min_memory_reduction``, ``seed``, ``timeout``."""
        from pytest_gradckpt.trainers import check_trainer

        kwargs = check_options(self._config, self.settings, self.strategies)
        kwargs = {k: v for k, v in kwargs.items() if k in TRAINER_OPTIONS and v is not None}  # the spec's rows
        kwargs.update(overrides)
        node = self._request.node
        GradckptSession.of(self._config).count_check(node.nodeid)  # a trainer check is a check: the gate judged
        try:
            report = check_trainer(trainer, name=name, **kwargs)
        except GradckptUsageError as error:
            pytest.fail(f"pytest-gradckpt: {error}", pytrace=False)
        record(self._request.node, report.results)
        expect = self.settings.get("expect") if expect is None else expect
        if expect and "trainer" in expect:  # the configuration's label is long: "trainer" stands for it
            expect = {**expect, **{r.strategy: expect["trainer"] for r in report.results}}
        problems = report.failures(expect)
        if not problems and nothing_judged(report.results, expect):
            # A trainer gate exists to judge the trainer's checkpointing: with it switched off there is
            # nothing judged, and a gate that passes then would hide a configuration that lost it.
            problems = [f"{r.strategy}: skipped, so nothing was judged: {r.message} (pass "
                        "expect={'trainer': 'skipped'} if checkpointing is off on purpose)" for r in report.results]
        if problems:
            pytest.fail("trainer checkpointing check failed:\n  " + "\n  ".join(problems) + "\n\n"
                        + format_table(report.results), pytrace=False)
        return report

    def skip(self, model: str, scenario: str, reason: str) -> None:
        """Record that ``model`` could not run at all (it shows in the table and the JSON report), then skip."""
        record(self._request.node, [Result("all", scenario, "skipped", reason, model=model)])
        pytest.skip(f"{model}: {reason}")


@pytest.fixture
def gradckpt(request: pytest.FixtureRequest) -> Checker:
    """A checker configured from ``@pytest.mark.gradckpt``, ``--gradckpt-*`` options and ini.

    ``gradckpt.check(model, inputs, loss=..., layers=...)`` returns the Report and
    fails the test, with the table, when a strategy misbehaves.
    """
    return Checker(request)


@pytest.fixture
def gradckpt_strategy(request: pytest.FixtureRequest) -> str:
    """The strategy name this test item runs; one item per selected strategy."""
    return request.param
