"""What running every step in a forked child (``isolate="auto"``, the plugin's default on CPU)
costs next to running it in this process (``isolate=False``).

Cases ``tanh_net`` (a tiny tanh stack), ``llama`` (a tiny Llama), ``bert`` (the 2-layer BERT of the zoo):
one check, every built-in strategy, scenario ``train``, ``repeats`` times each way, alternating, after
one warm-up each. Reports the median wall time, and the CPU time of this process plus its children
(``resource.getrusage``), per check and per step. Verdicts must be equal both ways.

    python -m benchmarks isolation-cost --repeats 3      # any machine; CPU
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import pytest_gradckpt as gc
from benchmarks import common
from benchmarks.case import Case, Emit

ABOUT = "a check with every step forked into a child against the same check in this process (CPU)"
CASES = {"tanh_net": Case("a tiny tanh stack (the plain zoo)", {"model": "tanh_net"}, repeats=5),
         "llama": Case("the zoo's tiny Llama", {"model": "llama"}, repeats=5),
         "bert": Case("the zoo's 2-layer BERT", {"model": "bert"}, repeats=5)}


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


def run(params: dict[str, Any], repeats: int, emit: Emit) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    name = params["model"]
    row = measure(name, lambda: common.zoo_model(name), repeats)
    row["threads"] = os.environ.get("OMP_NUM_THREADS")
    print(f"{row['model']}: {row['steps_per_check']} steps; in process {row['in_process']}; isolated "
          f"{row['isolated']}; +{row['extra_wall_per_step_s'] * 1000:.0f} ms wall, "
          f"+{row['extra_cpu_per_step_s'] * 1000:.0f} ms CPU per step", flush=True)
    emit(row)
