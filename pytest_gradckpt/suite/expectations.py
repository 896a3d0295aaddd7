"""Expected verdicts of the packaged suite, one reviewed file per release line, and the command
that refreshes them.

``expected/transformers-<line>.json`` maps ``zoo entry -> {"strategy/scenario": outcome}`` for
every verdict that is not ``pass`` (a verdict not listed must be ``pass``), with the versions it
was reviewed under. The file is chosen by the installed transformers: the line whose name is
the installed ``major.minor`` (``4.57``), else its ``major`` (``5``). A verdict that differs
from the reviewed one names both sides: ``reviewed for transformers 5.23.0: pass; here
transformers 4.57.6: silent``. Refresh a line deliberately, after reviewing every change, from
a full run's JSON report made under that line::

    pytest --gradckpt --pyargs pytest_gradckpt.suite --gradckpt-models=all --gradckpt-report=r.json
    python -m pytest_gradckpt.suite.expectations r.json
"""

from __future__ import annotations

import json
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

FOLDER = Path(__file__).with_name("expected")


def installed_transformers() -> str | None:
    """The installed transformers version, or None without transformers."""
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


def line_of(version: str | None) -> str:
    """The release line a transformers version belongs to (``5.23.0`` -> ``5``, ``4.57.6`` ->
    ``4.57``): the most specific line that has a reviewed file.

    Example:
        >>> line_of("4.57.6"), line_of("5.23.0"), line_of("5.15.1")
        ('4.57', '5', '5')
    """
    if version is None:
        return _newest()
    major, minor = (version.split(".") + ["0"])[:2]
    for line in (f"{major}.{minor}", major):
        if (FOLDER / f"transformers-{line}.json").exists():
            return line
    return _newest()


def _newest() -> str:
    lines = [p.stem.removeprefix("transformers-") for p in FOLDER.glob("transformers-*.json")]
    return max(lines, key=lambda line: tuple(int(part) for part in line.split(".")))


def path_for(line: str) -> Path:
    return FOLDER / f"transformers-{line}.json"


@lru_cache(maxsize=None)
def load(line: str | None = None) -> dict[str, Any]:
    """The reviewed expectations of ``line`` (default: the installed one's):
    ``{"versions": ..., "expected": {...}}``."""
    path = path_for(line or line_of(installed_transformers()))
    return json.loads(path.read_text()) if path.exists() else {"versions": {}, "expected": {}}


def reviewed_against() -> tuple[str, str]:
    """``(what the expectations were reviewed under, what is installed here)``, for messages.

    Example:
        >>> reviewed, here = reviewed_against()
        >>> reviewed.startswith("transformers ") and here.startswith("transformers ")
        True
    """
    reviewed = load()["versions"].get("transformers", "?")
    return f"transformers {reviewed}", f"transformers {installed_transformers()}"


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
    major, minor = (str(document["versions"].get("transformers", "0.0")).split(".") + ["0"])[:2]
    # Refresh the line this version already belongs to; a version of no reviewed line starts one.
    line = next((c for c in (f"{major}.{minor}", major) if path_for(c).exists()), f"{major}.{minor}")
    path = path_for(line)
    path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path} ({sum(len(v) for v in document['expected'].values())} non-pass verdicts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
