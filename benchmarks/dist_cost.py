"""What a distributed check costs next to the steps it runs, part by part (issue 30).

Self-started (the check starts its own ranks)::

    python benchmarks/dist_cost.py --launch self --plan 1b-full-fsdp2:gpu:3,1b-lora-ddp:cpu:3 [--world-size 1]

Under torchrun (the check runs in torchrun's world, whatever its size)::

    torchrun --nproc-per-node 1 benchmarks/dist_cost.py --launch torchrun --plan 1b-full-fsdp2:gpu:3

``--plan`` is ``case:factory:repeats`` items, run in order (cases of ``benchmarks/dist_gpu.py``;
factory ``cpu``, ``gpu`` or ``meta``); no check starts after ``--budget`` seconds. The six
per-layer strategies. Appends one row per item to ``dist-cost-<device>-<date>.json`` in ``$OUT``
or ``benchmarks/results/``: ``case``, ``launch``, ``world``, ``factory``, ``seconds`` (each
check, wall), ``step_seconds_sum`` (each check: the baseline's two steps and every strategy's
step, as the probes timed them on the ranks), ``build_seconds`` (the factory, where the check
built it), ``beyond_build_over_steps`` (``(seconds - build) / step_seconds_sum``), ``breakdown``
(the first check's parts, by process, from ``benchmarks/dist_profile.py``), ``outcomes``,
``repeats``, ``identical_outcomes``. ``--tiny --device cpu`` tries it on a two-layer Llama (gloo).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_profile  # noqa: E402 - spawned ranks import this module again: their timers go on here
import torch  # noqa: E402
from check_cost import PER_LAYER, tokens  # noqa: E402
from dist_gpu import CASES, build  # noqa: E402

import pytest_gradckpt as gc  # noqa: E402
from pytest_gradckpt.distributed import join_launch, leave_launch  # noqa: E402


def one_check(case: str, factory: str, args: Any) -> tuple[float, Any, dict[str, Any]]:
    shape, adapters, scenario, _ = CASES[case]
    dist_profile.SPENT.clear()
    started = time.perf_counter()
    report = gc.check(functools.partial(build, "tiny" if args.tiny else shape, adapters, factory),
                      tokens(args.world_size, 64 if args.tiny else 2048, 32000, "cpu"), device=args.device,
                      scenarios=[scenario], strategies=PER_LAYER, timeout=None,
                      distributed={"world_size": args.world_size})
    seconds = time.perf_counter() - started
    parts = dist_profile.collect(os.environ["GRADCKPT_PROFILE_DIR"])
    print(f"{case} ({factory}): {seconds:.1f} s, {[(r.strategy, r.outcome) for r in report.results]}", flush=True)
    return seconds, report, parts


def step_sum(report: Any, scenario: str) -> float:
    """The steps the check ran: two without checkpointing (the baseline keeps the faster) and each strategy's."""
    base = report.baseline[scenario].get("seconds") or 0.0
    return 2 * base + sum(r.metrics.get("seconds") or 0.0 for r in report.results)


def _builds(parts: dict[str, dict[str, float]], forked: bool) -> float:
    """The factory's time: where the check built it, plus the slowest rank that built its own (a
    forked rank's timers start from the parent's, so only what it added is its own)."""
    here = parts["parent"].get("model build (factory)", 0.0)
    ranks = [p.get("model build (factory)", 0.0) - (here if forked else 0.0)
             for name, p in parts.items() if name != "parent"]
    return here + max(ranks, default=0.0)


def row(case: str, factory: str, args: Any, checks: list[tuple[float, Any, dict[str, Any]]]) -> dict[str, Any]:
    scenario = CASES[case][2]
    outcomes = [{r.strategy: r.outcome for r in report.results} for _, report, _ in checks]
    builds = [_builds(parts, forked=args.device == "cpu") for _, _, parts in checks]
    steps = [step_sum(report, scenario) for _, report, _ in checks]
    first = checks[0][1]
    return {"case": case, "launch": args.launch, "world": args.world_size, "factory": factory,
            "seconds": [round(s, 2) for s, _, _ in checks], "step_seconds_sum": [round(s, 3) for s in steps],
            "build_seconds": [round(b, 2) for b in builds],
            "beyond_build_over_steps": [round((s - b) / t, 2) if t else None
                                        for (s, _, _), b, t in zip(checks, builds, steps, strict=True)],
            "breakdown": checks[0][2], "outcomes": outcomes[0],
            "messages": {r.strategy: r.message[:200] for r in first.results if r.outcome != "pass"},
            "ranks": first.baseline[scenario].get("ranks"),
            "repeats": len(checks), "identical_outcomes": all(o == outcomes[0] for o in outcomes)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launch", choices=["self", "torchrun"], required=True)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--budget", type=float, default=1e9)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    began = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["GRADCKPT_PROFILE_DIR"] = tempfile.mkdtemp(prefix="gradckpt-profile-")
    os.environ["GRADCKPT_PROFILE_PARENT"] = str(os.getpid())
    dist_profile.install()
    rank = join_launch(args.device) if args.launch == "torchrun" else None
    if args.launch == "torchrun":
        if rank is None:
            parser.error("--launch torchrun: start this script with torchrun --nproc-per-node N")
        args.world_size = torch.distributed.get_world_size()
    device = torch.cuda.get_device_name().replace(" ", "-") if args.device == "cuda" else "cpu"
    device += "-tiny" if args.tiny else ""
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    path = out / f"dist-cost-{device}-{datetime.date.today().isoformat()}.json"
    for item in args.plan.split(","):
        case, factory, repeats = item.split(":")
        checks = []
        for _ in range(int(repeats)):
            if time.perf_counter() - began > args.budget:
                break
            checks.append(one_check(case, factory, args))
        if not checks:
            break
        if rank in (None, 0):
            import transformers

            found = json.loads(path.read_text()) if path.exists() else {
                "device": device, "torch": torch.__version__, "transformers": transformers.__version__, "rows": []}
            found["rows"].append(row(case, factory, args, checks))
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(found, indent=1) + "\n")  # after each item: a cut-off run keeps them
            print(json.dumps({k: v for k, v in found["rows"][-1].items() if k != "breakdown"}), flush=True)
    if args.launch == "torchrun":
        leave_launch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
