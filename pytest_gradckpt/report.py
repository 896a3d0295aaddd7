"""Results and reports: plain data, safe to import anywhere (torch is imported only once a
result's metrics are checked or a table is drawn: the probes declare their keys and columns).

A result's ``metrics`` is a :class:`Metrics`: a dict whose keys must be declared, by a registered
probe (:mod:`pytest_gradckpt.probes.registry`) or in :data:`OWN_METRICS`, so a mistyped key is an
error instead of a blank column.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pytest_gradckpt import outcomes

#: Outcomes that never fail a check: the strategy was fine, or did not apply.
OK_OUTCOMES = frozenset({outcomes.PASS, outcomes.SKIPPED})

#: Metric keys no probe declares, with where they come from.
OWN_METRICS: dict[str, str] = {
    "max_grad_diff": "verdicts: the largest |gradient difference|",
    "worst_parameter": "verdicts: the parameter whose gradient differs most",
    "baseline": "verdicts: the baseline's kind (whole-model or layerwise)",
    "baseline_noise": "verdicts: the baseline's run-to-run noise",
    "within_noise": "verdicts: tensors judged against that noise",
    "ranks": "engine: where a distributed scenario's ranks ran",
    "factory_seconds": "engine: how long the model's factory took in this check (where it built: the ranks, or here)",
    "compiled": "engine: what dynamo compiled for the run",
    "fingerprint": "engine: the golden record's numbers",
    "setting": "trainers: the trainer configuration judged",
}


class UnknownMetric(KeyError):
    """A metric key nobody declares (most often a typo)."""

    def __str__(self) -> str:
        return str(self.args[0])


def known_metrics() -> frozenset[str]:
    """Every metric key a result may hold: :data:`OWN_METRICS` and the registered probes'."""
    from pytest_gradckpt.probes import registry  # imports torch: not at module level

    return frozenset(OWN_METRICS) | registry.metric_keys()


class Metrics(dict[str, Any]):
    """A result's measured facts: a ``dict`` whose keys must be declared, in writing and reading
    alike (``get`` of an undeclared key raises too). The keys declared when the metrics were made
    stay known to them (a probe added for one ``with`` block, say).

    Example:
        >>> m = Metrics(max_grad_diff=0.0)
        >>> m.get("activation_reduction") is None, m["max_grad_diff"]
        (True, 0.0)
        >>> m.get("max_grad_dif")
        Traceback (most recent call last):
        ...
        pytest_gradckpt.report.UnknownMetric: unknown metric 'max_grad_dif': declared keys are ...
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.known = known_metrics()
        self.update(*args, **kwargs)

    def declared(self, key: str) -> str:
        """``key``, if it is declared; else :class:`UnknownMetric` naming the declared ones."""
        if key not in self.known:
            raise UnknownMetric(f"unknown metric {key!r}: declared keys are {', '.join(sorted(self.known))} (a probe "
                                "declares its own in metric_keys)")
        return key

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(self.declared(key), value)

    def __getitem__(self, key: str) -> Any:
        return super().__getitem__(self.declared(key))

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(self.declared(key), default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default: Any = None) -> Any:
        return super().setdefault(self.declared(key), default)

    def __reduce__(self) -> tuple[Any, ...]:  # pickles and copies keep what was declared
        return _rebuilt, (dict(self), self.known)


def _rebuilt(items: dict[str, Any], known: frozenset[str]) -> Metrics:
    metrics = Metrics.__new__(Metrics)
    metrics.known = known
    dict.update(metrics, items)
    return metrics


@dataclasses.dataclass
class Result:
    """The verdict for one strategy under one scenario.

    ``metrics`` holds measured facts: ``max_grad_diff``, ``worst_parameter``,
    ``activation_bytes`` and ``activation_reduction`` (saved-for-backward peak
    and its drop versus the baseline), ``recomputed_layers`` and
    ``checkpointable_layers``, ``layer_calls``, ``recomputed_units`` (the modules that really
    ran again in backward, whoever checkpointed them), ``time_ratio`` (not on CUDA), on CUDA
    ``cuda_peak_bytes`` and ``cuda_reduction``, and for a noisy baseline ``baseline_noise``
    and ``within_noise``.

    Example:
        >>> r = Result("reentrant", "train", "silent", "layers.0.weight got no gradient")
        >>> r.ok
        False
    """

    strategy: str
    scenario: str
    outcome: str
    message: str = ""
    metrics: Metrics = dataclasses.field(default_factory=Metrics)
    model: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.metrics, Metrics):
            self.metrics = Metrics(self.metrics)

    @property
    def ok(self) -> bool:
        """True for ``pass`` and ``skipped``."""
        return self.outcome in OK_OUTCOMES

    @property
    def key(self) -> str:
        """``strategy/scenario``, the form ``expect`` mappings use."""
        return f"{self.strategy}/{self.scenario}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (``metrics`` as a plain dict)."""
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        return {**fields, "metrics": copy.deepcopy(dict(self.metrics))}


def expected_outcome(result: Result, expect: Mapping[str, str] | None) -> str | None:
    """The outcome ``expect`` declares for ``result``, or None.

    A ``strategy/scenario`` key wins over a bare ``strategy`` key.

    Example:
        >>> r = Result("reentrant", "frozen_inputs", "silent")
        >>> expected_outcome(r, {"reentrant": "silent"})
        'silent'
        >>> expected_outcome(r, {"reentrant/train": "error"}) is None
        True
    """
    if not expect:
        return None
    return expect.get(result.key, expect.get(result.strategy))


def judge_against_expectation(result: Result, expect: Mapping[str, str] | None, strict: bool = False,
                              reviewed: tuple[str, str] | None = None) -> str | None:
    """Why ``result`` is a problem given ``expect``, or None when it is fine.

    A declared outcome that did not happen is a problem too: the hazard went away
    or changed, and the declaration must be updated (like a strict xfail). ``reviewed``
    (``(where the expectation was reviewed, what runs here)``) names both sides.

    Example:
        >>> judge_against_expectation(Result("reentrant", "train", "pass"), {"reentrant": "silent"})
        'reentrant/train: expected silent, got pass (update expect= if the hazard is gone)'
        >>> judge_against_expectation(Result("reentrant", "train", "silent"), {"reentrant": "silent"}) is None
        True
        >>> judge_against_expectation(Result("native", "train", "silent", "lost"), {"native": "pass"}, True,
        ...                           ("transformers 5.23.0", "transformers 4.57.6"))
        'native/train: reviewed for transformers 5.23.0: pass; here transformers 4.57.6: silent: lost'
    """
    wanted = expected_outcome(result, expect)
    if wanted is None:
        return None if result.ok else f"{result.key}: {result.outcome}: {result.message}"
    if result.outcome == wanted or (result.outcome == outcomes.SKIPPED and not strict):
        return None
    if strict and reviewed is not None:
        return f"{result.key}: reviewed for {reviewed[0]}: {wanted}; here {reviewed[1]}: {result.outcome}: {result.message}"
    if strict:
        return f"{result.key}: expected {wanted}, got {result.outcome}: {result.message}"
    return f"{result.key}: expected {wanted}, got {result.outcome} (update expect= if the hazard is gone)"


@dataclasses.dataclass
class Report:
    """Everything one ``check()`` found: a list of :class:`Result` plus context.

    Example:
        >>> rep = Report(model="toy", results=[Result("non_reentrant", "train", "pass")])
        >>> rep.passed
        True
        >>> rep.assert_ok()
    """

    model: str = ""
    results: list[Result] = dataclasses.field(default_factory=list)
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    baseline: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when every result is ``pass`` or ``skipped``."""
        return all(r.ok for r in self.results)

    def failures(self, expect: Mapping[str, str] | None = None, strict: bool = False,
                 reviewed: tuple[str, str] | None = None) -> list[str]:
        """One line per result that is a problem, honouring ``expect`` (exactly, when ``strict``;
        ``reviewed`` names where the expectations come from and what runs here)."""
        found = (judge_against_expectation(r, expect, strict, reviewed) for r in self.results)
        return [line for line in found if line]

    def assert_ok(self, expect: Mapping[str, str] | None = None) -> None:
        """Raise :class:`AssertionError` with a readable table unless all is fine."""
        problems = self.failures(expect)
        if problems:
            raise AssertionError(
                "gradient checkpointing check failed for "
                f"{self.model or 'model'}:\n" + "\n".join(problems) + "\n\n" + self.table()
            )

    def table(self) -> str:
        """A fixed-width table, one row per result."""
        return format_table(self.results)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form: ``{"model", "passed", "versions", "results"}``."""
        return {
            "model": self.model,
            "passed": self.passed,
            "versions": dict(self.versions),
            "baseline": dict(self.baseline),
            "results": [r.to_dict() for r in self.results],
        }

    def to_json(self, **kwargs: Any) -> str:
        """``json.dumps(self.to_dict())``."""
        return json.dumps(self.to_dict(), **kwargs)



#: The columns no probe declares: the gradient comparison's (before the probes').
_MAX_GRAD_DIFF = ("max|dgrad|", ("max_grad_diff",), lambda diff: "" if diff is None else f"{diff:.1e}")


def _columns() -> list[tuple[str, tuple[str, ...], Callable[..., str]]]:
    from pytest_gradckpt.probes import registry  # imports torch: not at module level

    return [_MAX_GRAD_DIFF, *((c.header, c.keys, c.cell) for c in registry.columns())]


def _row(result: Result, columns: list[tuple[str, tuple[str, ...], Callable[..., str]]]) -> list[str]:
    m = result.metrics
    return [
        result.model,
        result.strategy,
        result.scenario,
        result.outcome,
        *(cell(*(m.get(key) for key in keys)) for _, keys, cell in columns),
        result.message.splitlines()[0][:70] if result.message else "",
    ]


def format_table(results: Iterable[Result]) -> str:
    """Render results as an aligned text table (memory columns show the change).

    Example:
        >>> print(format_table([Result("sac", "train", "pass", model="toy")]).splitlines()[2])
        toy    sac       train     pass
    """
    columns = _columns()
    header = ["model", "strategy", "scenario", "outcome", *(name for name, _, _ in columns), "message"]
    rows = [_row(r, columns) for r in results]
    keep = [i for i in range(len(header)) if i < 4 or any(row[i] for row in rows)]
    table = [[header[i] for i in keep]] + [[row[i] for i in keep] for row in rows]
    widths = [max(len(line[c]) for line in table) for c in range(len(keep))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
