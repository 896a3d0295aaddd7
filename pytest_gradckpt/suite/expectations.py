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

from packaging.version import Version

from pytest_gradckpt.release.environment import package_versions

FOLDER = Path(__file__).with_name("expected")
#: The packages a line is reviewed under, in the order messages name them.
REVIEWED_PACKAGES = ("torch", "transformers", "peft")


def installed_transformers() -> str | None:
    """The installed transformers version, or None without transformers."""
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


def line_of(version: str | None) -> str:
    """The release line a transformers version is judged by: the line named by its
    ``major.minor`` (``4.57``); for a version newer than every reviewed line of its major, the
    newest of those lines; else the line named by its ``major`` (``5``); else the newest line.

    Example:
        >>> line_of("4.57.6"), line_of("5.23.0"), line_of("5.15.1"), line_of("5.24.0"), line_of("5.25.0")
        ('4.57', '5', '5', '5.24', '5.24')
    """
    if version is None:
        return _newest()
    major, minor = (version.split(".") + ["0"])[:2]
    if path_for(f"{major}.{minor}").exists():
        return f"{major}.{minor}"
    same_major = [line for line in _lines() if line.split(".")[0] == major]
    if same_major and all(_base(version) > _base(reviewed_version(line, "transformers")) for line in same_major):
        return max(same_major, key=lambda line: _base(reviewed_version(line, "transformers")))
    return major if path_for(major).exists() else _newest()


def _lines() -> list[str]:
    return [p.stem.removeprefix("transformers-") for p in FOLDER.glob("transformers-*.json")]


def _base(version: str) -> Version:
    """``2.13.0+cpu`` -> ``2.13.0``: a local build tag does not make a release newer."""
    return Version(Version(version).base_version)


def reviewed_version(line: str, package: str) -> str:
    """The version of ``package`` that ``line`` was reviewed under (``"0"`` if not recorded).

    Example:
        >>> reviewed_version("4.57", "transformers")
        '4.57.6'
    """
    return str(load(line)["versions"].get(package, "0"))


def _newest() -> str:
    return max(_lines(), key=lambda line: _base(reviewed_version(line, "transformers")))


def newer_than_reviewed(installed: dict[str, str] | None = None) -> str | None:
    """One line saying which installed packages are newer than every reviewed line, naming the
    line the verdicts are compared against; None when every one is covered by a review.

    Example:
        >>> newer_than_reviewed({"transformers": "9.0.0", "torch": "2.13.0"})  # doctest: +ELLIPSIS
        'newer than every reviewed line: transformers 9.0.0 (newest reviewed 5.2...); verdicts are compared against the transformers-5... line (reviewed under torch ..., transformers 5.2..., peft ...)'
        >>> newer_than_reviewed({"transformers": "4.57.6", "torch": "2.13.0+cpu"}) is None
        True
    """
    installed = package_versions() if installed is None else installed
    newer = []
    for package in REVIEWED_PACKAGES:
        if package not in installed:
            continue
        newest = max((reviewed_version(line, package) for line in _lines()), key=_base)
        if _base(installed[package]) > _base(newest):
            newer.append(f"{package} {installed[package]} (newest reviewed {newest})")
    if not newer:
        return None
    line = line_of(installed.get("transformers"))
    under = ", ".join(f"{p} {reviewed_version(line, p)}" for p in REVIEWED_PACKAGES)
    return (f"newer than every reviewed line: {', '.join(newer)}; verdicts are compared against the "
            f"transformers-{line} line (reviewed under {under})")


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


def updated_line(results: list[dict[str, Any]], installed: dict[str, str]) -> tuple[str, dict[str, Any]]:
    """``(line, document)``: the installed ``major.minor`` line's expectations after this run.

    Verdicts that ran replace the ones of the line they were compared against; entries that
    did not run keep that line's. Review the document before committing it.

    Example:
        >>> run = [{"model": "t5", "strategy": "sac", "scenario": "train", "outcome": "mismatch"},
        ...        {"model": "batchnorm", "strategy": "sac", "scenario": "train", "outcome": "pass"}]
        >>> line, document = updated_line(run, {"transformers": "9.1.0", "torch": "3.0.0"})
        >>> line, document["expected"]["t5"]["sac/train"], "sac/train" in document["expected"]["batchnorm"]
        ('9.1', 'mismatch', False)
    """
    major, minor = (str(installed.get("transformers", "0.0")).split(".") + ["0"])[:2]
    compared = load(line_of(installed.get("transformers")))["expected"]
    expected = {model: dict(verdicts) for model, verdicts in compared.items()}
    for result in results:
        if result["strategy"] == "all":
            continue  # the entry could not be built: nothing to learn about its verdicts
        key = f"{result['strategy']}/{result['scenario']}"
        if result["outcome"] == "pass":
            expected.get(result["model"], {}).pop(key, None)
        else:
            expected.setdefault(result["model"], {})[key] = result["outcome"]
    document = {"versions": dict(sorted(installed.items())),
                "expected": {m: dict(sorted(v.items())) for m, v in sorted(expected.items()) if v}}
    return f"{major}.{minor}", document


def write_updated_line(results: list[dict[str, Any]], installed: dict[str, str] | None = None) -> str:
    """Write :func:`updated_line` into the package's ``expected/`` folder; the message to show."""
    line, document = updated_line(results, package_versions() if installed is None else installed)
    path = path_for(line)
    try:
        path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    except OSError as error:
        return f"could not write {path} ({error}): run from a source checkout (pip install -e .)"
    load.cache_clear()
    count = sum(len(v) for v in document["expected"].values())
    return f"wrote {path} ({count} non-pass verdicts): review every change (git diff) before committing it"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pytest_gradckpt.suite.expectations REPORT.json", file=sys.stderr)
        return 2
    document = from_report(json.loads(Path(args[0]).read_text()))
    version = str(document["versions"].get("transformers", "0.0"))
    major, minor = (version.split(".") + ["0"])[:2]
    # Refresh the line this version already belongs to; a version newer than its major's line
    # (or of no reviewed line) starts its own.
    line = next((c for c in (f"{major}.{minor}", major) if path_for(c).exists()
                 and _base(version) <= _base(reviewed_version(c, "transformers"))), f"{major}.{minor}")
    path = path_for(line)
    path.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    print(f"wrote {path} ({sum(len(v) for v in document['expected'].values())} non-pass verdicts)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
