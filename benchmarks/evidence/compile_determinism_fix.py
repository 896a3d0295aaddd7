"""Which side of whole-model compile's distance the check's deterministic kernels move, and what a
check gives without them (docs/compile.md, "Deterministic kernels under whole-model compile").

Part ``mechanism`` (plain torch, no code of this project): a small Llama (hidden 256, 2 layers,
bf16, sdpa, attention dropout 0.1, 2 x 256 tokens) compiled whole with inductor, random ops drawn as
eager (``fallback_random``). The compiled step and the eager step each run with deterministic
algorithms off and on (4 runs); every pair's distance (largest relative error norm over the logits
and every gradient), and the names of the attention, dropout and random ops each run called
(torch.profiler, CPU events).

Part ``plain`` (plain torch): the ``whole`` family of compile_truth_families at the 1.1B width with
``--layers`` decoder layers: B, E and each checkpoint function, deterministic algorithms off (the
user's program).

Part ``check:VARIANT``: ``gc.check`` on the same model, compiled whole, with ``non_reentrant``,
``rng_not_preserved`` and ``gradient_three_percent_off``; ``VARIANT`` is ``as_is`` (the check as it
is), ``no_deterministic`` (the engine's deterministic kernels switched off for the check, patched
here), or ``eager_nondeterministic`` (deterministic kernels on, compile's eager step without them).

``python -m benchmarks.evidence.compile_determinism_fix --parts mechanism,plain,check:as_is [--layers 2]``;
one JSON line per part to stdout (and to ``$OUT/determinism-PARTS.jsonl`` when ``$OUT`` is set).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.evidence import compile_truth_families as families
from benchmarks.suites import compile_truth as truth

SMALL = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024)
#: Op names that draw random numbers or choose an attention kernel.
WATCHED = re.compile(r"attention|dropout|bernoulli|rand|philox|seed", re.IGNORECASE)


@contextlib.contextmanager
def deterministic(on: bool) -> Iterator[None]:
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved)


#: ``--smoke``: the CPU with aot_eager, tokens 2 x 32 (tries the script; determinism is CUDA's question).
SMOKE = {"device": "cpu", "backend": "aot_eager", "length": 32, "dtype": torch.float32}
GPU = {"device": "cuda", "backend": "inductor", "length": 1024, "dtype": torch.bfloat16}


def profiled_step(model0: Any, ids: torch.Tensor, how: str, on: bool, backend: str) -> tuple[dict[str, Any], list[str]]:
    with deterministic(on), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        found = truth.plain_step(model0, ids, how, backend)
    names = sorted({event.name for event in prof.events() if WATCHED.search(event.name)
                    and not event.name.startswith(("Torch-Compiled", "## "))})
    return found, names


def mechanism(where: dict[str, Any]) -> dict[str, Any]:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # strict determinism refuses cuBLAS without it
    ids = truth.tokens(SMALL, 256, where["device"])
    model0 = truth.build(SMALL, where["device"], torch.bfloat16)
    runs, ops = {}, {}
    for how in ("whole", "eager"):
        for on in (False, True):
            key = f"{'compiled' if how == 'whole' else 'eager'} det={'on' if on else 'off'}"
            runs[key], ops[key] = profiled_step(model0, ids, how, on, where["backend"])
    keys = list(runs)
    distances = {f"{a} vs {b}": truth.distance(runs[a], runs[b]) for i, a in enumerate(keys) for b in keys[i + 1:]}
    return {"part": "mechanism", "shape": SMALL, "tokens": [2, 256], "distances": distances, "ops": ops}


def plain(layers: int, smoke: bool) -> dict[str, Any]:
    args = argparse.Namespace(smoke=smoke, layers=layers, deadline=time.time() + 400)
    return dict(families.plain_truth("whole", args), part="plain", layers=layers)


@contextlib.contextmanager
def variant(name: str) -> Iterator[None]:
    """The check as it is, or with one of the two changes patched in for the duration."""
    from pytest_gradckpt.compilation import compiled
    from pytest_gradckpt.pipeline import engine
    from pytest_gradckpt.pipeline.process_state import deterministic_kernels

    if name == "as_is":
        yield
        return
    if name == "no_deterministic":
        original = engine.deterministic_kernels
        engine.deterministic_kernels = lambda device: deterministic_kernels(torch.device("cpu"))  # type: ignore[assignment]
        try:
            yield
        finally:
            engine.deterministic_kernels = original
        return
    if name == "eager_nondeterministic":
        measure = compiled.measure_distance

        def patched(*args: Any, **kwargs: Any) -> Any:
            with deterministic(False):
                return measure(*args, **kwargs)

        compiled.measure_distance = patched  # type: ignore[assignment]
        try:
            yield
        finally:
            compiled.measure_distance = measure
        return
    raise SystemExit(f"unknown variant {name!r}")


def check(name: str, layers: int, where: dict[str, Any]) -> dict[str, Any]:
    import pytest_gradckpt as gc
    from tests import mutations

    shape = dict(truth.SMOKE if where is SMOKE else truth.SHAPE, num_hidden_layers=layers)
    ids = truth.tokens(shape, where["length"], where["device"])
    model = torch.compile(truth.build(shape, where["device"], where["dtype"]), backend=where["backend"])
    strategies = ["non_reentrant", gc.Strategy.from_checkpoint_fn("rng_not_preserved", mutations.rng_not_preserved),
                  gc.Strategy.from_checkpoint_fn("gradient_three_percent_off", mutations.gradient_three_percent_off)]
    started = time.perf_counter()
    with variant(name):
        report = gc.check(model, {"input_ids": ids, "labels": ids}, strategies=strategies, device=where["device"])
    train = report.baseline.get("train", {})
    return {"part": f"check:{name}", "layers": layers, "seconds": round(time.perf_counter() - started, 1),
            "compile_distance": train.get("compile_distance"), "compile_tolerance": train.get("compile_tolerance"),
            "determinism_note": train.get("determinism"),
            "outcomes": {r.strategy: r.outcome for r in report.results},
            "max_rel_err": {r.strategy: r.metrics.get("compiled", {}).get("max_rel_err") for r in report.results},
            "messages": {r.strategy: r.message[:240] for r in report.results}}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="mechanism,plain,check:as_is,check:no_deterministic")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="the CPU with aot_eager, a tiny width")
    args = parser.parse_args()
    where = SMOKE if args.smoke else GPU
    out = os.environ.get("OUT")
    sink = Path(out) / f"determinism-{args.parts.replace(':', '_').replace(',', '+')}.jsonl" if out else None
    for part in args.parts.split(","):
        started = time.perf_counter()
        try:
            if part == "mechanism":
                row = mechanism(where)
            elif part == "plain":
                row = plain(args.layers, args.smoke)
            else:
                row = check(part.split(":", 1)[1], args.layers, where)
        except Exception as exc:  # noqa: BLE001 - one part failing is reported, the others go on
            row = {"part": part, "error": f"{type(exc).__name__}: {exc}"[:800]}
        row["wall"] = round(time.perf_counter() - started, 1)
        line = json.dumps(row, default=str)
        print(line, flush=True)
        if sink is not None:
            with sink.open("a") as handle:
                handle.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
