"""Run the packaged suite under several transformers releases and compare their verdicts.

``python -m pytest_gradckpt matrix [--releases 4.57.6,5.15.1,5.23.0] [--keep DIR] [-- PYTEST_ARGS...]``

For each release, a throwaway virtual environment that mirrors this one (built as the bisect
builds them: this environment's packages behind the candidate's own, torch pinned) runs the
packaged suite against the reviewed expectations of that release's line
(:mod:`pytest_gradckpt.suite.expectations`). Then one table lists every verdict that differs
between the releases, and one line per release says whether it met its own reviewed
expectations. Exit status: 0 when every release met them, 1 when any did not, 2 when an
environment could not be built.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from packaging.version import Version

from pytest_gradckpt.bisect import BisectError, Candidate

#: One release per supported line, and one from the middle of the 5.x line.
DEFAULT_RELEASES = ("4.57.6", "5.15.1", "5.23.0")
#: The suite as ``make check`` runs it.
SUITE = ["-o", "addopts=", "--pyargs", "pytest_gradckpt.suite", "-n", "2"]


def verdicts(report: dict[str, Any]) -> dict[tuple[str, str], str]:
    """``(model, strategy/scenario) -> outcome`` from a JSON report.

    Example:
        >>> verdicts({"results": [{"model": "t5", "strategy": "sac", "scenario": "train", "outcome": "pass"}]})
        {('t5', 'sac/train'): 'pass'}
    """
    return {(r["model"], f"{r['strategy']}/{r['scenario']}"): r["outcome"] for r in report["results"]}


def differences(by_release: dict[str, dict[tuple[str, str], str]]) -> list[tuple[str, str, list[str]]]:
    """Rows ``(model, strategy/scenario, [outcome per release])`` where the releases disagree.

    Example:
        >>> differences({"4.57.6": {("t5", "sac/train"): "mismatch"}, "5.23.0": {("t5", "sac/train"): "pass"}})
        [('t5', 'sac/train', ['mismatch', 'pass'])]
    """
    keys = sorted(set().union(*by_release.values()))
    rows = []
    for key in keys:
        found = [by_release[release].get(key, "-") for release in by_release]
        if len(set(found)) > 1:
            rows.append((key[0], key[1], found))
    return rows


def table(releases: list[str], rows: list[tuple[str, str, list[str]]]) -> str:
    """A Markdown table of the differing verdicts."""
    lines = [" | ".join(["model", "strategy/scenario", *releases]),
             " | ".join(["---"] * (2 + len(releases)))]
    lines += [" | ".join([model, key, *found]) for model, key, found in rows]
    return "\n".join(f"| {line} |" for line in lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_gradckpt matrix",
                                     description="Run the packaged suite under several transformers releases.")
    parser.add_argument("--releases", default=",".join(DEFAULT_RELEASES),
                        help=f"comma-separated transformers versions (default {','.join(DEFAULT_RELEASES)})")
    parser.add_argument("--keep", metavar="DIR", help="keep the environments and reports in DIR")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: more arguments for pytest")
    args = parser.parse_args(argv)
    extra = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    releases = [r.strip() for r in args.releases.split(",") if r.strip()]
    with tempfile.TemporaryDirectory(prefix="gradckpt-matrix-") as scratch:
        workspace = Path(args.keep or scratch)
        workspace.mkdir(parents=True, exist_ok=True)
        by_release: dict[str, dict[tuple[str, str], str]] = {}
        status: dict[str, str] = {}
        for release in releases:
            started = time.perf_counter()
            candidate = Candidate("transformers", Version(release), workspace / f"transformers-{release}")
            try:
                candidate.create(lambda line: print(line.replace("bisect:", "matrix:"), flush=True))
            except BisectError as error:
                print(f"matrix: cannot build an environment with transformers=={release}: {error}")
                return 2
            report = workspace / f"report-{release}.json"
            code, output = candidate.run_pytest([*SUITE, f"--gradckpt-report={report}", *extra], Path.cwd())
            if not report.exists():
                print(output[-3000:])
                print(f"matrix: the suite did not run under transformers=={release} (exit {code})")
                return 2
            by_release[release] = verdicts(json.loads(report.read_text()))
            summary = next((line for line in reversed(output.splitlines()) if " in " in line), "").strip("= ")
            status[release] = ("meets its reviewed expectations" if code == 0 else
                               "DIFFERS from its reviewed expectations") + f" ({summary}; {time.perf_counter() - started:.0f} s)"
            print(f"matrix: transformers {release}: {status[release]}", flush=True)
        rows = differences(by_release)
        print(f"\nVerdicts that differ between releases ({len(rows)}):\n")
        print(table(releases, rows) if rows else "(none)")
        print()
        for release in releases:
            print(f"transformers {release}: {status[release]}")
    return 0 if all(s.startswith("meets") for s in status.values()) else 1
