"""The one command: ``python -m benchmarks <suite> [--case NAME]... [--repeats N] [--out PATH] [--set KEY=VALUE]...``.

Runs the named cases of a suite (globs allowed; every case when none is named), each ``--repeats`` times where the
suite repeats (else the case's own default), with ``--set`` overriding the case's parameters
(``--set factory=gpu --set launch=torchrun``; values are read as JSON where they parse, else as
strings), and writes each case's rows in one envelope to ``--out`` (a file for one case, a folder
for several; default ``$OUT`` or ``benchmarks/results/``). ``--list`` prints every suite and its cases.

Example:
    >>> "check-cost" in suites() and "1b-full-bf16" in load("check-cost").CASES
    True
    >>> parse_sets(["factory=gpu", "world_size=2", "tiny=true"])
    {'factory': 'gpu', 'world_size': 2, 'tiny': True}
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks.envelope import default_path, write_envelope
from benchmarks.suites import SUITES


def suites() -> list[str]:
    return sorted(SUITES)


def load(suite: str) -> ModuleType:
    if suite not in SUITES:
        raise SystemExit(f"no suite {suite!r}: choose one of {', '.join(suites())} (python -m benchmarks --list)")
    return importlib.import_module(SUITES[suite])


def parse_sets(items: list[str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for item in items:
        key, equals, text = item.partition("=")
        if not equals or not key:
            raise SystemExit(f"--set {item!r}: write KEY=VALUE, e.g. --set factory=gpu")
        try:
            found[key] = json.loads(text)
        except json.JSONDecodeError:
            found[key] = text
    return found


def select(names: list[str], patterns: list[str]) -> list[str]:
    """The cases named, in the suite's order; a name may be a glob (``--case 'cpu-*'``); none named: all.

    Example:
        >>> select(["1b-full-bf16", "cpu-2M", "cpu-12M"], ["cpu-*"])
        ['cpu-2M', 'cpu-12M']
    """
    chosen = [n for n in names if not patterns or any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    missing = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if missing:
        raise SystemExit(f"no case matches {', '.join(missing)}: choose among {', '.join(names)}")
    return chosen


def listing() -> str:
    lines = []
    for name in suites():
        module = load(name)
        lines.append(f"{name}: {module.ABOUT}")
        for case, spec in module.CASES.items():
            lines.append(f"  {case:<24} [{spec.needs}, {spec.repeats} repeat{'s' * (spec.repeats != 1)}] {spec.about}")
    return "\n".join(lines)


def run_case(suite: str, case: str, repeats: int | None, sets: dict[str, Any], out: Path | None) -> Path:
    """Run one case and write its envelope; returns the file's path."""
    module = load(suite)
    if case not in module.CASES:
        raise SystemExit(f"{suite} has no case {case!r}: choose one of {', '.join(module.CASES)}")
    spec = module.CASES[case]
    unknown = sorted(set(sets) - set(spec.params))
    if unknown:
        raise SystemExit(f"--set {', '.join(unknown)}: {suite}/{case} has no such parameter; it has "
                         f"{', '.join(sorted(spec.params)) or 'none'}")
    params = {**spec.params, **sets}
    repeats = spec.repeats if repeats is None else repeats
    path = out if out is not None and out.suffix == ".json" else default_path(suite, case, out)
    rows: list[dict[str, Any]] = []
    recorded = {**params, "repeats": repeats}

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        write_envelope(path, suite, case, recorded, rows)  # after every row: a run cut short keeps what it measured

    print(f"{suite}/{case}: {spec.about} ({recorded})", flush=True)
    module.run(params, repeats, emit)
    if not rows:
        write_envelope(path, suite, case, recorded, rows)
    if os.environ.get("RANK", "0") == "0":
        print(f"wrote {path}", flush=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", nargs="?", help="one of the suites --list shows")
    parser.add_argument("--list", action="store_true", help="list every suite and its cases")
    parser.add_argument("--case", action="append", default=[], help="a case of the suite or a glob (repeatable; default all)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per case (default: the case's own)")
    parser.add_argument("--out", type=Path, default=None, help="the result file (one case) or folder")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a case parameter")
    args = parser.parse_args(argv)
    if args.list:
        print(listing())
        return 0
    if not args.suite:
        parser.error("name a suite (python -m benchmarks --list shows them)")
    cases = select(list(load(args.suite).CASES), args.case)
    if args.out is not None and args.out.suffix == ".json" and len(cases) > 1:
        parser.error(f"--out {args.out} is one file; {len(cases)} cases write one file each: give a folder")
    sets = parse_sets(args.set)
    for case in cases:
        run_case(args.suite, case, args.repeats, sets, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
