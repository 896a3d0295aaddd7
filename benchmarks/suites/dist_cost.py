"""What a distributed check costs next to the steps it runs, part by part (issue 30).

Cases ``1b-full-fsdp2``, ``1b-lora-fsdp2``, ``1b-lora-ddp`` (those of the ``dist`` suite), the six
per-layer strategies. Parameters (``--set``): ``launch`` (``self``: the check starts its own ranks;
``torchrun``: the check runs in torchrun's world, whatever its size), ``world_size`` (self-started),
``factory`` (``cpu``, ``gpu`` or ``meta``), ``budget`` (no check starts after so many seconds of this
case), ``device``, ``tiny`` (``--set tiny=true --set device=cpu``: a two-layer Llama on gloo),
``parent_cuda`` (this process uses CUDA before the checks, as a test session that ran GPU tests
first: the check's ranks must then be spawned, not forked), ``mid`` (with ``device=cpu``: the 8-layer,
hidden-512 Llama, bf16, 64 tokens per rank, a LoRA model whose Python objects cost as the 1.1B's do),
``ranks_build`` (on the CPU too, the ranks build the model as GPU ranks do, instead of sharing this
process's build: the GPU design measured on gloo), ``model_imported`` (this process imports the model's
classes before the first check, as a test module that names them does; the factory imports them only
on the ranks, so otherwise the first check pays that import here, reading the ranks' skeleton).

    python -m benchmarks dist-cost --case 1b-lora-fsdp2 --case 1b-lora-ddp --set device=cpu --set mid=true \
        --set ranks_build=true --set factory=cpu --repeats 3

    python -m benchmarks dist-cost --case 1b-full-fsdp2 --set factory=gpu --repeats 3
    torchrun --nproc-per-node 1 -m benchmarks dist-cost --case 1b-full-fsdp2 --set launch=torchrun --repeats 3

One row per case: ``case``, ``launch``, ``world``, ``factory``, ``seconds`` (each check, wall),
``step_seconds_sum`` (each check: the baseline's two steps and every strategy's step, as the probes
timed them on the ranks), ``build_seconds`` (the factory, where the check built it),
``beyond_build_over_steps`` (``(seconds - build) / step_seconds_sum``), ``breakdown`` (the first check's
parts, by process, from :func:`benchmarks.common.install_timers`), ``outcomes``, ``repeats``,
``identical_outcomes``, ``parent_cuda`` and ``parent_cuda_after`` (whether this process had
initialised CUDA after each check: while it has not, the next check forks its ranks),
``ranks_built`` (each check: whether its ranks built the model, this process reading a skeleton) and
``fork_refused`` (whether a forked GPU rank could not use CUDA in this process, so ranks are spawned).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import time
from typing import Any

import pytest_gradckpt as gc
from benchmarks import common
from benchmarks.case import Case, Emit
from benchmarks.common import PER_LAYER, build, tokens
from benchmarks.suites import dist

ABOUT = "a distributed check's wall time next to the steps it runs, with a breakdown by part and process"
CASES = {name: Case(dist.CASES[name].about + ", cost by part",
                    {**{k: dist.CASES[name].params[k] for k in ("shape", "adapters", "scenario")},
                     "launch": "self", "world_size": 1, "factory": "cpu", "device": "cuda", "tiny": False,
                     "budget": 1e9, "parent_cuda": False, "mid": False, "ranks_build": False,
                     "model_imported": False},
                    needs="cuda", repeats=3)
         for name in ("1b-full-fsdp2", "1b-lora-fsdp2", "1b-lora-ddp")}


def one_check(case: str, params: dict[str, Any], world_size: int) -> tuple[float, Any, dict[str, Any], bool]:
    common.SPENT.clear()
    started = time.perf_counter()
    small = params["tiny"] or params["mid"]
    shape = "tiny" if params["tiny"] else "mid" if params["mid"] else params["shape"]
    report = gc.check(functools.partial(build, shape, params["adapters"], params["factory"]),
                      tokens(world_size, 64 if small else 2048, 32000, "cpu"), device=params["device"],
                      scenarios=[params["scenario"]], strategies=PER_LAYER, timeout=None,
                      distributed={"world_size": world_size})
    seconds = time.perf_counter() - started
    import torch

    cuda_after = torch.cuda.is_initialized()
    parts = common.collect_timers(os.environ["GRADCKPT_PROFILE_DIR"])
    print(f"{case} ({params['factory']}): {seconds:.1f} s, {[(r.strategy, r.outcome) for r in report.results]}",
          flush=True)
    return seconds, report, parts, cuda_after


def step_sum(report: Any, scenario: str) -> float:
    """The steps the check ran: two without checkpointing (the baseline keeps the faster) and each strategy's."""
    base = report.baseline[scenario].get("seconds") or 0.0
    return 2 * base + sum(r.metrics.get("seconds") or 0.0 for r in report.results)


def _ranks_built(parts: dict[str, dict[str, float]]) -> bool:
    """Whether the ranks built the model (the check's ``build`` command), not this process."""
    return any("rank: build command" in p for name, p in parts.items() if name != "parent")


def _builds(parts: dict[str, dict[str, float]], forked: bool) -> float:
    """The factory's time: where the check built it, plus the slowest rank that built its own (a
    forked rank's timers start from the parent's, so only what it added is its own). Where the
    ranks built the model (``rank: build command``), the parent's "build" is reading its skeleton,
    which is the check's own time, not the factory's."""
    ranks_built = _ranks_built(parts)
    here = 0.0 if ranks_built else parts["parent"].get("model build (factory)", 0.0)
    forked = forked and not ranks_built
    ranks = [p.get("model build (factory)", 0.0) - (here if forked else 0.0)
             for name, p in parts.items() if name != "parent"]
    return here + max(ranks, default=0.0)


def row(case: str, params: dict[str, Any], world_size: int,
        checks: list[tuple[float, Any, dict[str, Any], bool]]) -> dict[str, Any]:
    scenario = params["scenario"]
    outcomes = [{r.strategy: r.outcome for r in report.results} for _, report, _, _ in checks]
    builds = [_builds(parts, forked=params["device"] == "cpu") for _, _, parts, _ in checks]
    steps = [step_sum(report, scenario) for _, report, _, _ in checks]
    first = checks[0][1]
    return {"case": case, "launch": params["launch"], "world": world_size, "factory": params["factory"],
            "seconds": [round(s, 2) for s, _, _, _ in checks], "step_seconds_sum": [round(s, 3) for s in steps],
            "build_seconds": [round(b, 2) for b in builds],
            "beyond_build_over_steps": [round((s - b) / t, 2) if t else None
                                        for (s, _, _, _), b, t in zip(checks, builds, steps, strict=True)],
            "breakdown": checks[0][2], "outcomes": outcomes[0],
            "messages": {r.strategy: r.message[:200] for r in first.results if r.outcome != "pass"},
            "ranks": first.baseline[scenario].get("ranks"),
            "repeats": len(checks), "identical_outcomes": all(o == outcomes[0] for o in outcomes),
            "parent_cuda": params["parent_cuda"], "parent_cuda_after": [c for _, _, _, c in checks],
            "ranks_built": [_ranks_built(parts) for _, _, parts, _ in checks], "fork_refused": common.fork_refused(),
            "model_imported": params["model_imported"]}


def run(params: dict[str, Any], repeats: int, emit: Emit) -> None:
    began = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["GRADCKPT_PROFILE_DIR"] = tempfile.mkdtemp(prefix="gradckpt-profile-")
    os.environ["GRADCKPT_PROFILE_PARENT"] = str(os.getpid())
    common.install_timers()
    if params["ranks_build"]:
        common.build_on_ranks_also("cpu")
    world_size, _ = dist.world({**params, "world_size": params["world_size"] or 1})
    if params["model_imported"]:
        import transformers.models.llama.modeling_llama  # noqa: F401 - what a test module naming the model did

        if params["adapters"]:
            import peft  # noqa: F401
    if params["parent_cuda"]:
        import torch

        torch.ones(1, device=params["device"]).sum().item()  # CUDA used here before the checks
    case = f"{params['shape']}-{'lora' if params['adapters'] else 'full'}-{params['scenario']}"
    try:
        checks = []
        for _ in range(repeats):
            if time.perf_counter() - began > params["budget"]:
                break
            checks.append(one_check(case, params, world_size))
        if checks:
            measured = row(case, params, world_size, checks)
            emit(measured)
            print(json.dumps({k: v for k, v in measured.items() if k != "breakdown"}), flush=True)
    finally:
        if params["launch"] == "torchrun":
            common.leave_launch()
