"""Where a distributed (or isolated) check's time goes: a breakdown by part, in every process.

``python -m benchmarks.evidence.dist_profile [--device cpu|cuda] [--shape mid|1b] [--scenario fsdp2|ddp]
[--factory cpu|gpu] [--strategies a,b]``

Wraps the parts of a check with timers (in this process and, through the import that spawned
ranks repeat, in every rank): the model's build, each run's copy of it, the strategy switched
on, the parallel wrap, the training micro-batches, the full-gradient gathering, what a rank
sends back (to host, serialise), what this process receives, and the comparisons. Prints one
line per part (seconds summed over the check, by process) and, with ``--json``, writes them.

:func:`benchmarks.common.install_timers` is what the ``dist-cost`` suite uses for its rows' ``breakdown``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.common import build, build_fp32_cpu, collect_timers, install_timers, tokens

# The timers themselves (``install``, ``collect``) moved to benchmarks/common.py, where the ``dist-cost``
# suite uses them for its rows' ``breakdown``; this is the before/after run of docs/multi-gpu.md.


def main() -> int:
    import tempfile

    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="mid")
    parser.add_argument("--scenario", default="fsdp2")
    parser.add_argument("--factory", default="cpu")
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--strategies", default="non_reentrant,selective")
    parser.add_argument("--isolate", action="store_true", help="scenario train, isolate=True, instead")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="gradckpt-profile-")
    os.environ["GRADCKPT_PROFILE_DIR"], os.environ["GRADCKPT_PROFILE_PARENT"] = folder, str(os.getpid())
    install_timers()
    import pytest_gradckpt as gc

    factory = functools.partial(build, args.shape, args.lora, args.factory)
    if args.device == "cpu":
        factory = functools.partial(build_fp32_cpu, args.shape, args.lora)
    started = time.perf_counter()
    report = gc.check(factory, tokens(1, args.tokens, 32000, "cpu"), device=args.device,
                      scenarios=["train" if args.isolate else args.scenario], strategies=args.strategies.split(","),
                      distributed={"world_size": 1}, timeout=None, isolate=args.isolate)
    seconds = time.perf_counter() - started
    parts = collect_timers(folder)
    print(f"check: {seconds:.2f} s; {[(r.strategy, r.outcome) for r in report.results]}")
    for process, spent in parts.items():
        print(process)
        for part, value in sorted(spent.items(), key=lambda kv: -kv[1]):
            print(f"  {value:8.3f} s  {part}")
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": seconds, "parts": parts, "torch": torch.__version__}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
