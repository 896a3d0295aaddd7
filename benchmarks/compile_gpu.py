"""Compiled models on a CUDA GPU: the 1.1B Llama shape (bf16, sdpa, 2 x 2048 tokens) under
whole-model ``torch.compile(model)`` and per-block ``layer.compile()`` (inductor), checked with the
six per-layer strategies plus ``compile_budget``, ``--repeats`` times; and plain-torch ground truth
beside it: compiled with vs without checkpointing, compiled vs eager (relative error norms).

``python benchmarks/compile_gpu.py [--repeats 3] [--budget-s 500] [--deadline EPOCH] [--modes per_block,whole]
[--ground-truth first|last|none] [--name compile-h200-...] [--smoke]``

The model has no random op (attention dropout 0), so ``torch._inductor.config.fallback_random``
is set: it changes nothing in this program and lets the check reuse its baseline run when it
measures compile's distance from eager (one compile fewer per check). Stops starting new work
once ``--budget-s`` seconds have passed (or the clock passed ``--deadline``, shared by several
processes of one device call) and says so in the document. Writes ``compile-<device>-<date>.json``
(or ``<--name>-<date>.json``) to ``$OUT`` or ``benchmarks/results/``.

Ground truth per mode: compiled with vs without checkpointing, compiled vs eager, and compiled
with checkpointing vs eager (the judgement's assumption: a checkpointed compilation is about as
far from eager as the compiled baseline; docs/compile.md).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_cost import PER_LAYER, SHAPES, llama, tokens  # noqa: E402

import pytest_gradckpt as gc  # noqa: E402

SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512)
STRATEGIES = [*PER_LAYER, "compile_budget"]


def compiled_model(shape: dict[str, Any], device: str, dtype: torch.dtype, how: str, backend: str) -> Any:
    model = llama(shape, device, dtype)
    if how == "whole":
        return torch.compile(model, backend=backend)
    for layer in model.model.layers:
        layer.compile(backend=backend)
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def plain_step(shape: dict[str, Any], device: str, dtype: torch.dtype, how: str | None, checkpoint: bool,
               batch: dict[str, Any], backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground truth in plain torch/transformers: one step, logits and all gradients flattened."""
    torch._dynamo.reset()
    model = llama(shape, device, dtype)
    if checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    runner: Any = model
    if how == "whole":
        runner = torch.compile(model, backend=backend)
    elif how == "per_block":
        for layer in model.model.layers:
            layer.compile(backend=backend)
    torch.manual_seed(0)
    out = runner(**batch)
    out.loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    return out.logits.detach().float(), grads


def ground_truth(shape: dict[str, Any], device: str, dtype: torch.dtype, how: str, batch: dict[str, Any],
                 backend: str) -> dict[str, Any]:
    started = time.perf_counter()
    eager = plain_step(shape, device, dtype, None, False, batch, backend)
    plain = plain_step(shape, device, dtype, how, False, batch, backend)
    ckpt = plain_step(shape, device, dtype, how, True, batch, backend)
    return {"compile": how, "seconds": round(time.perf_counter() - started, 1),
            "compiled_with_vs_without_checkpoint": {"logits": rel(ckpt[0], plain[0]), "grads": rel(ckpt[1], plain[1])},
            "compiled_vs_eager": {"logits": rel(plain[0], eager[0]), "grads": rel(plain[1], eager[1])},
            "compiled_checkpointed_vs_eager": {"logits": rel(ckpt[0], eager[0]), "grads": rel(ckpt[1], eager[1])}}


def check_row(shape: dict[str, Any], device: str, dtype: torch.dtype, how: str, batch: dict[str, Any],
              backend: str) -> dict[str, Any]:
    model = compiled_model(shape, device, dtype, how, backend)
    started = time.perf_counter()
    report = gc.check(model, batch, strategies=STRATEGIES, device=device, timeout=None)
    seconds = time.perf_counter() - started
    base = report.baseline["train"]
    return {"outcomes": {r.strategy: r.outcome for r in report.results},
            "messages": {r.strategy: r.message[:300] for r in report.results if r.outcome != "pass"},
            "noise_floor": base.get("noise"), "compile_distance": base.get("compile_distance"),
            "compile_tolerance": base.get("compile_tolerance"), "checkpoint_room_bytes": base.get("checkpoint_room_bytes"),
            "max_rel_err": {r.strategy: r.metrics.get("compiled", {}).get("max_rel_err") for r in report.results},
            "compiled": {r.strategy: {k: v for k, v in r.metrics.get("compiled", {}).items() if k != "max_rel_err"}
                         for r in report.results},
            "activation_reduction": {r.strategy: r.metrics.get("activation_reduction") for r in report.results},
            "cuda_reduction": {r.strategy: r.metrics.get("cuda_reduction") for r in report.results},
            "seconds": round(seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=500.0)
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU with aot_eager")
    parser.add_argument("--modes", default="per_block,whole")
    parser.add_argument("--deadline", type=float, default=None, help="start no new work after this epoch time")
    parser.add_argument("--ground-truth", choices=["first", "last", "none"], default="first")
    parser.add_argument("--ground-truth-needs-s", type=float, default=0.0,
                        help="start the ground truth only with this many seconds left before --deadline")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    start = time.perf_counter()

    def out_of_time(needs: float = 0.0) -> bool:
        late = args.deadline is not None and time.time() + needs > args.deadline
        return late or time.perf_counter() - start > args.budget_s

    torch._inductor.config.fallback_random = True
    smoke = args.smoke or not torch.cuda.is_available()
    shape, device, dtype, backend = ((SMOKE, "cpu", torch.float32, "aot_eager") if smoke
                                     else (SHAPES["1b"], "cuda", torch.bfloat16, "inductor"))
    batch = tokens(2, 64 if smoke else 2048, shape["vocab_size"], device)
    document: dict[str, Any] = {
        "device": "cpu" if smoke else torch.cuda.get_device_name(), "torch": torch.__version__,
        "shape": shape, "dtype": str(dtype), "tokens": [2, batch["input_ids"].shape[1]], "backend": backend,
        "fallback_random": True, "strategies": STRATEGIES, "rows": [], "ground_truth": [], "not_measured": []}
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    date = datetime.date.today().isoformat()
    path = out / f"{args.name or ('compile-cpu-smoke' if smoke else 'compile-h200')}-{date}.json"

    def write() -> None:
        document["wall_seconds"] = round(time.perf_counter() - start, 1)
        path.write_text(json.dumps(document, indent=1))

    for how in args.modes.split(","):
        if out_of_time():
            document["not_measured"].append(f"{how}: ground truth and checks (time budget)")
            continue
        if args.ground_truth == "first":
            document["ground_truth"].append(ground_truth(shape, device, dtype, how, batch, backend))
            write()
        runs = []
        for repeat in range(args.repeats):
            if out_of_time():
                document["not_measured"].append(f"{how}: repeat {repeat + 1} of {args.repeats} (time budget)")
                break
            runs.append(check_row(shape, device, dtype, how, batch, backend))
            print(how, repeat, runs[-1]["outcomes"], runs[-1]["seconds"], flush=True)
            document[f"runs_{how}"] = runs
            write()
        if args.ground_truth == "last":
            if out_of_time(args.ground_truth_needs_s):
                document["not_measured"].append(f"{how}: ground truth (time budget)")
            else:
                document["ground_truth"].append(ground_truth(shape, device, dtype, how, batch, backend))
        if runs:
            document["rows"].append({
                "case": "llama-1.1b-bf16-2x2048" if not smoke else "llama-smoke", "compile": how,
                "outcomes": runs[0]["outcomes"], "noise_floor": max(r["noise_floor"] or 0 for r in runs),
                "compile_distance": max(r["compile_distance"] or 0 for r in runs),
                "compile_tolerance": max(r["compile_tolerance"] or 0 for r in runs),
                "max_rel_err": max((v for r in runs for v in r["max_rel_err"].values() if v is not None), default=None),
                "max_rel_err_by_strategy": {name: max((r["max_rel_err"][name] for r in runs
                                                       if r["max_rel_err"].get(name) is not None), default=None)
                                            for name in runs[0]["max_rel_err"]},
                "seconds": [r["seconds"] for r in runs], "repeats": len(runs),
                "identical_outcomes": all(r["outcomes"] == runs[0]["outcomes"] for r in runs)})
        write()
    print(json.dumps(document["rows"], indent=1))
    print(json.dumps(document["ground_truth"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
