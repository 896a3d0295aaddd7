"""Wall time of the packaged suite's full sweep, and its ratio to the raw compute it needs.

Runs ``pytest --gradckpt --pyargs pytest_gradckpt.suite --gradckpt-models=all`` serially in
a subprocess (the way a user runs it), then reads the JSON report: every run's
forward+backward time is recorded there (strategies in ``metrics.seconds``, baselines in
the report's baseline section, twice per scenario), so the ratio says how much the
harness (building models, copies, probes, comparisons, pytest) costs on top.

    python -m benchmarks zoo-sweep            # prints a summary; one row
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.case import Case, Emit

ABOUT = "the packaged suite's full sweep: wall time against the raw compute it needs"
CASES = {"all": Case("pytest --gradckpt --pyargs pytest_gradckpt.suite --gradckpt-models=all, serially",
                     {"models": "all"})}


def run(params: dict[str, Any], repeats: int, emit: Emit) -> None:
    with tempfile.TemporaryDirectory() as folder:
        report_path = Path(folder) / "report.json"
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-q", "--gradckpt",
                   "--pyargs", "pytest_gradckpt.suite", f"--gradckpt-models={params['models']}", f"--gradckpt-report={report_path}",
                   "-p", "no:xdist"]
        started = time.perf_counter()
        finished = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if finished.returncode != 0:
            print(finished.stdout[-3000:], finished.stderr[-3000:])
            raise SystemExit(f"the sweep failed (exit {finished.returncode}); its output is above")
        report = json.loads(report_path.read_text())
    results = report["results"]
    strategy_seconds = sum(r["metrics"].get("seconds", 0.0) for r in results if r["strategy"] != "all")
    baseline_steps = {(r["model"], r["scenario"]): r["metrics"].get("baseline_seconds", 0.0) for r in results
                      if r["strategy"] != "all"}
    baseline_seconds = 2 * sum(baseline_steps.values())  # the baseline runs twice per scenario
    compute = strategy_seconds + baseline_seconds
    models = {r["model"] for r in results}
    ran = {r["model"] for r in results if r["strategy"] != "all"}
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "versions": report["versions"], "models": len(models), "models_ran": len(ran),
        "results": len(results), "wall_seconds": round(wall, 1), "compute_seconds": round(compute, 1),
        "ratio_wall_to_compute": round(wall / compute, 2) if compute else None,
    }
    print(json.dumps(summary, indent=1))
    emit(summary)
