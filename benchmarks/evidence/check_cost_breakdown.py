"""Where a single-process check's time goes, beside the bare steps it runs (issue 30, item 3).

``python benchmarks/evidence/check_cost_breakdown.py [--cases 1b-full-bf16,1b-lora-bf16] [--repeats 2]
[--variants 'default|deepcopy per run']``  (a CUDA GPU)

For each case (the shapes of ``check_cost.py``) and each variant of the check:

- ``per-op probes``: the op counter and the host-copies mode in every step (the check before they
  were gated on the judged promises);
- ``default``: the check as it runs now (one working copy of the model, restored between runs:
  ``pytest_gradckpt/pipeline/reused_copy.py``);
- ``deepcopy per run``: the same with a new deep copy of the model for every run (the check before
  the working copy was reused);
- ``default, no deterministic kernels``: the same with the check's deterministic-kernel setting
  left out (a cost figure only: the verdicts rely on it).

the check's wall time (median) and its parts: the steps (copy, strategy, micro-batches under the
probes, what they kept), the comparisons and verdicts, the baseline's own noise comparison,
``gc.collect`` calls, and the rest. Then the bare steps (``check_cost.raw_step_seconds``), with and
without deterministic kernels, and a cProfile of one default check. Writes
``check-cost-breakdown-<device>-<date>.json`` to ``$OUT`` or ``results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime
import gc as garbage
import io
import json
import os
import pstats
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks import common as check_cost  # noqa: E402 - check_cost.py's helpers as they were, now shared

check_cost.SHAPES["tiny"] = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=1000)
import pytest_gradckpt as gc  # noqa: E402
from pytest_gradckpt.pipeline import baselines, engine, verdicts  # noqa: E402
from pytest_gradckpt.probes import registry  # noqa: E402
from pytest_gradckpt.pipeline.process_state import Determinism, deterministic_kernels  # noqa: E402
from pytest_gradckpt.pipeline.runs import Stepper  # noqa: E402
from pytest_gradckpt.pipeline.reused_copy import Reuse  # noqa: E402


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run of this script only


def sync() -> None:
    check_cost.sync(DEVICE)


class Parts:
    """Seconds spent in named functions during one check (CUDA synchronised at each end)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.depth = 0

    def timed(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sync()
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                sync()
                self.seconds[name] += time.perf_counter() - started
                self.calls[name] += 1
        return wrapper

    def on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.seconds["gc.collect (cyclic collector, all generations)"] += time.perf_counter() - self._gc_started
            self.calls["gc.collect (cyclic collector, all generations)"] += 1


@contextlib.contextmanager
def measured_parts() -> Iterator[Parts]:
    parts = Parts()
    saved: dict[tuple[Any, str], Callable[..., Any]] = {(Stepper, "_prepare"): Stepper._prepare, (Stepper, "_switch_on"): Stepper._switch_on,
             (Stepper, "_train"): Stepper._train, (Stepper, "_collect"): Stepper._collect,
             (verdicts, "gather"): verdicts.gather, (verdicts, "judge"): verdicts.judge,
             (baselines, "measure_noise"): baselines.measure_noise, (Reuse, "take"): Reuse.take}
    names = {(Stepper, "_prepare"): "step: fresh copy + probes attached", (Stepper, "_switch_on"): "step: strategy applied",
             (Stepper, "_train"): "step: micro-batches under the probes", (Stepper, "_collect"): "step: outputs/grads kept",
             (verdicts, "gather"): "evidence (comparisons)", (verdicts, "judge"): "verdict rules",
             (baselines, "measure_noise"): "baseline noise comparison",
             (Reuse, "take"): "step: the model copy (working copy restored, or a new copy)"}
    backward = Stepper.__dict__["_backward"]  # a staticmethod: put back as one
    setattr(Stepper, "_backward", staticmethod(parts.timed("step: backward (inside the micro-batches)", backward.__func__)))
    for (owner, attribute), function in saved.items():
        setattr(owner, attribute, parts.timed(names[(owner, attribute)], function))
    garbage.callbacks.append(parts.on_gc)
    try:
        yield parts
    finally:
        garbage.callbacks.remove(parts.on_gc)
        for (owner, attribute), function in saved.items():
            setattr(owner, attribute, function)
        setattr(Stepper, "_backward", backward)


@contextlib.contextmanager
def without_determinism(device: Any) -> Iterator[Determinism]:
    yield Determinism(torch.device("cpu"))


def one_check(model: Any, inputs: Any, variant: str) -> tuple[float, dict[str, Any], dict[str, str]]:
    asked = registry.asking(*registry.PER_OP) if variant == "per-op probes" else contextlib.nullcontext()
    original, copies = engine.deterministic_kernels, Stepper._copies
    if variant == "default, no deterministic kernels":
        engine.deterministic_kernels = without_determinism
    if variant == "deepcopy per run":
        setattr(Stepper, "_copies", lambda self: Reuse(None, self.subject.fresh_model, eligible=False))
    try:
        with asked, measured_parts() as parts:
            sync()
            started = time.perf_counter()
            report = gc.check(model, inputs, strategies=check_cost.PER_LAYER, device=DEVICE, timeout=None)
            sync()
            total = time.perf_counter() - started
    finally:
        engine.deterministic_kernels = original
        setattr(Stepper, "_copies", copies)
    breakdown = {name: {"seconds": round(s, 3), "calls": parts.calls[name]} for name, s in parts.seconds.items()}
    return total, breakdown, {r.strategy: r.outcome for r in report.results}


def raw_steps(model: Any, inputs: Any, deterministic: bool) -> dict[str, float]:
    context = deterministic_kernels(torch.device(DEVICE)) if deterministic else contextlib.nullcontext()
    with context:
        base = check_cost.raw_step_seconds(model, inputs, None, DEVICE)[0]
        found = {"none": round(base, 4)}
        for strategy in check_cost.PER_LAYER:
            found[strategy] = round(check_cost.raw_step_seconds(model, inputs, strategy, DEVICE)[0], 4)
    found["sum_2_baseline_6_strategies"] = round(2 * base + sum(found[s] for s in check_cost.PER_LAYER), 3)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="1b-full-bf16,1b-lora-bf16")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default="default|deepcopy per run|default, no deterministic kernels",
                        help="'|'-separated")
    args = parser.parse_args()
    document: dict[str, Any] = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__,
                                "commit": os.environ.get("GRADCKPT_COMMIT", "unknown"), "rows": []}
    known = ["per-op probes", "default", "deepcopy per run", "default, no deterministic kernels"]
    variants = [v for v in args.variants.split("|") if v in known]
    for case in args.cases.split(","):
        size, kind, _ = case.split("-")
        shape = check_cost.SHAPES[size] if DEVICE == "cuda" else check_cost.SHAPES["tiny"]
        model = check_cost.llama(shape, DEVICE, torch.bfloat16 if DEVICE == "cuda" else torch.float32)
        model = check_cost.lora(model) if kind == "lora" else model
        tokens = 2048 if DEVICE == "cuda" else 64
        inputs = check_cost.tokens(2 if size == "1b" else 1, tokens, shape["vocab_size"], DEVICE)
        gc.check(model, inputs, strategies=check_cost.PER_LAYER, device=DEVICE, timeout=None)  # warm
        row: dict[str, Any] = {"case": case, "variants": {}}
        for variant in variants:
            runs = [one_check(model, inputs, variant) for _ in range(args.repeats)]
            middle = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
            row["variants"][variant] = {"seconds_all": [round(r[0], 3) for r in runs],
                                        "seconds": round(statistics.median(r[0] for r in runs), 3),
                                        "breakdown_of_median_run": middle[1], "outcomes": middle[2],
                                        "identical_outcomes": all(r[2] == runs[0][2] for r in runs)}
            print(case, variant, row["variants"][variant]["seconds_all"], middle[2], flush=True)
            print("   ", json.dumps(middle[1]), flush=True)
        row["raw_steps"] = raw_steps(model, inputs, deterministic=False)
        row["raw_steps_deterministic"] = raw_steps(model, inputs, deterministic=True)
        print(case, "raw", row["raw_steps"], "\n   deterministic", row["raw_steps_deterministic"], flush=True)
        with cProfile.Profile() as profile:
            gc.check(model, inputs, strategies=check_cost.PER_LAYER, device=DEVICE, timeout=None)
        for order in ("tottime", "cumulative"):
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats(order).print_stats(30)
            row[f"cprofile_{order}"] = text.getvalue()
            print(text.getvalue(), flush=True)
        document["rows"].append(row)
        del model, inputs
        torch.cuda.empty_cache() if DEVICE == "cuda" else None
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    path = out / f"check-cost-breakdown-{document['device'].replace(' ', '-')}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
