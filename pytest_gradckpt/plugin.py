"""The pytest plugin: options, the ``gradckpt`` marker, fixtures, generated items and reports.

This module speaks pytest only. Checking lives in :mod:`pytest_gradckpt.engine`,
imported when a check actually runs, so loading the plugin never imports torch.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_gradckpt import environment
from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.marker import marker_help, marker_settings
from pytest_gradckpt.spec import FLAGS, OPTION, OPTIONS, TRAINER_OPTIONS, CheckSpec, Flag
from pytest_gradckpt.report import Result, format_table

OPT_IN_REASON = "gradient-checkpointing checks are opt-in: run pytest with --gradckpt (or set 'gradckpt = true' in the ini file)"
PROPERTY = "gradckpt"
FIXTURES = ("gradckpt", "gradckpt_strategy")

factories_key = pytest.StashKey[dict[str, Any]]()
baselines_key = pytest.StashKey[dict[Any, Any]]()
#: this process's rank under ``torchrun -m pytest --gradckpt`` (absent otherwise)
rank_key = pytest.StashKey[int]()
golden_key = pytest.StashKey[dict[str, Any]]()
#: validated marker settings (or the usage error), by the marker object's id (items share one)
markers_key = pytest.StashKey[dict[int, tuple[pytest.Mark, dict[str, Any] | pytest.UsageError]]]()
#: how many times an item reached a check (run_check); a marked item that never does fails
checks_key = pytest.StashKey[int]()
#: lines the report opens with (e.g. the packaged suite's 'newer than every reviewed line')
notices_key = pytest.StashKey[list[str]]()
#: the check options set by flags and ini, validated at configure
session_values_key = pytest.StashKey[dict[str, Any]]()

#: The session's own flags (what to run and where results go); the check options' flags are the
#: option table's (:data:`pytest_gradckpt.spec.FLAGS`).
SESSION_FLAGS: tuple[Flag, ...] = (
    Flag("--gradckpt", "run gradient-checkpointing checks (marked tests, fixtures, generated items)", ini_type="bool"),
    Flag("--gradckpt-model", "generate checks for a factory returning (model, inputs[, loss]); repeatable",
         "MODULE:FACTORY", ini_type="linelist"),
    Flag("--gradckpt-models", "comma-separated built-in zoo entries for the packaged suite (default: the "
         "representative subset; 'all')", "NAMES"),
    Flag("--gradckpt-report", "write every result as JSON to PATH", "PATH"),
    Flag("--gradckpt-record", "write a golden record (outcomes + loss, gradient norms, activation bytes + versions) "
         "to PATH", "PATH"),
    Flag("--gradckpt-compare", "fail every check whose outcome or numbers changed since the golden record at PATH",
         "PATH"),
    Flag("--gradckpt-bisect", "exit codes for 'git bisect run': 0 good, 1 bad, 125 when the code under test cannot "
         "be imported", ini_type="bool"),
    Flag("--gradckpt-update-expected", "packaged suite: write this run's verdicts as the installed transformers "
         "line's expectations, for review", ini_type="bool"),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradckpt", "gradient checkpointing checks (pytest-gradckpt)")
    for flag in (*SESSION_FLAGS, *FLAGS):
        group.addoption(flag.flag, dest=flag.ini, help=flag.help, **flag.addoption_keywords())
        parser.addini(flag.ini, f"{flag.help} (ini twin of {flag.flag})", type=flag.ini_type,
                      default=False if flag.ini_type == "bool" else None)


def option(config: pytest.Config, name: str) -> Any:
    """A setting from the command line if given there, else from the ini file."""
    value = config.getoption(name)
    if value is None or value == []:
        value = config.getini(name)
    return value if value not in ("", []) else None


def add_notice(config: pytest.Config, line: str) -> None:
    """Open the gradckpt report (terminal summary and JSON) with ``line``."""
    config.stash.setdefault(notices_key, []).append(line)


def enabled(config: pytest.Config) -> bool:
    return bool(option(config, "gradckpt"))


def _usage(error: GradckptUsageError) -> pytest.UsageError:
    return pytest.UsageError(f"pytest-gradckpt: {error}")


def flag_value(config: pytest.Config, name: str) -> Any:
    """Option ``name``'s session-wide value from its flag (or the flag's ini twin), validated by the
    option's one validator; None when not set."""
    flag = OPTION[name].flag
    assert flag is not None, name
    raw = option(config, flag.ini)
    if raw is None:
        return None
    try:
        return OPTION[name].validate(flag.parse(raw, flag.flag), flag.flag)
    except GradckptUsageError as error:
        raise _usage(error) from None


def session_values(config: pytest.Config) -> dict[str, Any]:
    """The check options set for the whole session by flags or ini (validated once, at configure).
    Strategies wait for collection (a conftest may register some); ``compile_order`` is a default
    for models with compiled blocks only (:func:`run_check`)."""
    if session_values_key not in config.stash:
        values = {o.name: flag_value(config, o.name) for o in OPTIONS
                  if o.flag is not None and o.name != "strategies"}
        config.stash[session_values_key] = {name: value for name, value in values.items() if value is not None}
    return config.stash[session_values_key]


def _under_launch(config: pytest.Config) -> bool:
    return config.stash.get(rank_key, None) is not None


def _reports_here(config: pytest.Config) -> bool:
    """Under torchrun every rank runs the same checks to the same verdicts: rank 0 reports them."""
    return config.stash.get(rank_key, 0) == 0


@pytest.hookimpl(tryfirst=True)  # before junitxml opens its file: only rank 0 writes it
def pytest_configure(config: pytest.Config) -> None:
    if enabled(config) and "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun's, any size
        from pytest_gradckpt.distributed import join_launch

        rank = join_launch(option(config, "gradckpt_device"))
        if rank is not None:
            config.stash[rank_key] = rank
            if rank != 0:
                config.option.xmlpath = None
    config.addinivalue_line("markers", marker_help())
    config.stash[markers_key] = {}
    config.pluginmanager.register(GradckptReporter(config), "gradckpt-reporter")
    if enabled(config):
        from pytest_gradckpt.suite import lines

        if lines.runs_the_suite(config.args):  # here, not in the suite's conftest: xdist's controller never loads it
            lines.register(config, add_notice, option)
    config.stash[factories_key] = {}
    config.stash[baselines_key] = {}
    session_values(config)
    try:
        if option(config, "gradckpt_compare"):
            from pytest_gradckpt import golden

            config.stash[golden_key] = golden.load(option(config, "gradckpt_compare"))
    except GradckptUsageError as error:
        raise _usage(error) from None


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> int | None:
    """``--gradckpt-strategies=help``: list the registered strategies (conftest registrations
    included) with what each does, and exit, as ``--fixtures`` does."""
    if option(config, "gradckpt_strategies") != "help":
        return None
    print(strategies_help())
    return 0


def strategies_help() -> str:
    """One line per registered strategy: its name and description; those that run only when
    named (``compile_budget``, ``sac_offload``, ...) say so.

    Example:
        >>> print(strategies_help().splitlines()[1])
          reentrant  torch.utils.checkpoint per layer, use_reentrant=True
        >>> sorted(line.split()[0] for line in strategies_help().splitlines() if "opt-in" in line)
        ['compile_budget', 'hf_every_2', 'hf_offload', 'sac_offload']
    """
    from pytest_gradckpt import compile_budget  # noqa: F401 - registers the opt-in compile_budget
    from pytest_gradckpt.strategies import available_strategies, get_strategy

    names = available_strategies(opt_in=True)
    width = max(map(len, names))
    lines = [f"  {name:<{width}}  {get_strategy(name).description}"
             + (" (opt-in: runs only when named)" if getattr(get_strategy(name), "opt_in", False) else "")
             for name in names]
    return "\n".join(["strategies (pass names to --gradckpt-strategies or @pytest.mark.gradckpt(strategies=...)):",
                      *lines])


def pytest_unconfigure(config: pytest.Config) -> None:
    if _under_launch(config):
        from pytest_gradckpt.distributed import leave_launch

        leave_launch()


def _selected_strategies(config: pytest.Config, marker_settings: dict[str, Any]) -> list[str] | None:
    if marker_settings.get("strategies"):
        return list(marker_settings["strategies"])
    chosen = flag_value(config, "strategies")
    return None if chosen is None else list(chosen)


def _marker_settings(node: Any) -> dict[str, Any]:
    """The node's marker settings, validated once per marker object (a parametrized test's
    items and its definition share one)."""
    marker = node.get_closest_marker("gradckpt")
    if marker is None:
        return {}
    validated = node.config.stash[markers_key]
    if id(marker) not in validated:
        try:
            validated[id(marker)] = (marker, marker_settings(marker.args, marker.kwargs, node.nodeid))
        except GradckptUsageError as error:
            validated[id(marker)] = (marker, _usage(error))
    found = validated[id(marker)][1]
    if isinstance(found, pytest.UsageError):
        raise found
    return found


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "gradckpt_strategy" not in metafunc.fixturenames:
        return
    from pytest_gradckpt.strategies import available_strategies

    try:
        marker = _marker_settings(metafunc.definition)
    except pytest.UsageError:
        marker = {}  # raised here it would be a collection error with a traceback: it is raised after collection
    names = _selected_strategies(metafunc.config, marker) or available_strategies()
    metafunc.parametrize("gradckpt_strategy", names, ids=names, indirect=True)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    _selected_strategies(config, {})  # unknown names in options are a usage error, even with no marked test
    if enabled(config):
        items.extend(_generated_items(session, config))
    skip = pytest.mark.skip(reason=OPT_IN_REASON)
    for item in items:
        uses_fixture = any(name in getattr(item, "fixturenames", ()) for name in FIXTURES)
        if item.get_closest_marker("gradckpt") is None and not uses_fixture and not isinstance(item, GradckptItem):
            continue
        _marker_settings(item)
        if not enabled(config):
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Any:
    """The gate cannot pass without checking: a test marked ``gradckpt`` (or using the ``gradckpt``
    fixture) that returned without reaching ``gradckpt.check`` fails. A test that raised, failed or
    skipped keeps its own outcome."""
    result = yield
    if enabled(item.config) and not isinstance(item, GradckptItem) and not item.stash.get(checks_key, 0):
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


def pytest_report_header(config: pytest.Config) -> str | None:
    if not enabled(config):
        return None
    import torch  # noqa: F401 - the run needs it anyway; it makes the device facts available

    facts = environment.versions()
    return "gradckpt: " + ", ".join(f"{k} {v}" for k, v in facts.items())


# --------------------------------------------------------------------------- the checker


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
        self.settings = _marker_settings(request.node)
        strategy = getattr(request.node, "callspec", None)
        parametrized = strategy.params.get("gradckpt_strategy") if strategy is not None else None
        self.strategies = [parametrized] if parametrized else _selected_strategies(self._config, self.settings)

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
        node.stash[checks_key] = node.stash.get(checks_key, 0) + 1
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
        node.stash[checks_key] = node.stash.get(checks_key, 0) + 1  # a trainer check is a check: the gate judged
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


#: ``check_options`` key for --gradckpt-compile-order (validated at configure), resolved per model by run_check.
SESSION_COMPILE_ORDER = "session_compile_order"


def check_options(config: pytest.Config, marker: dict[str, Any], strategies: list[str] | None) -> dict[str, Any]:
    """The check's options by name (a :class:`~pytest_gradckpt.spec.CheckSpec` is built from them):
    marker first, then options, then ini. Steps run isolated where that is cheap (``isolate="auto"``):
    a crash never ends the session."""
    chosen = {k: v for k, v in marker.items() if k != "expect"}
    chosen.setdefault("isolate", "auto")
    chosen["fingerprint"] = bool(option(config, "gradckpt_record") or option(config, "gradckpt_compare"))
    chosen["strategies"] = strategies
    for name, value in session_values(config).items():
        if name == "compile_order":
            if name not in chosen:  # a session-wide default: run_check applies it to models with compiled blocks only
                chosen[SESSION_COMPILE_ORDER] = value
        else:
            chosen.setdefault(name, value)
    return chosen


def run_check(node: pytest.Item, model: Any, inputs: Any, *, loss: Callable[..., Any] | None, name: str | None,
              options: dict[str, Any], expect: dict[str, str] | None = None, strict: bool = False,
              reviewed: tuple[str, str] | None = None) -> Any:
    """Run the engine for ``node``, record its results, and fail the test on any problem:
    a usage error, a result that is not as expected, or a change from the golden record."""
    from pytest_gradckpt.engine import check_spec

    node.stash[checks_key] = node.stash.get(checks_key, 0) + 1
    if SESSION_COMPILE_ORDER in options:
        from pytest_gradckpt.compiled import blocks_order

        options = dict(options)
        options["compile_order"] = blocks_order(model, options.pop(SESSION_COMPILE_ORDER))
    try:
        spec = CheckSpec.of(**options)
        report = check_spec(model, inputs, spec, loss=loss, name=name, cache=node.config.stash[baselines_key])
    except GradckptUsageError as error:
        pytest.fail(f"pytest-gradckpt: {error}", pytrace=False)
    record(node, report.results)
    problems = report.failures(expect, strict=strict, reviewed=reviewed) + golden_problems(node, report.results)
    if problems:
        pytest.fail("gradient checkpointing check failed:\n  " + "\n  ".join(problems) + "\n\n"
                    + format_table(report.results), pytrace=False)
    if nothing_judged(report.results, expect):
        # Every strategy was "does not apply" here: the test judged nothing, so it must not count as passed.
        pytest.skip("pytest-gradckpt: nothing was judged, every result is skipped: " + "; ".join(
            f"{r.strategy}/{r.scenario}: {r.message}" for r in report.results))
    return report


def nothing_judged(results: list[Result], expect: dict[str, str] | None) -> bool:
    """Whether a check judged nothing: every result ``skipped``, and no expectation says so.

    Example:
        >>> skipped = Result("native", "train", "skipped", "not a transformers model")
        >>> nothing_judged([skipped], None), nothing_judged([skipped], {"native": "skipped"})
        (True, False)
        >>> nothing_judged([skipped, Result("non_reentrant", "train", "pass", "")], None)
        False
    """
    return bool(results) and all(r.outcome == "skipped" for r in results) \
        and "skipped" not in (expect or {}).values()


def golden_problems(node: pytest.Item, results: list[Result]) -> list[str]:
    """Differences from the golden record given by --gradckpt-compare (none without it)."""
    path = option(node.config, "gradckpt_compare")
    if not path:
        return []
    from pytest_gradckpt import golden

    record = node.config.stash[golden_key]
    found = []
    for result in results:
        found += golden.differences(record, {"test": node.nodeid, **result.to_dict()})
    return found


def record(node: pytest.Item, results: list[Result]) -> None:
    """Attach results to the item as user properties: xdist ships them to the controller,
    JUnit XML writes them as <property> elements."""
    for result in results:
        node.user_properties.append((PROPERTY, json.dumps({"test": node.nodeid, **result.to_dict()},
                                                          default=str, sort_keys=True)))


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


# --------------------------------------------------------------------------- generated items


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


def _generated_items(session: pytest.Session, config: pytest.Config) -> list[pytest.Item]:
    specs = option(config, "gradckpt_model") or []
    if not specs:
        return []
    from pytest_gradckpt.strategies import available_strategies

    strategies = _selected_strategies(config, {}) or available_strategies()
    scenarios = list(session_values(config).get("scenarios") or ["train"])
    parent = GradckptModels.from_parent(session, name="gradckpt")
    items: list[pytest.Item] = []
    for spec in specs:
        try:
            load_factory(spec)
        except GradckptUsageError as error:
            raise _usage(error) from None
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
        cache = self.config.stash[factories_key]
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


# --------------------------------------------------------------------------- reports


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
        if not found or not _reports_here(self.config):
            return
        terminalreporter.write_sep("=", "gradient checkpointing")
        for notice in self.config.stash.get(notices_key, []):
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
        if _under_launch(self.config):
            from pytest_gradckpt.distributed import agreed_exit_status

            session.exitstatus = exitstatus = agreed_exit_status(int(exitstatus))
        if hasattr(self.config, "workerinput") or not _reports_here(self.config):
            return  # xdist workers: the controller writes the merged files; under torchrun, rank 0
        if option(self.config, "gradckpt_report"):
            self._write("gradckpt_report", {"versions": environment.versions(), "results": self.sorted_results(),
                                            "notices": self.config.stash.get(notices_key, [])})
        if option(self.config, "gradckpt_record"):
            from pytest_gradckpt import golden

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
