"""What checkpointing promises and what it buys, on one GPU, at the sizes users train.

1. At the 1.1B Llama shape and a 7B Llama shape (bf16, 2 x 2048 tokens, full fine-tuning):
   ``gc.plan`` over no checkpointing, full (per-layer non-reentrant), selective (SAC: matmuls
   saved) and two offloads (transformers' ``offload=True`` semantics: checkpoint under pinned
   ``save_on_cpu``; and the built-in ``offload``). Per configuration: the verdict, memory resident
   after forward (device and pinned host) and the step's peak, warmed step time, recomputed FLOPs;
   the decoder arithmetic ``units x tokens x hidden x bytes`` beside the host memory the
   offloading checkpoint really holds after forward.
2. At 7B with LoRA: ``gc.plan(..., memory_budget=...)``, its recommendation, then an independent
   re-timing in plain transformers (the strategies' checkpoint functions installed through
   ``_set_gradient_checkpointing``, no engine) of every correct configuration that fits.

Run: ``python -m benchmarks promises [--case 1.1B --case 7B --case lora] [--repeats N] [--set budget=24GiB]``;
``--set tiny=true`` shrinks every shape (a CPU smoke run; its figures mean nothing). Each plan's JSON
and PNG go to ``--set plans=FOLDER`` (default ``$OUT``, else a temporary folder named in the row).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import statistics
import tempfile
import time
from typing import Any

import torch

import pytest_gradckpt as gc
from benchmarks import common
from benchmarks.case import Case, Emit

SHAPES = {
    "1.1B": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                 num_key_value_heads=4, vocab_size=32000),
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}
BATCH, LENGTH = 2, 2048
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a smoke run with tiny=true
ABOUT = "what checkpointing promises and buys at users' sizes: gc.plan, and its recommendation re-timed in plain torch"
_PARAMS = {"tiny": False, "budget": "24GiB", "plans": ""}
CASES = {"1.1B": Case("1.1B Llama, bf16, 2 x 2048, full fine-tuning: gc.plan over five configurations",
                      {"part": "1.1B", **_PARAMS}, needs="cuda", repeats=3),
         "7B": Case("7B Llama shape, the same", {"part": "7B", **_PARAMS}, needs="cuda", repeats=3),
         "lora": Case("7B LoRA under a memory budget: the recommendation re-timed in plain transformers",
                      {"part": "lora", **_PARAMS}, needs="cuda", repeats=3)}


def tiny() -> None:
    """Shrink every shape (a CPU smoke run of this script; its figures mean nothing)."""
    global BATCH, LENGTH
    BATCH, LENGTH = 2, 16
    for shape in SHAPES.values():
        shape.update(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=128)


def checkpoint_on_host(function: Any, *args: Any, **kwargs: Any) -> Any:
    """transformers' ``offload=True``: a non-reentrant checkpoint under pinned ``save_on_cpu``."""
    from torch.utils.checkpoint import checkpoint

    with torch.autograd.graph.save_on_cpu(pin_memory=True):
        return checkpoint(function, *args, use_reentrant=False, **kwargs)


CKPT_OFFLOAD = gc.Strategy.from_checkpoint_fn(
    "ckpt_offload", checkpoint_on_host, description="checkpoint under save_on_cpu(pin_memory=True)",
    promise=common.promise("offload=True", activations="host"))


def build(shape: str, lora: bool = False) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=LENGTH, attention_dropout=0.0)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                      "o_proj"]))
    return model


def inputs() -> dict[str, Any]:
    vocab = SHAPES["7B"]["vocab_size"]
    ids = torch.randint(0, vocab, (BATCH, LENGTH), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
    return {"input_ids": ids, "labels": ids, "use_cache": False}


def row(found: Any, result: Any) -> dict[str, Any]:
    option = found.option(result.strategy)
    metrics = result.metrics
    keys = ("resident_bytes", "baseline_resident_bytes", "host_resident_bytes", "host_peak_bytes", "boundary_bytes",
            "cuda_peak_bytes", "baseline_cuda_peak_bytes", "recomputed_flops", "recomputed_matmuls", "flop_ratio",
            "forward_flops", "backward_flops", "uncounted_flop_ops")
    return {"strategy": result.strategy, "outcome": result.outcome, "message": result.message,
            **{k: metrics.get(k) for k in keys}, "peak_bytes": option.peak_bytes, "seconds": option.seconds,
            "step_seconds": option.step_seconds, "memory_saved": option.memory_saved, "time_added": option.time_added}


def full_finetune(shape: str, repeats: int, out: pathlib.Path) -> dict[str, Any]:
    model = build(shape)
    started = time.perf_counter()
    found = gc.plan(model, inputs, strategies=["non_reentrant", "sac", CKPT_OFFLOAD, "hf_offload"],
                    repeats=repeats, name=f"llama-{shape}", report=out / f"plan-{shape}.json")
    none = found.option("none")
    rows = [row(found, r) for r in found.results]
    by_name = {r["strategy"]: r for r in rows}
    offloaded = by_name["ckpt_offload"]
    prediction = offloaded["boundary_bytes"]
    measured = offloaded["host_resident_bytes"]
    device_freed = None
    if by_name["non_reentrant"]["resident_bytes"] is not None and offloaded["resident_bytes"] is not None:
        device_freed = by_name["non_reentrant"]["resident_bytes"] - offloaded["resident_bytes"]
    summary = {
        "shape": shape, "seconds_to_run": time.perf_counter() - started,
        "none": {"peak_bytes": none.peak_bytes, "seconds": none.seconds, "step_seconds": none.step_seconds},
        "configurations": rows, "plan_table": found.table(),
        "prediction": {"formula": "units x tokens x hidden x bytes", "predicted_bytes": prediction,
                       "host_resident_after_forward_bytes": measured,
                       "device_resident_freed_vs_full_bytes": device_freed,
                       "host_error": None if not prediction or measured is None else measured / prediction - 1,
                       "device_error": None if not prediction or device_freed is None else device_freed / prediction - 1},
    }
    print(found.table(), flush=True)
    print(json.dumps(summary["prediction"]), flush=True)
    del model, found
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return summary


def installer(function: Any) -> Any:
    """Install a checkpoint function the way transformers installs its own."""
    def install(base: Any) -> None:
        base._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=function)
    return install


def every_second(base: Any) -> None:
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    key = "activation_checkpointing_kwargs" if enable.__name__.startswith("activation") else "gradient_checkpointing_kwargs"
    enable(**{key: {"use_reentrant": False}}, every_n_layers=2)


def plain_step_seconds(model_factory: Any, install: Any, steps: int) -> tuple[float, int]:
    """Warmed step time and peak in plain transformers: checkpointing switched on the way transformers
    does it, no engine, no probe."""
    import gc as collector

    collector.collect()
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated() if cuda else 0  # the peak counts the model's weights, as plan's does
    model = model_factory()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if install is not None:
        install(base)
        base.enable_input_require_grads()
    model.train()
    times: list[float] = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for index in range(steps + 1):
        for p in model.parameters():
            p.grad = None
        batch = inputs()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        if cuda:
            torch.cuda.synchronize()
        if index:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - before if cuda else 0
    del model, base
    if cuda:
        torch.cuda.empty_cache()
    return statistics.median(times), peak


def lora_plan(repeats: int, budget: str, out: pathlib.Path) -> dict[str, Any]:
    model = build("7B", lora=True)
    started = time.perf_counter()
    found = gc.plan(model, inputs, strategies=["non_reentrant", "sac", "offload", "selective", "hf_every_2"],
                    memory_budget=budget, repeats=repeats, name="llama-7B-lora", report=out / "plan-7B-lora.json")
    print(found.table(), flush=True)
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    functions = {"none": None, "non_reentrant": installer(common.checkpoint_function("non_reentrant_checkpoint")),
                 "sac": installer(common.checkpoint_function("sac_checkpoint")),
                 "offload": installer(common.checkpoint_function("offload_checkpoint")),
                 "selective": installer(common.checkpoint_function("selective_checkpoint")), "hf_every_2": every_second}
    # The recommendation and the runner-up by the plan's own times: re-timed outside the engine.
    ranked = sorted((o for o in found.options if o.correct and o.fits and o.strategy in functions),
                    key=lambda o: o.seconds or 0.0)
    fitting = [o.strategy for o in ranked[:2]]
    factory = functools.partial(build, "7B", True)
    plain = {}
    for name in fitting:
        seconds, peak = plain_step_seconds(factory, functions[name], max(2, repeats))
        plain[name] = {"seconds": seconds, "peak_bytes": peak}
        print(f"plain {name}: {seconds * 1e3:.1f} ms, peak {peak / 2**30:.2f} GiB", flush=True)
    fastest = min(plain, key=lambda n: plain[n]["seconds"]) if plain else None
    recommended = found.recommended
    verdict = {}
    if recommended in plain and fastest is not None:
        verdict = {"plain_fastest_fitting": fastest,
                   "recommended_vs_fastest": plain[recommended]["seconds"] / plain[fastest]["seconds"] - 1,
                   "recommended_plain_peak_fits": plain[recommended]["peak_bytes"] <= found.memory_budget}
    return {"budget": budget, "budget_bytes": found.memory_budget, "recommended": recommended, "why": found.why,
            "plan_table": found.table(), "options": [vars(o) for o in found.options],
            "plain_retiming": plain, **verdict, "seconds_to_run": time.perf_counter() - started}


def run(params: dict[str, Any], repeats: int, emit: Emit) -> None:
    if params["tiny"]:
        tiny()
    out = pathlib.Path(params["plans"] or os.environ.get("OUT") or tempfile.mkdtemp(prefix="promises-"))
    out.mkdir(parents=True, exist_ok=True)
    part = params["part"]
    found = lora_plan(repeats, params["budget"], out) if part == "lora" else full_finetune(part, repeats, out)
    emit({"part": part, "batch": BATCH, "length": LENGTH, "plans": str(out), **found})
