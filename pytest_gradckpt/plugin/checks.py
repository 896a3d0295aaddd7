"""Running one check for a test item: the engine with the item's :class:`~pytest_gradckpt.spec.CheckSpec`,
its results recorded, and the test failed on any problem (a usage error, an unexpected result, a
change from the golden record) or skipped when nothing was judged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.plugin.options import SESSION_COMPILE_ORDER, option
from pytest_gradckpt.plugin.reporting import record
from pytest_gradckpt.plugin.session import GradckptSession
from pytest_gradckpt.report import Result, format_table
from pytest_gradckpt.spec import CheckSpec


def run_check(node: pytest.Item, model: Any, inputs: Any, *, loss: Callable[..., Any] | None, name: str | None,
              options: dict[str, Any], expect: dict[str, str] | None = None, strict: bool = False,
              reviewed: tuple[str, str] | None = None) -> Any:
    """Run the engine for ``node``, record its results, and fail the test on any problem:
    a usage error, a result that is not as expected, or a change from the golden record."""
    from pytest_gradckpt.pipeline.engine import check_spec

    state = GradckptSession.of(node.config)
    state.count_check(node.nodeid)
    if SESSION_COMPILE_ORDER in options:
        from pytest_gradckpt.compilation.compiled import blocks_order

        options = dict(options)
        options["compile_order"] = blocks_order(model, options.pop(SESSION_COMPILE_ORDER))
    try:
        spec = CheckSpec.of(**options)
        report = check_spec(model, inputs, spec, loss=loss, name=name, cache=state.baselines)
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
    from pytest_gradckpt.release import golden

    golden_record = GradckptSession.of(node.config).golden
    assert golden_record is not None  # loaded at configure
    found = []
    for result in results:
        found += golden.differences(golden_record, {"test": node.nodeid, **result.to_dict()})
    return found
