"""The layer-local baseline on a model that only fits with checkpointing, on a CUDA GPU.

``python -m benchmarks layerwise [--case agree-7b-lora-2048] [--case 7b-lora-8192] [--repeats 3]``
(``--set smoke=true``: a tiny model on the CPU, to try the suite)

1. ``agree-7b-lora-2048``: the 7B Llama shape with LoRA (r=16, dropout 0.05), bf16, 1 x 2048
   tokens, which fits without checkpointing. The six per-layer strategies checked once with
   ``baseline="whole-model"`` and once with ``baseline="layerwise"``: the outcomes must agree,
   and the two baselines' gradients are compared directly (largest absolute difference).
2. ``7b-lora-8192``: the same model at 1 x 8192 tokens, out of memory without checkpointing on
   an 80 GiB card. ``check(..., baseline="auto")`` with the six per-layer strategies and four
   planted faults (tests/mutations.py), ``--repeats`` times: it must fall back to the layer-local
   baseline by itself, give every correct strategy ``pass`` and catch every fault, identically
   each time. Recorded: why it fell back, the baseline run's allocator peak and each strategy
   run's (above the weights and gradients, as the report gives them), and the time of each.

The envelope's ``machine`` names the card; each row carries ``total_memory_gib``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch

import pytest_gradckpt as gc
from benchmarks.case import Case, Emit
from benchmarks.common import PER_LAYER, SHAPES, llama, lora, tokens
from tests import mutations

ABOUT = "the layer-local baseline against the whole-model one, and on a model that only fits with checkpointing"
CASES = {"agree-7b-lora-2048": Case("7B LoRA, 1 x 2048 tokens: whole-model and layerwise baselines agree",
                                    {"part": "agreement", "smoke": False}, needs="cuda"),
         "7b-lora-8192": Case("7B LoRA, 1 x 8192 tokens (fits only with checkpointing): baseline auto, faults caught",
                              {"part": "only_fits", "smoke": False}, needs="cuda", repeats=3)}

GIB = 2 ** 30
#: (mutation, the outcome the CPU mutation suite gives it)
FAULTS = [("rng_not_preserved", "mismatch"), ("kwargs_dropped", "error|mismatch"),
          ("output_detached", "silent|error"), ("off_by_one_percent", "mismatch")]


#: ``--smoke`` replaces the 7B shape by a tiny one on the CPU, to try the script anywhere.
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, vocab_size=32000)
SETUP = {"shape": SHAPES["7b"], "device": "cuda", "dtype": torch.bfloat16}


def build(length: int) -> tuple[Any, dict[str, Any]]:
    model = lora(llama(SETUP["shape"], SETUP["device"], SETUP["dtype"], max_position_embeddings=length),
                 dropout=0.05)
    return model, tokens(1, length, 32000, SETUP["device"])


def gib(value: Any) -> float | None:
    return None if value is None else round(value / GIB, 2)


def agreement() -> dict[str, Any]:
    model, inputs = build(2048)
    row: dict[str, Any] = {"case": "agree-7b-lora-2048", "outcomes": {}}
    reports = {}
    for kind in ("whole-model", "layerwise"):
        started = time.perf_counter()
        report = gc.check(model, inputs, strategies=PER_LAYER, baseline=kind, timeout=None)
        reports[kind] = report
        row["outcomes"][kind] = {r.strategy: r.outcome for r in report.results}
        row[f"{kind}_seconds"] = round(time.perf_counter() - started, 1)
        row[f"{kind}_baseline_peak_gib"] = gib(report.baseline["train"]["cuda_peak_bytes"])
    row["agree"] = row["outcomes"]["whole-model"] == row["outcomes"]["layerwise"]
    row["max_grad_diff"] = {kind: {r.strategy: r.metrics.get("max_grad_diff") for r in report.results}
                            for kind, report in reports.items()}
    print(json.dumps(row), flush=True)
    del model, inputs
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def only_fits_with_checkpointing(repeats: int) -> dict[str, Any]:
    model, inputs = build(8192)
    faults = [gc.Strategy.from_checkpoint_fn(name, getattr(mutations, name)) for name, _ in FAULTS]
    row: dict[str, Any] = {"case": "7b-lora-8192", "weights_gib": gib(sum(p.nbytes for p in model.parameters())),
                           "checks": []}
    for attempt in range(repeats):
        started = time.perf_counter()
        report = gc.check(model, inputs, strategies=[*PER_LAYER, *faults], baseline="auto", timeout=None)
        baseline = report.baseline["train"]
        check = {"seconds": round(time.perf_counter() - started, 1), "baseline": baseline.get("kind"),
                 "why": baseline.get("why"), "baseline_peak_gib": gib(baseline.get("cuda_peak_bytes")),
                 "baseline_seconds": baseline.get("seconds"), "noise": baseline.get("noise"),
                 "results": {r.strategy: {"outcome": r.outcome, "message": r.message[:200],
                                          "peak_gib": gib(r.metrics.get("cuda_peak_bytes")),
                                          "seconds": r.metrics.get("seconds"),
                                          "max_grad_diff": r.metrics.get("max_grad_diff")}
                             for r in report.results}}
        expected = {**{s: "pass" for s in PER_LAYER}, **dict(FAULTS)}
        check["as_expected"] = all(check["results"][s]["outcome"] in e.split("|") for s, e in expected.items())
        row["checks"].append(check)
        print(json.dumps(check), flush=True)
    outcomes = [{s: r["outcome"] for s, r in c["results"].items()} for c in row["checks"]]
    row["identical"] = all(o == outcomes[0] for o in outcomes)
    return row


def run(params: dict[str, Any], repeats: int, emit: Emit) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if params["smoke"]:
        SETUP.update(shape=SMOKE, device="cpu", dtype=torch.float32)
    on_cuda = SETUP["device"] == "cuda"
    total = gib(torch.cuda.get_device_properties(0).total_memory) if on_cuda else None
    row = agreement() if params["part"] == "agreement" else only_fits_with_checkpointing(repeats)
    emit({**row, "total_memory_gib": total})
