"""What running every step in a forked child (``isolate="auto"``, the plugin's default on CPU)
costs next to running it in this process (``isolate=False``).

``python benchmarks/isolation_cost.py [--repeats 5]``  (any machine; CPU)
    One check of three models (a tiny tanh stack, a tiny Llama, the 2-layer BERT of the zoo),
    every built-in strategy, scenario ``train``, ``--repeats`` times each way, alternating, after
    one warm-up each. Reports the median wall time, and the CPU time of this process plus its
    children (``resource.getrusage``), per check and per step. Verdicts must be equal both ways.
    Writes ``isolation-cost-cpu-<date>.json`` to ``$OUT`` or ``results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest_gradckpt as gc  # noqa: E402
from pytest_gradckpt.environment import versions  # noqa: E402
from pytest_gradckpt.zoo import entry, plain  # noqa: E402


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _one(build: Callable[[], tuple[Any, Any]], isolate: bool | str) -> tuple[float, float, list[str], int]:
    model, inputs = build()
    wall, cpu = time.perf_counter(), _cpu_seconds()
    report = gc.check(model, inputs, isolate=isolate)
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    steps = 2 + sum(r.outcome != "skipped" for r in report.results)  # two baseline runs + the strategies
    return wall, cpu, [f"{r.strategy}:{r.outcome}" for r in report.results], steps


def measure(name: str, build: Callable[[], tuple[Any, Any]], repeats: int) -> dict[str, Any]:
    figures: dict[str, dict[str, list[float]]] = {"in_process": {"wall": [], "cpu": []},
                                                  "isolated": {"wall": [], "cpu": []}}
    verdicts: dict[str, list[str]] = {}
    steps = 0
    for isolate in (False, "auto"):  # warm-up: lazy imports, first checkpoint call
        _one(build, isolate)
    for _ in range(repeats):
        for key, isolate in (("in_process", False), ("isolated", "auto")):
            wall, cpu, verdicts[key], steps = _one(build, isolate)
            figures[key]["wall"].append(wall)
            figures[key]["cpu"].append(cpu)
    assert verdicts["in_process"] == verdicts["isolated"], verdicts
    row: dict[str, Any] = {"model": name, "steps_per_check": steps, "verdicts": verdicts["isolated"]}
    for key, values in figures.items():
        row[key] = {f"median_{k}_s": statistics.median(v) for k, v in values.items()}
    extra_wall = row["isolated"]["median_wall_s"] - row["in_process"]["median_wall_s"]
    extra_cpu = row["isolated"]["median_cpu_s"] - row["in_process"]["median_cpu_s"]
    row.update(extra_wall_per_step_s=extra_wall / steps, extra_cpu_per_step_s=extra_cpu / steps,
               wall_ratio=row["isolated"]["median_wall_s"] / row["in_process"]["median_wall_s"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    llama, bert = entry("llama"), entry("bert")
    rows = [measure("tanh_net", plain.tanh_net, args.repeats), measure("llama", llama.build, args.repeats),
            measure("bert", bert.build, args.repeats)]
    document = {"date": datetime.date.today().isoformat(), "repeats": args.repeats,
                "threads": os.environ["OMP_NUM_THREADS"], "versions": versions(),
                "rows": rows}
    target = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    target.mkdir(parents=True, exist_ok=True)
    path = target / f"isolation-cost-cpu-{document['date']}.json"
    path.write_text(json.dumps(document, indent=2) + "\n")
    for row in rows:
        print(f"{row['model']}: {row['steps_per_check']} steps; in process {row['in_process']}; isolated "
              f"{row['isolated']}; +{row['extra_wall_per_step_s'] * 1000:.0f} ms wall, "
              f"+{row['extra_cpu_per_step_s'] * 1000:.0f} ms CPU per step")
    print(path)


if __name__ == "__main__":
    main()
