"""Run the packaged suite under several torch x transformers x peft lines and compare their verdicts.

``python -m pytest_gradckpt matrix [--lines T/X/P,...] [--reference T/X/P] [--json PATH] [--keep DIR]
[-- PYTEST_ARGS...]``

A line is ``torch/transformers/peft`` releases (``2.15.0/5.24.0/0.21.2``). For each line a
throwaway environment that mirrors this one (:mod:`pytest_gradckpt.release.venvs`: a torch release
other than the installed one comes from a cached layer, built once) runs the packaged suite
against the reviewed expectations of its transformers line (:mod:`pytest_gradckpt.suite.expectations`).
Then one table lists every verdict that differs between the lines, and one line per line says
whether it met its own reviewed expectations; ``--json`` writes one row per line with every
difference from the reference line, naming both sides. Exit status: 0 when every line met
its expectations, 1 when any did not, 2 when an environment could not be built.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from pytest_gradckpt.release.venvs import BuildError, Environment, installed

#: A chosen subset of torch x transformers x peft: the oldest supported line (torch 2.13, transformers
#: 4.57, peft 0.18), the pinned one, peft 0.18 on the newest transformers, and torch 2.14 and 2.15
#: (CUDA builds) on the newest transformers and peft; the last one, the newest of each, is the reference.
DEFAULT_LINES = ("2.13.0/4.57.6/0.18.1", "2.13.0/5.23.0/0.21.2", "2.13.0/5.24.0/0.18.1",
                 "2.14.1/5.24.0/0.21.2", "2.15.0/5.24.0/0.21.2")
#: The suite as ``make check`` runs it.
SUITE = ["-o", "addopts=", "--pyargs", "pytest_gradckpt.suite", "-n", "2"]


@dataclasses.dataclass(frozen=True)
class Line:
    """One combination of releases.

    Example:
        >>> Line.parse("2.15.0/5.24.0/0.21.2")
        Line(torch='2.15.0', transformers='5.24.0', peft='0.21.2')
        >>> str(Line.parse("2.15.0/5.24.0/0.21.2"))
        'torch 2.15.0, transformers 5.24.0, peft 0.21.2'
    """

    torch: str
    transformers: str
    peft: str

    @classmethod
    def parse(cls, text: str) -> Line:
        parts = [p.strip() for p in text.split("/")]
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"line {text!r} is not TORCH/TRANSFORMERS/PEFT (e.g. 2.15.0/5.24.0/0.21.2)")
        return cls(*parts)

    def pins(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return ", ".join(f"{name} {version}" for name, version in self.pins().items())


def verdicts(report: dict[str, Any]) -> dict[tuple[str, str], str]:
    """``(model, strategy/scenario) -> outcome`` from a JSON report.

    Example:
        >>> verdicts({"results": [{"model": "t5", "strategy": "sac", "scenario": "train", "outcome": "pass"}]})
        {('t5', 'sac/train'): 'pass'}
    """
    return {(r["model"], f"{r['strategy']}/{r['scenario']}"): r["outcome"] for r in report["results"]}


def differences(by_line: dict[str, dict[tuple[str, str], str]]) -> list[tuple[str, str, list[str]]]:
    """Rows ``(model, strategy/scenario, [outcome per line])`` where the lines disagree.

    Example:
        >>> differences({"4.57.6": {("t5", "sac/train"): "mismatch"}, "5.23.0": {("t5", "sac/train"): "pass"}})
        [('t5', 'sac/train', ['mismatch', 'pass'])]
    """
    keys = sorted(set().union(*by_line.values()))
    rows = []
    for key in keys:
        found = [by_line[line].get(key, "-") for line in by_line]
        if len(set(found)) > 1:
            rows.append((key[0], key[1], found))
    return rows


def from_reference(here: dict[tuple[str, str], str], reference: dict[tuple[str, str], str],
                   reference_name: str) -> list[str]:
    """Every verdict that differs from the reference line's, naming both sides.

    Example:
        >>> from_reference({("t5", "sac/train"): "mismatch"}, {("t5", "sac/train"): "pass"}, "torch 2.15.0")
        ['t5 sac/train: mismatch here; pass under torch 2.15.0']
    """
    return [f"{model} {key}: {here.get((model, key), '-')} here; {reference.get((model, key), '-')} under "
            f"{reference_name}" for model, key in sorted(set(here) | set(reference))
            if here.get((model, key), "-") != reference.get((model, key), "-")]


def counts(output: str) -> dict[str, int]:
    """pytest's closing counts.

    Example:
        >>> counts("== 2 failed, 43 passed, 8 skipped in 40.1s ==")
        {'passed': 43, 'failed': 2, 'skipped': 8}
    """
    return {word: int(m.group(1)) if (m := re.search(rf"(\d+) {word}", output)) else 0
            for word in ("passed", "failed", "skipped")}


def table(names: list[str], rows: list[tuple[str, str, list[str]]]) -> str:
    """A Markdown table of the differing verdicts."""
    lines = [" | ".join(["model", "strategy/scenario", *names]), " | ".join(["---"] * (2 + len(names)))]
    lines += [" | ".join([model, key, *found]) for model, key, found in rows]
    return "\n".join(f"| {line} |" for line in lines)


def run_line(line: Line, workspace: Path, extra: list[str]) -> dict[str, Any]:
    """Build ``line``'s environment and run the suite there: a result row (``verdicts`` inside)."""
    started = time.perf_counter()
    folder = workspace / str(line).replace(", ", "_").replace(" ", "-")
    environment = Environment(line.pins(), folder)
    environment.create(lambda text: print(f"matrix: {text}", flush=True))
    built = time.perf_counter()
    report = folder / "report.json"
    code, output = environment.run_pytest([*SUITE, f"--gradckpt-report={report}", *extra], Path.cwd())
    if not report.exists():
        print(output[-3000:])
        raise BuildError(f"the suite did not run under {line} (exit {code})")
    document = json.loads(report.read_text())
    found = counts(output.strip().splitlines()[-1] if output.strip() else "")
    return {**line.pins(), **found, "met_expectations": code == 0,
            "build_seconds": round(built - started), "suite_seconds": round(time.perf_counter() - built),
            "versions": document.get("versions", {}), "notices": document.get("notices", []),
            "verdicts": verdicts(document),
            "failures": [line for line in output.splitlines() if line.startswith("FAILED")]}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_gradckpt matrix",
                                     description="Run the packaged suite under several torch/transformers/peft lines.")
    parser.add_argument("--lines", default=",".join(DEFAULT_LINES),
                        help=f"comma-separated TORCH/TRANSFORMERS/PEFT lines (default {','.join(DEFAULT_LINES)})")
    parser.add_argument("--releases", help="comma-separated transformers releases, torch and peft as installed "
                                           "(instead of --lines)")
    parser.add_argument("--reference", help="the line differences are named against (default: the last one)")
    parser.add_argument("--json", metavar="PATH", help="write one row per line to PATH")
    parser.add_argument("--keep", metavar="DIR", help="keep the environments and reports in DIR")
    parser.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: more arguments for pytest")
    args = parser.parse_args(argv)
    extra = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
    try:
        lines = _lines(args)
        reference = Line.parse(args.reference) if args.reference else lines[-1]
    except ValueError as error:
        parser.error(str(error))
    if reference not in lines:
        parser.error(f"--reference {reference} is not one of the lines")
    started = time.perf_counter()
    rows: dict[Line, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gradckpt-matrix-") as scratch:
        workspace = Path(args.keep or scratch)
        workspace.mkdir(parents=True, exist_ok=True)
        for line in lines:
            try:
                rows[line] = run_line(line, workspace, extra)
            except BuildError as error:
                print(f"matrix: cannot build {line}: {error}")
                return 2
            row = rows[line]
            met = "meets" if row["met_expectations"] else "DIFFERS from"
            print(f"matrix: {line}: {met} its reviewed expectations ({row['passed']} passed, {row['failed']} failed, "
                  f"{row['skipped']} skipped; build {row['build_seconds']} s, suite {row['suite_seconds']} s)", flush=True)
    return _summarize(lines, rows, reference, args.json, time.perf_counter() - started)


def _lines(args: argparse.Namespace) -> list[Line]:
    if args.releases:
        return [Line(str(installed("torch")).split("+")[0], r.strip(), str(installed("peft")))
                for r in args.releases.split(",") if r.strip()]
    return [Line.parse(text) for text in args.lines.split(",") if text.strip()]


def _summarize(lines: list[Line], rows: dict[Line, dict[str, Any]], reference: Line, json_path: str | None,
               seconds: float) -> int:
    names = [f"{line.torch}/{line.transformers}/{line.peft}" for line in lines]
    differing = differences({name: rows[line]["verdicts"] for name, line in zip(names, lines, strict=True)})
    print(f"\nVerdicts that differ between lines ({len(differing)}):\n")
    print(table(names, differing) if differing else "(none)")
    print()
    for line in lines:
        row = rows[line]
        met = "meets" if row["met_expectations"] else "DIFFERS from"
        print(f"{line}: {met} its reviewed expectations ({row['passed']} passed, {row['failed']} failed)")
        for failure in row["failures"]:
            print(f"    {failure}")
    print(f"matrix: {len(lines)} line(s) in {seconds:.0f} s")
    if json_path:
        document = {"reference": str(reference), "seconds": round(seconds), "lines": [
            {**{k: v for k, v in rows[line].items() if k != "verdicts"},
             "differences_from_reference": from_reference(rows[line]["verdicts"], rows[reference]["verdicts"],
                                                          str(reference))} for line in lines]}
        Path(json_path).write_text(json.dumps(document, indent=1) + "\n")
        print(f"matrix: rows written to {json_path}")
    return 0 if all(row["met_expectations"] for row in rows.values()) else 1
