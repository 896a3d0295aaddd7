"""Multi-GPU checks at real size, started by the check and under torchrun (issue 21).

Self-started (the check starts one rank per GPU, once per check)::

    python benchmarks/dist_gpu.py --launch self [--world-size 2] [--repeats 3] [--factory cpu|gpu|meta]

Under torchrun (every process runs the same checks on its rank of torchrun's group)::

    torchrun --nproc-per-node 2 benchmarks/dist_gpu.py --launch torchrun [--repeats 3]

Cases (``--cases``, comma separated; default all that fit ``--world-size``): ``1b-full-fsdp2``
(1.1B Llama, bf16, full fine-tuning, FSDP2), ``1b-lora-fsdp2`` and ``1b-lora-ddp`` (the same with
PEFT LoRA r=16 on every linear layer of the decoder), ``7b-lora-fsdp2`` (7B Llama shape, LoRA,
FSDP2). One sequence of 2048 tokens per rank; the six per-layer strategies (``--strategies``).
``--factory`` is where the factory builds: on the CPU (as most users write it), on the rank's
GPU, or on the meta device (materialised by the check).

Appends one row per case and launch to ``dist-<device>-x<N>-<date>.json`` in ``$OUT`` or
``benchmarks/results/``: ``case``, ``launch``, ``factory``, ``seconds`` (each check, wall),
``step_seconds`` (each check's step without checkpointing), ``outcomes`` (first check),
``rank_peaks_gib`` (first check: baseline and every strategy), ``repeats``, ``identical_outcomes``.

The gate of issue 21, as a user writes it, is ``benchmarks/dist_gate.py``::

    torchrun --nproc-per-node 2 -m pytest -p no:cacheprovider -o addopts= --gradckpt benchmarks/dist_gate.py
    GATE_FACTORY=gpu torchrun --nproc-per-node 2 -m pytest -p no:cacheprovider -o addopts= --gradckpt \
        benchmarks/dist_gate.py
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_cost import PER_LAYER, SHAPES, llama, lora, tokens  # noqa: E402

import pytest_gradckpt as gc  # noqa: E402
from pytest_gradckpt.distributed import join_launch, leave_launch  # noqa: E402

GIB = 2 ** 30
#: ``--tiny``: the same cases on a two-layer Llama, to try the script itself (CPU and gloo with ``--device cpu``).
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=32000)


def build(shape: str, adapters: bool, where: str) -> Any:
    """Module level (spawned ranks call it by name): the Llama shape, bf16, built ``where``."""
    device = {"cpu": "cpu", "meta": "meta"}.get(where) or f"cuda:{torch.cuda.current_device()}"
    model = llama(TINY if shape == "tiny" else SHAPES[shape], device, torch.bfloat16)
    return lora(model) if adapters else model


#: case -> (shape, LoRA, scenario, least GPUs)
CASES = {"1b-full-fsdp2": ("1b", False, "fsdp2", 1), "1b-lora-fsdp2": ("1b", True, "fsdp2", 1),
         "1b-lora-ddp": ("1b", True, "ddp", 1), "7b-lora-fsdp2": ("7b", True, "fsdp2", 2)}


def gib(values: Any) -> Any:
    return None if values is None else [round(v / GIB, 2) for v in values]


def one_check(case: str, args: Any) -> tuple[float, Any]:
    shape, adapters, scenario, _ = CASES[case]
    started = time.perf_counter()
    cuda = args.device == "cuda"
    report = gc.check(functools.partial(build, "tiny" if args.tiny else shape, adapters, args.factory),
                      tokens(args.world_size, 64 if args.tiny else 2048, 32000, "cpu"), device=args.device,
                      scenarios=[scenario], strategies=args.strategies.split(","), timeout=None,
                      distributed={"world_size": args.world_size},
                      min_cuda_memory_reduction=0.3 if cuda and not adapters else None)
    seconds = time.perf_counter() - started
    print(f"{case}: {seconds:.1f} s, {[(r.strategy, r.outcome) for r in report.results]}", flush=True)
    return seconds, report


def row(case: str, launch: str, factory: str, checks: list[tuple[float, Any]]) -> dict[str, Any]:
    scenario = CASES[case][2]
    outcomes = [{r.strategy: r.outcome for r in report.results} for _, report in checks]
    first = checks[0][1]
    return {"case": case, "launch": launch, "factory": factory,
            "seconds": [round(s, 1) for s, _ in checks],
            "step_seconds": [round(report.baseline[scenario].get("seconds", float("nan")), 2) for _, report in checks],
            "outcomes": outcomes[0],
            "messages": {r.strategy: r.message[:200] for r in first.results if r.outcome != "pass"},
            "rank_peaks_gib": {"baseline": gib(first.baseline[scenario].get("rank_cuda_peak_bytes")),
                               **{r.strategy: gib(r.metrics.get("rank_cuda_peak_bytes")) for r in first.results}},
            "ranks": first.baseline[scenario].get("ranks"),
            "repeats": len(checks), "identical_outcomes": all(o == outcomes[0] for o in outcomes)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launch", choices=["self", "torchrun"], required=True)
    parser.add_argument("--world-size", type=int, default=max(torch.cuda.device_count(), 2))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--factory", choices=["cpu", "gpu", "meta"], default="cpu")
    parser.add_argument("--cases", default="")
    parser.add_argument("--strategies", default=",".join(PER_LAYER))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a two-layer Llama instead of the real shapes")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rank = join_launch(args.device) if args.launch == "torchrun" else None
    if args.launch == "torchrun":
        if rank is None:
            parser.error("--launch torchrun: start this script with torchrun --nproc-per-node N (N >= 2)")
        args.world_size = torch.distributed.get_world_size()
    cases = [c for c in (args.cases.split(",") if args.cases else CASES) if CASES[c][3] <= args.world_size]
    device = torch.cuda.get_device_name().replace(" ", "-") if args.device == "cuda" else "cpu"
    device += "-tiny" if args.tiny else ""
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    path = out / f"dist-{device}-x{args.world_size}-{datetime.date.today().isoformat()}.json"
    for case in cases:
        checks = [one_check(case, args) for _ in range(args.repeats)]
        if rank in (None, 0):
            import transformers

            found = json.loads(path.read_text()) if path.exists() else {
                "device": device, "gpus": args.world_size, "torch": torch.__version__,
                "transformers": transformers.__version__, "rows": []}
            found["rows"].append(row(case, args.launch, args.factory, checks))
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(found, indent=1) + "\n")  # after each case: a cut-off run keeps them
            print(json.dumps(found["rows"][-1]), flush=True)
    if args.launch == "torchrun":
        leave_launch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
