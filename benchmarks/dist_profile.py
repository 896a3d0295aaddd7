"""Where a distributed (or isolated) check's time goes: a breakdown by part, in every process.

``python benchmarks/dist_profile.py [--device cpu|cuda] [--shape mid|1b] [--scenario fsdp2|ddp]
[--factory cpu|gpu] [--strategies a,b]``

Wraps the parts of a check with timers (in this process and, through the import that spawned
ranks repeat, in every rank): the model's build, each run's copy of it, the strategy switched
on, the parallel wrap, the training micro-batches, the full-gradient gathering, what a rank
sends back (to host, serialise), what this process receives, and the comparisons. Prints one
line per part (seconds summed over the check, by process) and, with ``--json``, writes them.

:func:`install` is what ``benchmarks/dist_gpu.py`` uses for its rows' ``breakdown``.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: part -> seconds, in this process; ranks write theirs to ``$GRADCKPT_PROFILE_DIR/<pid>.json``.
SPENT: collections.Counter[str] = collections.Counter()


def _timed(part: str, function: Any) -> Any:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "GRADCKPT_PROFILE_T0" in os.environ and "rank: start to first command" not in SPENT and (
                os.getpid() != int(os.environ.get("GRADCKPT_PROFILE_PARENT", "0"))):
            SPENT["rank: start to first command"] = time.time() - float(os.environ["GRADCKPT_PROFILE_T0"])
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            SPENT[part] += time.perf_counter() - started
            folder = os.environ.get("GRADCKPT_PROFILE_DIR")
            if folder and os.getpid() != int(os.environ.get("GRADCKPT_PROFILE_PARENT", "0")):
                Path(folder, f"{os.getpid()}.json").write_text(json.dumps(SPENT))
    wrapper.__profiled__ = True  # type: ignore[attr-defined]
    return wrapper


def _wrap(owner: Any, name: str, part: str) -> None:
    function = getattr(owner, name, None)
    if function is None or getattr(function, "__profiled__", False):
        return
    if isinstance(owner, type) and isinstance(owner.__dict__.get(name), staticmethod):
        setattr(owner, name, staticmethod(_timed(part, function)))
    else:
        setattr(owner, name, _timed(part, function))


def install() -> None:
    """Put the timers on (idempotent; modules are patched where they are looked up)."""
    from pytest_gradckpt import arguments, baselines, engine, rank_group, runs, verdicts
    from pytest_gradckpt.probes import gradients

    _wrap(arguments.Subject, "_build", "model build (factory)")
    _wrap(arguments.Subject, "fresh_model", "per-run model copy (to device)")
    _wrap(runs.Stepper, "_switch_on", "strategy switched on")
    _wrap(runs.Stepper, "_wrap", "parallel wrap (DDP/fully_shard)")
    _wrap(runs.Stepper, "_train", "steps (forward+backward, probes)")
    _wrap(runs.Stepper, "_collect", "collect (full-gradient gathering)")
    _wrap(runs.Run, "to_payload", "rank: payload to host")
    _wrap(rank_group, "_answer", "rank: whole command")
    _wrap(rank_group, "fingerprint", "rank: fingerprints")
    _wrap(rank_group.RankGroup, "start", "parent: ranks started")
    _wrap(rank_group.RankGroup, "run", "parent: waiting for ranks (incl. transfer)")
    _wrap(arguments.Subject, "keep_template_on_device", "rank: template kept on its device")
    _wrap(verdicts, "gather", "parent: comparison (evidence)")
    _mark_spawn(rank_group)
    _wrap(gradients, "measure_noise", "parent: baseline noise")
    _wrap(baselines, "_validate", "parent: baseline validated")
    _wrap(engine, "_make_room", "parent: make room")
    for module in (baselines, verdicts):
        if hasattr(module, "measure_noise"):
            module.measure_noise = gradients.measure_noise  # type: ignore[attr-defined]


def _mark_spawn(rank_group: Any) -> None:
    """The parent's clock when it starts a group travels to the ranks in the environment; a rank
    reads it at its first timed call: spawn, imports and unpickling what it is handed."""
    start = rank_group.RankGroup.start
    if getattr(start, "__clocked__", False):
        return

    def started(self: Any) -> None:
        os.environ["GRADCKPT_PROFILE_T0"] = repr(time.time())
        start(self)

    started.__clocked__ = True  # type: ignore[attr-defined]
    rank_group.RankGroup.start = started


def collect(folder: str) -> dict[str, dict[str, float]]:
    """Every process's parts: ``{"parent": {...}, "rank <pid>": {...}}`` in seconds."""
    found = {"parent": {k: round(v, 3) for k, v in SPENT.items()}}
    for path in sorted(Path(folder).glob("*.json")):
        found[f"rank {path.stem}"] = {k: round(v, 3) for k, v in json.loads(path.read_text()).items()}
        path.unlink()
    return found


if os.environ.get("GRADCKPT_PROFILE_DIR"):  # spawned ranks import this module again: time them too
    install()


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
    install()
    import pytest_gradckpt as gc
    from check_cost import SHAPES, tokens
    from dist_gpu import build

    mid = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
               num_key_value_heads=2, vocab_size=32000)
    SHAPES.setdefault("mid", mid)
    factory = functools.partial(build, args.shape, args.lora, args.factory)
    if args.device == "cpu":
        factory = functools.partial(_fp32_cpu, args.shape, args.lora)
    started = time.perf_counter()
    report = gc.check(factory, tokens(1, args.tokens, 32000, "cpu"), device=args.device,
                      scenarios=["train" if args.isolate else args.scenario], strategies=args.strategies.split(","),
                      distributed={"world_size": 1}, timeout=None, isolate=args.isolate)
    seconds = time.perf_counter() - started
    parts = collect(folder)
    print(f"check: {seconds:.2f} s; {[(r.strategy, r.outcome) for r in report.results]}")
    for process, spent in parts.items():
        print(process)
        for part, value in sorted(spent.items(), key=lambda kv: -kv[1]):
            print(f"  {value:8.3f} s  {part}")
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": seconds, "parts": parts, "torch": torch.__version__}, indent=1))
    return 0


def _fp32_cpu(shape: str, adapters: bool) -> Any:
    """The shape in float32 on the CPU (bf16 matmuls on a CPU are slow and not what is profiled)."""
    import torch
    from check_cost import SHAPES, llama, lora

    model = llama(SHAPES[shape], "cpu", torch.float32)
    return lora(model) if adapters else model


if __name__ == "__main__":
    sys.exit(main())
