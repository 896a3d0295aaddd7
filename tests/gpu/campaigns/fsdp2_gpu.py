"""FSDP2 at real size on several GPUs: the check starts one rank per GPU itself (NCCL).

``python -m tests.gpu.campaigns.fsdp2_gpu [--world-size 2] [--repeats 2]`` (run by tests/gpu/test_campaigns.py)

The 1.1B Llama shape (hidden 2048, 16 layers, intermediate 5632, 16 heads, 4 KV heads, vocab
32000), bf16, full fine-tuning, a global batch of 2 x 2048 tokens (one sequence per rank),
under ``fully_shard`` per decoder layer and on the whole model. Each rank builds the model
on its own GPU from a factory (nothing is pickled but the recipe). The six per-layer
strategies are checked against the same FSDP2 step without checkpointing, ``--repeats``
times; recorded per check: outcomes, each rank's CUDA peak for the baseline and every
strategy (above that rank's shard of weights and gradients), and the reduction of the
largest rank peak, which is what ``min_cuda_memory_reduction`` is applied to.

Writes ``fsdp2-<device>-x<N>-<date>.json`` to ``$OUT`` or ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

import pytest_gradckpt as gc
from benchmarks.common import PER_LAYER, SHAPES, llama, tokens

GIB = 2 ** 30


def build_1b() -> Any:
    """Module level, so spawned ranks can call it: the 1.1B shape on this rank's GPU."""
    return llama(SHAPES["1b"], "cuda", torch.bfloat16)


def gib(values: Any) -> Any:
    if values is None:
        return None
    if isinstance(values, list):
        return [round(v / GIB, 2) for v in values]
    return round(values / GIB, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-size", type=int, default=torch.cuda.device_count())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--min-cuda-memory-reduction", type=float, default=0.3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    document: dict[str, Any] = {"device": torch.cuda.get_device_name(), "gpus": args.world_size,
                                "torch": torch.__version__, "transformers": transformers.__version__,
                                "case": "1b-full-bf16-fsdp2", "tokens": "2 x 2048 global, 1 x 2048 per rank",
                                "min_cuda_memory_reduction": args.min_cuda_memory_reduction, "checks": []}
    inputs = tokens(2, 2048, 32000, "cpu")
    out = Path(os.environ.get("OUT") or Path(__file__).resolve().parents[3] / "benchmarks" / "results")
    name = f"fsdp2-{document['device'].replace(' ', '-')}-x{args.world_size}-{datetime.date.today().isoformat()}.json"
    for attempt in range(args.repeats):
        started = time.perf_counter()
        report = gc.check(build_1b, inputs, device="cuda", scenarios=["fsdp2"], strategies=PER_LAYER,
                          distributed={"world_size": args.world_size, "timeout": 600}, timeout=None,
                          min_cuda_memory_reduction=args.min_cuda_memory_reduction)
        baseline = report.baseline["fsdp2"]
        check = {"seconds": round(time.perf_counter() - started, 1), "ranks": baseline.get("ranks"),
                 "baseline_rank_peaks_gib": gib(baseline.get("rank_cuda_peak_bytes")),
                 "baseline_noise": baseline.get("noise"),
                 "results": {r.strategy: {"outcome": r.outcome, "message": r.message[:200],
                                          "rank_peaks_gib": gib(r.metrics.get("rank_cuda_peak_bytes")),
                                          "cuda_reduction": r.metrics.get("cuda_reduction"),
                                          "max_grad_diff": r.metrics.get("max_grad_diff"),
                                          "seconds": r.metrics.get("seconds")}
                             for r in report.results}}
        document["checks"].append(check)
        print(json.dumps(check), flush=True)
        outcomes = [{s: r["outcome"] for s, r in c["results"].items()} for c in document["checks"]]
        document["identical"] = all(o == outcomes[0] for o in outcomes)
        (out / name).write_text(json.dumps(document, indent=1) + "\n")  # after each check: a cut-off run keeps them
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
