"""Compiled models on a CUDA GPU: the 1.1B Llama shape (bf16, sdpa, 2 x 2048 tokens) under
whole-model ``torch.compile(model)`` and per-block ``layer.compile()`` (inductor), checked with the
six per-layer strategies plus ``compile_budget``, ``--repeats`` times; and plain-torch ground truth
beside it: compiled with vs without checkpointing, compiled vs eager (relative error norms).

``python -m benchmarks compile [--case per_block] [--case whole] [--repeats 3] [--set budget_s=500]
[--set deadline=EPOCH] [--set ground_truth=first|last|none]``; case ``smoke-cpu`` is a tiny shape on the
CPU with aot_eager.

The model has no random op (attention dropout 0), so ``torch._inductor.config.fallback_random``
is set: it changes nothing in this program and lets the check reuse its baseline run when it
measures compile's distance from eager (one compile fewer per check). Stops starting new work
once ``--budget-s`` seconds have passed (or the clock passed ``--deadline``, shared by several
processes of one device call) and says so in a ``not_measured`` row. Rows, by ``kind``: ``ground_truth``,
``run`` (each check), ``summary`` (the mode's row of the historic files), ``not_measured``.

Ground truth per mode: compiled with vs without checkpointing, compiled vs eager, and compiled
with checkpointing vs eager (the judgement's assumption: a checkpointed compilation is about as
far from eager as the compiled baseline; docs/compile.md).
"""

from __future__ import annotations

import time
from typing import Any

import torch

import pytest_gradckpt as gc
from benchmarks.case import Case, Emit
from benchmarks.common import PER_LAYER, SHAPES, llama, tokens

SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512)
STRATEGIES = [*PER_LAYER, "compile_budget"]
ABOUT = "compiled 1.1B Llama (whole and per block, inductor) checked repeatedly, with plain-torch ground truth"
_PARAMS = {"budget_s": 500.0, "deadline": None, "ground_truth": "first", "ground_truth_needs_s": 0.0}
CASES = {"per_block": Case("1.1B Llama, bf16, 2 x 2048, every decoder layer compiled", {"how": "per_block", **_PARAMS},
                           needs="cuda", repeats=3),
         "whole": Case("the same, torch.compile(model)", {"how": "whole", **_PARAMS}, needs="cuda", repeats=3),
         "smoke-cpu": Case("a two-layer Llama on the CPU with aot_eager, per block: tries the suite",
                           {"how": "per_block", "smoke": True, **_PARAMS})}


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


def run(params: dict[str, Any], repeats: int, emit: Emit) -> None:
    start = time.perf_counter()

    def out_of_time(needs: float = 0.0) -> bool:
        late = params["deadline"] is not None and time.time() + needs > params["deadline"]
        return late or time.perf_counter() - start > params["budget_s"]

    torch._inductor.config.fallback_random = True
    smoke = params.get("smoke", False) or not torch.cuda.is_available()
    shape, device, dtype, backend = ((SMOKE, "cpu", torch.float32, "aot_eager") if smoke
                                     else (SHAPES["1b"], "cuda", torch.bfloat16, "inductor"))
    batch = tokens(2, 64 if smoke else 2048, shape["vocab_size"], device)
    setting = {"shape": shape, "dtype": str(dtype), "tokens": [2, batch["input_ids"].shape[1]], "backend": backend,
               "fallback_random": True, "strategies": STRATEGIES}
    how = params["how"]
    if out_of_time():
        emit({"kind": "not_measured", "what": f"{how}: ground truth and checks (time budget)"})
        return
    if params["ground_truth"] == "first":
        emit({"kind": "ground_truth", **ground_truth(shape, device, dtype, how, batch, backend)})
    runs = []
    for repeat in range(repeats):
        if out_of_time():
            emit({"kind": "not_measured", "what": f"{how}: repeat {repeat + 1} of {repeats} (time budget)"})
            break
        runs.append(check_row(shape, device, dtype, how, batch, backend))
        print(how, repeat, runs[-1]["outcomes"], runs[-1]["seconds"], flush=True)
        emit({"kind": "run", "compile": how, "repeat": repeat, **runs[-1]})
    if params["ground_truth"] == "last":
        if out_of_time(params["ground_truth_needs_s"]):
            emit({"kind": "not_measured", "what": f"{how}: ground truth (time budget)"})
        else:
            emit({"kind": "ground_truth", **ground_truth(shape, device, dtype, how, batch, backend)})
    if runs:
        emit({"kind": "summary", "setting": setting,
              "case": "llama-1.1b-bf16-2x2048" if not smoke else "llama-smoke", "compile": how,
              "outcomes": runs[0]["outcomes"], "noise_floor": max(r["noise_floor"] or 0 for r in runs),
              "compile_distance": max(r["compile_distance"] or 0 for r in runs),
              "compile_tolerance": max(r["compile_tolerance"] or 0 for r in runs),
              "max_rel_err": max((v for r in runs for v in r["max_rel_err"].values() if v is not None), default=None),
              "max_rel_err_by_strategy": {name: max((r["max_rel_err"][name] for r in runs
                                                     if r["max_rel_err"].get(name) is not None), default=None)
                                          for name in runs[0]["max_rel_err"]},
              "seconds": [r["seconds"] for r in runs], "repeats": len(runs),
              "wall_seconds": round(time.perf_counter() - start, 1),
              "identical_outcomes": all(r["outcomes"] == runs[0]["outcomes"] for r in runs)})
