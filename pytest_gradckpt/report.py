"""Results and reports: plain data, no torch, safe to import anywhere."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

from pytest_gradckpt import outcomes

#: Outcomes that never fail a check: the strategy was fine, or did not apply.
OK_OUTCOMES = frozenset({outcomes.PASS, outcomes.SKIPPED})


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
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    model: str = ""

    @property
    def ok(self) -> bool:
        """True for ``pass`` and ``skipped``."""
        return self.outcome in OK_OUTCOMES

    @property
    def key(self) -> str:
        """``strategy/scenario``, the form ``expect`` mappings use."""
        return f"{self.strategy}/{self.scenario}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)


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



def _row(result: Result) -> list[str]:
    m = result.metrics
    diff = m.get("max_grad_diff")
    reduction = m.get("activation_reduction")
    cuda = m.get("cuda_reduction")
    recomputed, total = m.get("recomputed_layers"), m.get("layers")
    ratio = m.get("time_ratio")
    return [
        result.model,
        result.strategy,
        result.scenario,
        result.outcome,
        "" if diff is None else f"{diff:.1e}",
        "" if reduction is None else f"{-reduction * 100:.0f}%",
        "" if cuda is None else f"{-cuda * 100:.0f}%",
        "" if total is None else f"{recomputed}/{total}",
        "" if ratio is None else f"{ratio:.2f}x",
        result.message.splitlines()[0][:70] if result.message else "",
    ]


HEADER = ["model", "strategy", "scenario", "outcome", "max|dgrad|", "act.mem", "cuda.mem", "recomp", "time", "message"]


def format_table(results: Iterable[Result]) -> str:
    """Render results as an aligned text table (memory columns show the change).

    Example:
        >>> print(format_table([Result("sac", "train", "pass", model="toy")]).splitlines()[2])
        toy    sac       train     pass
    """
    rows = [_row(r) for r in results]
    keep = [i for i in range(len(HEADER)) if i < 4 or any(row[i] for row in rows)]
    table = [[HEADER[i] for i in keep]] + [[row[i] for i in keep] for row in rows]
    widths = [max(len(line[c]) for line in table) for c in range(len(keep))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
