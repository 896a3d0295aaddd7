"""What a check costs next to the training steps it runs, and whether its verdicts are stable.

GPU cases ``1b-full-bf16``, ``1b-lora-bf16`` (the 1.1B Llama shape, 2 x 2048 tokens) and
``7b-lora-bf16`` (the 7B shape, 1 x 2048), bf16, default CUDA settings. For each: the six per-layer
strategies checked ``repeats`` times in a row (outcomes must be identical, all ``pass``); the check's
wall time over the raw steps it runs (the same 2 baseline + 6 strategy steps, bare: a copy of the
model, the strategy applied, forward + backward, timed after a warm-up, median of 3); the check's GPU
peak above the caller's model, against the bound ``no-checkpoint step peak above weights + one copy of
the weights + one copy of the trainable gradients``. Case ``faults-bf16``: the mutation suite's broken
checkpoint functions on bf16 models of real width (2048). ``--set profile=true`` profiles one check of
a GPU case instead (cProfile, printed).

CPU cases ``cpu-2M`` ... ``cpu-90M``: the same figures for fp32 Llama shapes on the CPU; ``tiny-cpu``
(a two-layer Llama, 2 x 32 tokens) tries the suite in seconds, ``tiny-cuda`` the same on a GPU.

    python -m benchmarks check-cost --case '1b-*' --case 7b-lora-bf16 --case faults-bf16 --repeats 10
    python -m benchmarks check-cost --case 'cpu-*' --repeats 3
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import torch

import pytest_gradckpt as gc
from benchmarks import common
from benchmarks.case import Case, Emit
from benchmarks.common import GIB, PER_LAYER, SHAPES, llama, lora, sync, tokens

ABOUT = "a check's wall time and memory next to the bare steps it runs; its verdicts' stability"


def _gpu(size: str, kind: str) -> Case:
    return Case(f"{size} Llama, {'LoRA r=16' if kind == 'lora' else 'full fine-tuning'}, bf16, "
                f"{2 if size == '1b' else 1} x 2048 tokens, six per-layer strategies",
                {"size": size, "kind": kind, "profile": False}, needs="cuda", repeats=10)


def _cpu(name: str, hidden: int, layers: int, intermediate: int, heads: int, length: int) -> Case:
    return Case(f"fp32 Llama {name[4:]} ({layers} layers of {hidden}), 2 x {length} tokens, on the CPU",
                {"hidden": hidden, "layers": layers, "intermediate": intermediate, "heads": heads, "length": length},
                repeats=3)


CASES = {
    "1b-full-bf16": _gpu("1b", "full"),
    "1b-lora-bf16": _gpu("1b", "lora"),
    "7b-lora-bf16": _gpu("7b", "lora"),
    "faults-bf16": Case("the mutation suite's broken checkpoint functions on bf16 models 2048 wide: each caught",
                        {"faults": True}, needs="cuda"),
    "cpu-2M": _cpu("cpu-2M", 128, 4, 344, 4, 128),
    "cpu-12M": _cpu("cpu-12M", 256, 8, 688, 8, 256),
    "cpu-25M": _cpu("cpu-25M", 384, 8, 1024, 8, 256),
    "cpu-50M": _cpu("cpu-50M", 512, 10, 1376, 8, 256),
    "cpu-90M": _cpu("cpu-90M", 640, 12, 1728, 10, 256),
    "tiny-cpu": _cpu("cpu-tiny", 64, 2, 128, 4, 32),
    "tiny-cuda": Case("a two-layer Llama (hidden 64), bf16, 2 x 256 tokens on CUDA: tries the suite on a GPU",
                      {"size": "tiny", "kind": "full", "profile": False}, needs="cuda"),
}


def measure_case(case: str, model: Any, inputs: dict[str, Any], device: str, repeats: int,
                 strategies: list[str]) -> dict[str, Any]:
    weights = common.tensor_bytes(model.parameters())
    trainable = common.tensor_bytes(p for p in model.parameters() if p.requires_grad)
    base_seconds, base_peak = common.raw_step_seconds(model, inputs, None, device)
    raw = 2 * base_seconds + sum(common.raw_step_seconds(model, inputs, s, device)[0] for s in strategies)
    bound = base_peak + weights + trainable
    runs, extra_peaks, outcome_sets = [], [], []
    for _ in range(repeats):
        sync(device)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        report = gc.check(model, inputs, strategies=strategies, device=device, timeout=None)
        sync(device)
        runs.append(time.perf_counter() - started)
        if device.startswith("cuda"):
            extra_peaks.append(torch.cuda.max_memory_allocated() - before)
        outcome_sets.append({r.strategy: r.outcome for r in report.results})
        print(f"{case}: check {len(runs)}: {runs[-1]:.2f} s", {r.strategy: (r.outcome, r.message[:80])
                                                               for r in report.results if r.outcome != "pass"},
              f"noise={report.baseline['train'].get('noise')}", flush=True)
    check_seconds = statistics.median(runs)
    row = {"case": case, "check_seconds": round(check_seconds, 3), "raw_seconds": round(raw, 3),
           "check_over_raw": round(check_seconds / raw, 2), "repeats": repeats,
           "identical_outcomes": all(o == outcome_sets[0] for o in outcome_sets), "outcomes": outcome_sets[0],
           "check_seconds_all": [round(t, 3) for t in runs], "parameters": sum(p.numel() for p in model.parameters()),
           "baseline_noise": report.baseline["train"].get("noise"),
           "max_grad_diff": {r.strategy: r.metrics.get("max_grad_diff") for r in report.results}}
    if extra_peaks:
        row.update(extra_peak_gib=round(max(extra_peaks) / GIB, 2), bound_gib=round(bound / GIB, 2),
                   weights_gib=round(weights / GIB, 2), step_peak_above_weights_gib=round(base_peak / GIB, 2))
    print(json.dumps({k: v for k, v in row.items() if k != "max_grad_diff"}), flush=True)
    return row


# --------------------------------------------------------------------------- faults at bf16


def fault_rows(device: str, emit: Emit) -> None:
    """The mutation suite's broken functions on bf16 models 2048 wide; expected verdicts from CPU."""
    from tests import mutations

    def masked() -> tuple[Any, Any]:
        torch.manual_seed(0)
        model = common.dropout_mask_net(vocab=32000, width=2048, depth=4, dropout=0.1).to(device, torch.bfloat16)
        generator = torch.Generator().manual_seed(1)
        inputs = {"ids": torch.randint(0, 32000, (2, 2048), generator=generator).to(device),
                  "mask": (torch.rand(2, 2048, 1, generator=generator) > 0.3).to(device, torch.bfloat16)}
        return model, inputs

    def four_layer_llama(dtype: torch.dtype = torch.bfloat16, frozen: bool = False) -> tuple[Any, Any]:
        model = llama(dict(SHAPES["1b"], num_hidden_layers=4), device, dtype)
        if frozen:
            for index in (0, 2):
                model.model.layers[index].requires_grad_(False)
        return model, tokens(2, 2048, 32000, device)

    cases = [
        ("rng_not_preserved", masked, "train", {}, "mismatch"),
        ("kwargs_dropped", masked, "train", {}, "mismatch"),
        ("kwargs_dropped", four_layer_llama, "train", {}, "error|mismatch"),
        ("output_detached", masked, "train", {}, "silent"),
        ("off_by_a_tenth_percent", four_layer_llama, "train", {}, "mismatch"),
        ("off_by_one_percent", four_layer_llama, "train", {}, "mismatch"),
        ("inverted_frozen_skipper", lambda: four_layer_llama(frozen=True), "train", {"skips_frozen": True},
         "recompute"),
        ("offload_losing_input_grad", masked, "train", {}, "silent"),
        ("recompute_outside_autocast", lambda: four_layer_llama(torch.float32), "autocast", {}, "error|mismatch"),
        ("correct", four_layer_llama, "train", {}, "pass"),
    ]
    for name, build, scenario, options, expected in cases:
        model, inputs = build()
        strategy = gc.Strategy.from_checkpoint_fn(name, getattr(mutations, name), **options)
        (result,) = gc.check(model, inputs, strategies=[strategy], scenarios=[scenario], device=device,
                             timeout=None).results
        caught = result.outcome in expected.split("|")
        row = {"fault": name, "model": type(model).__name__, "scenario": scenario, "expected": expected,
               "outcome": result.outcome, "caught": caught, "message": result.message[:300],
               "max_grad_diff": result.metrics.get("max_grad_diff")}
        print(json.dumps(row), flush=True)
        emit(row)
        del model, inputs
        torch.cuda.empty_cache() if device.startswith("cuda") else None


def _profile(model: Any, inputs: dict[str, Any], device: str) -> None:
    import cProfile
    import pstats

    gc.check(model, inputs, strategies=PER_LAYER, device=device, timeout=None)
    with cProfile.Profile() as profile:
        gc.check(model, inputs, strategies=PER_LAYER, device=device, timeout=None)
    pstats.Stats(profile).sort_stats("tottime").print_stats(25)


def run(params: dict[str, Any], repeats: int, emit: Emit) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if params.get("faults"):
        fault_rows("cuda", emit)
        return
    if "size" not in params:  # a CPU shape
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        shape = dict(hidden_size=params["hidden"], intermediate_size=params["intermediate"],
                     num_hidden_layers=params["layers"], num_attention_heads=params["heads"],
                     num_key_value_heads=params["heads"], vocab_size=32000)
        model = llama(shape, "cpu", torch.float32)
        case = f"cpu-{round(sum(p.numel() for p in model.parameters()) / 1e6)}M"
        emit(measure_case(case, model, tokens(2, params["length"], 32000, "cpu"), "cpu", repeats, PER_LAYER))
        return
    size, kind = params["size"], params["kind"]
    model = llama(common.shape(size), "cuda", torch.bfloat16)
    model = lora(model) if kind == "lora" else model
    inputs = tokens(2 if size != "7b" else 1, 256 if size == "tiny" else 2048, 32000, "cuda")
    if params["profile"]:
        _profile(model, inputs, "cuda")
        return
    emit(measure_case(f"{size}-{kind}-bf16", model, inputs, "cuda", repeats, PER_LAYER))
