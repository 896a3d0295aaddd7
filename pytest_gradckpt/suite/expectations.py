"""Expected verdicts of the packaged suite, and the command that refreshes them.

``expected.json`` maps ``zoo entry -> {"strategy/scenario": outcome}`` for every verdict
that is not ``pass``; a verdict not listed must be ``pass``. Refresh it deliberately,
after reviewing every change, from a full run's JSON report::

    pytest --gradckpt --pyargs pytest_gradckpt.suite --gradckpt-models=all --gradckpt-report=r.json
    python -m pytest_gradckpt.suite.expectations r.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

PATH = Path(__file__).with_name("expected.json")


def load() -> dict[str, Any]:
    """The committed expectations (``{"versions": ..., "expected": {...}}``)."""
    return json.loads(PATH.read_text()) if PATH.exists() else {"versions": {}, "expected": {}}


def for_entry(name: str, strategies: list[str], scenario: str) -> dict[str, str]:
    """The exact outcome each strategy must have for ``name`` under ``scenario``.

    Example:
        >>> for_entry("batchnorm", ["non_reentrant"], "train")
        {'non_reentrant/train': 'buffers'}
    """
    listed = load()["expected"].get(name, {})
    return {f"{s}/{scenario}": listed.get(f"{s}/{scenario}", "pass") for s in strategies}


def from_report(report: dict[str, Any]) -> dict[str, Any]:
    """Expectations from a JSON report: every non-pass verdict of a zoo model."""
    expected: dict[str, dict[str, str]] = {}
    for result in report["results"]:
        if result["outcome"] != "pass" and result["strategy"] != "all":
            expected.setdefault(result["model"], {})[f"{result['strategy']}/{result['scenario']}"] = result["outcome"]
    return {"versions": report.get("versions", {}),
            "expected": {k: dict(sorted(v.items())) for k, v in sorted(expected.items())}}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pytest_gradckpt.suite.expectations REPORT.json", file=sys.stderr)
        return 2
    document = from_report(json.loads(Path(args[0]).read_text()))
    PATH.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    print(f"wrote {PATH} ({sum(len(v) for v in document['expected'].values())} non-pass verdicts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
