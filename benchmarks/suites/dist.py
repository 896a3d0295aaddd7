"""Multi-GPU checks at real size, started by the check and under torchrun (issue 21).

Cases: ``1b-full-fsdp2`` (1.1B Llama, bf16, full fine-tuning, FSDP2), ``1b-lora-fsdp2`` and
``1b-lora-ddp`` (the same with PEFT LoRA r=16 on every linear layer of the decoder), ``7b-lora-fsdp2``
(7B Llama shape, LoRA, FSDP2; two GPUs at least). One sequence of 2048 tokens per rank; the six per-layer
strategies. Parameters (``--set``): ``launch`` (``self``: the check starts one rank per GPU, once per
check; ``torchrun``: every process runs the same checks on its rank of torchrun's group), ``world_size``
(default: the GPUs here, at least 2), ``factory`` (where the factory builds: ``cpu`` as most users
write it, the rank's ``gpu``, or ``meta``, materialised by the check), ``device``, ``tiny`` (a two-layer
Llama, to try the suite; with ``device=cpu`` on gloo).

    python -m benchmarks dist --case 1b-full-fsdp2 --set world_size=2 --repeats 3
    torchrun --nproc-per-node 2 -m benchmarks dist --set launch=torchrun --repeats 3

Rows: ``case``, ``launch``, ``factory``, ``seconds`` (each check, wall), ``step_seconds`` (each check's
step without checkpointing), ``outcomes`` (first check), ``rank_peaks_gib`` (first check: baseline and
every strategy), ``repeats``, ``identical_outcomes``. The gate of issue 21, as a user writes it, is
``tests/gpu/test_dist_gate.py``.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import torch

import pytest_gradckpt as gc
from benchmarks import common
from benchmarks.case import Case, Emit
from benchmarks.common import PER_LAYER, build, gib, tokens

ABOUT = "distributed checks (FSDP2, DDP) at real size: wall time, rank peaks, stable verdicts"
PARAMS = {"launch": "self", "world_size": None, "factory": "cpu", "device": "cuda", "tiny": False,
          "strategies": PER_LAYER}


def _case(about: str, shape: str, adapters: bool, scenario: str, least: int) -> Case:
    return Case(about, {"shape": shape, "adapters": adapters, "scenario": scenario, "least_gpus": least, **PARAMS},
                needs="cuda x2" if least > 1 else "cuda", repeats=3)


CASES = {
    "1b-full-fsdp2": _case("1.1B Llama, bf16, full fine-tuning, FSDP2", "1b", False, "fsdp2", 1),
    "1b-lora-fsdp2": _case("1.1B Llama, bf16, LoRA, FSDP2", "1b", True, "fsdp2", 1),
    "1b-lora-ddp": _case("1.1B Llama, bf16, LoRA, DDP", "1b", True, "ddp", 1),
    "7b-lora-fsdp2": _case("7B Llama shape, bf16, LoRA, FSDP2", "7b", True, "fsdp2", 2),
}


def world(params: dict[str, Any]) -> tuple[int, int | None]:
    """The world size and this process's rank (``None`` when the check starts its own ranks)."""
    if params["launch"] == "torchrun":
        rank = common.join_launch(params["device"])
        if rank is None:
            raise SystemExit("launch=torchrun: start this with torchrun --nproc-per-node N -m benchmarks ...")
        return torch.distributed.get_world_size(), rank
    return params["world_size"] or max(torch.cuda.device_count(), 2), None


def one_check(case: str, params: dict[str, Any], world_size: int) -> tuple[float, Any]:
    started = time.perf_counter()
    cuda = params["device"] == "cuda"
    shape = "tiny" if params["tiny"] else params["shape"]
    report = gc.check(functools.partial(build, shape, params["adapters"], params["factory"]),
                      tokens(world_size, 64 if params["tiny"] else 2048, 32000, "cpu"), device=params["device"],
                      scenarios=[params["scenario"]], strategies=list(params["strategies"]), timeout=None,
                      distributed={"world_size": world_size},
                      min_cuda_memory_reduction=0.3 if cuda and not params["adapters"] else None)
    seconds = time.perf_counter() - started
    print(f"{case}: {seconds:.1f} s, {[(r.strategy, r.outcome) for r in report.results]}", flush=True)
    return seconds, report


def row(case: str, params: dict[str, Any], checks: list[tuple[float, Any]]) -> dict[str, Any]:
    scenario = params["scenario"]
    outcomes = [{r.strategy: r.outcome for r in report.results} for _, report in checks]
    first = checks[0][1]
    return {"case": case, "launch": params["launch"], "factory": params["factory"],
            "seconds": [round(s, 1) for s, _ in checks],
            "step_seconds": [round(report.baseline[scenario].get("seconds", float("nan")), 2) for _, report in checks],
            "outcomes": outcomes[0],
            "messages": {r.strategy: r.message[:200] for r in first.results if r.outcome != "pass"},
            "rank_peaks_gib": {"baseline": gib(first.baseline[scenario].get("rank_cuda_peak_bytes")),
                               **{r.strategy: gib(r.metrics.get("rank_cuda_peak_bytes")) for r in first.results}},
            "ranks": first.baseline[scenario].get("ranks"),
            "repeats": len(checks), "identical_outcomes": all(o == outcomes[0] for o in outcomes)}


def run(params: dict[str, Any], repeats: int, emit: Emit) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    world_size, _ = world(params)
    case = f"{params['shape']}-{'lora' if params['adapters'] else 'full'}-{params['scenario']}"
    try:
        if params["least_gpus"] > world_size:
            raise SystemExit(f"{case} needs {params['least_gpus']} ranks; this world has {world_size}")
        emit(row(case, {**params, "world_size": world_size},
                 [one_check(case, params, world_size) for _ in range(repeats)]))
    finally:
        if params["launch"] == "torchrun":
            common.leave_launch()
