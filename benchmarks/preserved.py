"""Behaviour preserved between two revisions: the packaged suite's verdicts and golden records, side by side.

For each revision, the package as committed there (``git archive``, nothing else of the tree) is
put first on ``PYTHONPATH`` and the packaged suite runs in a subprocess with this checkout's
``.venv`` python, the way a user runs it (``pytest --gradckpt --pyargs pytest_gradckpt.suite``),
writing a golden record (outcome + loss, gradient norms, activation peak per
``test [strategy/scenario] model``) and the JSON report (for the messages). The two records are
then compared entry by entry with the golden comparison itself (:func:`pytest_gradckpt.release.golden.differences`,
the one ``--gradckpt-compare`` applies), and each revision's record is also compared with the
committed plain-zoo fixture (``fixtures/golden/plain-zoo.json``).

Every difference is listed; those that a later commit made on purpose are matched to the
commit and the reason in ``INTENDED`` below, and anything else is printed as UNEXPLAINED (exit 1).

    python -m benchmarks.preserved 5f25bd2 HEAD                # the representative subset (`make check`)
    python -m benchmarks.preserved 5f25bd2 main --models=all   # the full zoo sweep (`make check-full`)

A revision's sweep is cached by commit in ``~/.cache/pytest-gradckpt/preserved`` (a committed
tree gives the same verdicts on the same pinned environment), so comparing a new revision with
an old one runs only the new one. The result is written to
``benchmarks/results/preserved-<before>-<after>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common

ROOT = Path(__file__).resolve().parents[1]
golden = common.golden()  # the comparison --gradckpt-compare makes

CACHE = Path.home() / ".cache" / "pytest-gradckpt" / "preserved"
PLAIN_ZOO_FIXTURE = ROOT / "fixtures" / "golden" / "plain-zoo.json"


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout.strip()


def snapshot(sha: str, folder: Path) -> None:
    """The package exactly as committed at ``sha``: no working-tree file can leak in."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", sha, "pytest_gradckpt"],
                             check=True, capture_output=True).stdout
    with tempfile.TemporaryFile() as buffer:
        buffer.write(archive)
        buffer.seek(0)
        with tarfile.open(fileobj=buffer) as tar:
            tar.extractall(folder, filter="data")


def sweep(sha: str, models: str, workers: int) -> dict[str, Any]:
    """Run the packaged suite of ``sha`` and return its record, messages and pytest's summary."""
    with tempfile.TemporaryDirectory(prefix=f"preserved-{sha[:8]}-") as folder:
        source, run_in = Path(folder) / "src", Path(folder) / "run"
        source.mkdir()
        run_in.mkdir()
        snapshot(sha, source)
        env = {**os.environ, "PYTHONPATH": str(source), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_VERBOSITY": "error", "PYTHONDONTWRITEBYTECODE": "1",
               "COLUMNS": "2000"}  # pytest cuts its short summary ("FAILED id - reason") to the terminal width
        # Which package the subprocess imports: PYTHONPATH must win over this checkout's editable install.
        imported = subprocess.run([sys.executable, "-c", "import pytest_gradckpt; print(pytest_gradckpt.__file__)"],
                                  cwd=run_in, env=env, check=True, capture_output=True, text=True).stdout.strip()
        if not imported.startswith(str(source)):
            raise SystemExit(f"{sha[:8]}: the subprocess imported {imported}, not the snapshot in {source}")
        command = [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-q", "-rfE", "--gradckpt",
                   "--pyargs", "pytest_gradckpt.suite", f"--gradckpt-models={models}",
                   "--gradckpt-report=report.json", "--gradckpt-record=record.json"]
        command += ["-n", str(workers)] if workers > 1 else ["-p", "no:xdist"]
        started = time.perf_counter()
        finished = subprocess.run(command, cwd=run_in, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        lines = finished.stdout.strip().splitlines()
        if not (run_in / "record.json").exists():
            raise SystemExit(f"{sha[:8]}: no record written (exit {finished.returncode}):\n"
                             + finished.stdout[-3000:] + finished.stderr[-3000:])
        record = json.loads((run_in / "record.json").read_text())
        report = json.loads((run_in / "report.json").read_text())
    return {"sha": sha, "subject": git("log", "-1", "--format=%cI %s", sha)[:160], "models": models,
            "pytest_exit": finished.returncode, "pytest_summary": lines[-1] if lines else "",
            "failed_items": [line for line in lines if line.startswith(("FAILED", "ERROR"))],
            "wall_seconds": round(wall, 1), "versions": record["versions"], "record": record["results"],
            "messages": {golden.key(r): r.get("message", "") for r in report["results"]}}


def cached_sweep(revision: str, models: str, workers: int, refresh: bool) -> dict[str, Any]:
    sha = git("rev-parse", "--verify", f"{revision}^{{commit}}")
    path = CACHE / f"{sha}-{models.replace(',', '+')}.json"
    if path.exists() and not refresh:
        print(f"{revision} ({sha[:8]}): cached sweep {path}", file=sys.stderr)
        return dict(json.loads(path.read_text()))
    print(f"{revision} ({sha[:8]}): running the packaged suite (--gradckpt-models={models})", file=sys.stderr)
    found = sweep(sha, models, workers)
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(found, indent=1, sort_keys=True) + "\n")
    return found


def as_result(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A record entry back in the report's form, for :func:`golden.differences`."""
    test, _, rest = name.partition(" [")
    strategy_scenario, _, model = rest.partition("] ")
    strategy, _, scenario = strategy_scenario.partition("/")
    return {"test": test, "strategy": strategy, "scenario": scenario, "model": model,
            "outcome": entry["outcome"], "metrics": {"fingerprint": entry.get("fingerprint")}}


# --------------------------------------------------------------------------- what changed on purpose

#: Why a difference is expected: reason id -> the commit that made it and what it changed.
REASONS = {
    "step-time-limit": "6f9c5bb: the zoo's step-time limit (zoo/transformers_models.MAX_STEP_SECONDS) went from 1.0 s "
    "to 3.0 s: a model whose tiny training step takes 1-3 s was skipped ('one tiny training step takes ...') and is "
    "checked now. The limit is wall time, so on a loaded machine a model near 3 s can also flip between skipped and "
    "checked",
    "big-bird-fresh-build": "6f9c5bb: the checked model is a fresh build, not the one the zoo's proving step trained. "
    "BigBird switches its attention from block_sparse to original_full on its first short-sequence forward, building "
    "new attention modules (random draws): before, that happened in the proving step; now inside each run, so the "
    "dropout draws that follow differ (the same in the baseline and every strategy: outcomes unchanged). big_bird "
    "alone: 5f25bd2 -> 6f9c5bb differs exactly so, 6f9c5bb -> after is bitwise identical",
    "offload-peak": "24b26ab: memory probe: an exclusion (an offloaded host copy) ends with its storage, so an "
    "activation that reuses a freed copy's address is counted; offload's saved-activation peak moves by a few KiB",
}

#: One entry that differs: outcome side {"key", "model", "strategy", "before", "after", messages} or fingerprint
#: side {"key", "model", "strategy", "lines" (beyond the golden tolerance) or "fields" (within it)}.
Difference = dict[str, Any]


def _why(difference: Difference, step_limited: set[str]) -> str | None:
    """The reason id of one difference, or None: unexplained, a finding."""
    if "before" in difference:
        return "step-time-limit" if difference["model"] in step_limited else None
    if difference["model"] == "big_bird" and all(" grad norm of " in line for line in difference.get("lines", [])):
        return "big-bird-fresh-build" if difference.get("lines") else None
    if difference["strategy"] == "offload" and set(difference.get("fields", {})) == {"activation_bytes"}:
        return "offload-peak"
    return None


def step_limit_skips(found: dict[str, Any]) -> set[str]:
    """The models this sweep did not build because their tiny training step was over the time limit."""
    return {name.rpartition("] ")[2] for name, message in found["messages"].items()
            if " [all/" in name and (message or "").startswith("one tiny training step takes")}


def _parts(name: str) -> dict[str, str]:
    return {"key": name, "model": name.rpartition("] ")[2], "strategy": name.partition(" [")[2].partition("/")[0]}


def outcome_differences(before: dict[str, Any], after: dict[str, Any]) -> list[Difference]:
    found = []
    for name in sorted(set(before["record"]) | set(after["record"])):
        old, new = before["record"].get(name), after["record"].get(name)
        if old is None or new is None or old["outcome"] != new["outcome"]:
            found.append(_parts(name) | {"before": old and old["outcome"], "after": new and new["outcome"],
                                         "before_message": before["messages"].get(name),
                                         "after_message": after["messages"].get(name)})
    return found


def fingerprint_differences(before: dict[str, Any], after: dict[str, Any]) -> tuple[int, int, list[Difference]]:
    """The entries whose outcome is unchanged: how many, how many bitwise equal, and per other entry
    the golden comparison's lines (beyond its tolerance) or else the fields that differ within it."""
    shared = [n for n in sorted(set(before["record"]) & set(after["record"]))
              if before["record"][n]["outcome"] == after["record"][n]["outcome"]]
    changed = [n for n in shared if before["record"][n] != after["record"][n]]
    found = []
    for name in changed:
        lines = golden.differences({"results": before["record"]}, as_result(name, after["record"][name]))
        old, new = before["record"][name]["fingerprint"] or {}, after["record"][name]["fingerprint"] or {}
        fields = {f: [old.get(f), new.get(f)] for f in sorted(set(old) | set(new)) if old.get(f) != new.get(f)}
        found.append(_parts(name) | ({"lines": lines} if lines else {"fields": fields}))
    return len(shared), len(shared) - len(changed), found


def fixture_check(found: dict[str, Any]) -> list[str]:
    """The committed plain-zoo fixture against this revision's record (what tests/test_golden.py checks)."""
    fixture = json.loads(PLAIN_ZOO_FIXTURE.read_text())
    missing = [f"{n}: in the fixture, not in this run" for n in fixture["results"] if n not in found["record"]]
    return missing + [line for n in sorted(fixture["results"]) if n in found["record"]
                      for line in golden.differences(fixture, as_result(n, found["record"][n]))]


def table(outcomes: list[Difference], fingerprints: list[Difference]) -> list[str]:
    """One line per kind of difference: how many entries, of which models, and why."""
    groups: dict[tuple[str, str], set[str]] = {}
    counts: dict[tuple[str, str], int] = {}
    for kind, differences in (("outcome", outcomes), ("fingerprint", fingerprints)):
        for difference in differences:
            if kind == "outcome":
                label = f"outcome {difference['before']} -> {difference['after']}"
            else:
                label = "fingerprint beyond golden tolerance" if "lines" in difference else \
                    f"fingerprint within tolerance ({', '.join(difference['fields'])})"
            group = (label, difference["explained_by"] or "UNEXPLAINED")
            groups.setdefault(group, set()).add(difference["model"])
            counts[group] = counts.get(group, 0) + 1
    return [f"{counts[g]:5d}  {g[0]:<55} {g[1]:<22} {', '.join(sorted(models))}" for g, models in sorted(groups.items())]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--models", default="default", help="--gradckpt-models for both sweeps (default, all, names)")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist workers (1: serial)")
    parser.add_argument("--refresh", action="store_true", help="run both sweeps again, ignoring the cache")
    parser.add_argument("--out", type=Path, help="result file (default benchmarks/results/preserved-...json)")
    args = parser.parse_args()
    before = cached_sweep(args.before, args.models, args.workers, args.refresh)
    after = cached_sweep(args.after, args.models, args.workers, args.refresh)
    step_limited = step_limit_skips(before) | step_limit_skips(after)
    outcomes = outcome_differences(before, after)
    compared, identical, fingerprints = fingerprint_differences(before, after)
    for difference in outcomes + fingerprints:
        difference["explained_by"] = _why(difference, step_limited)
    unexplained = [d for d in outcomes + fingerprints if d["explained_by"] is None]
    summary = {
        "date": datetime.date.today().isoformat(), "models": args.models, "python": sys.executable,
        "runs": {side: {k: v for k, v in found.items() if k not in ("record", "messages")}
                 | {"entries": len(found["record"])} for side, found in (("before", before), ("after", after))},
        "table": table(outcomes, fingerprints), "reasons": REASONS, "unexplained": len(unexplained),
        "outcome_differences": outcomes,
        "fingerprints": {"compared": compared, "bitwise_identical": identical, "differences": fingerprints},
        "plain_zoo_fixture": {"before": fixture_check(before), "after": fixture_check(after)},
    }
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"preserved-{before['sha'][:7]}-{after['sha'][:7]}-{summary['date']}.json")
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{before['sha'][:7]} -> {after['sha'][:7]}: {len(before['record'])} -> {len(after['record'])} entries; "
          f"{len(outcomes)} outcome differences; of {compared} entries with the same outcome {identical} have bitwise "
          f"identical fingerprints; plain-zoo fixture: {len(summary['plain_zoo_fixture']['before'])} / "
          f"{len(summary['plain_zoo_fixture']['after'])} differences; {len(unexplained)} unexplained. Written to {out}")
    print("\n".join(summary["table"]))
    for difference in unexplained:
        print(f"UNEXPLAINED {json.dumps(difference)}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    raise SystemExit(main())
