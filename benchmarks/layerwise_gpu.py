"""The layer-local baseline on a model that only fits with checkpointing, on a CUDA GPU.

``python benchmarks/layerwise_gpu.py [--repeats 3]``

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

Writes ``layerwise-<device>-<date>.json`` to ``$OUT`` or ``benchmarks/results/``.
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import mutations  # noqa: E402  tests/mutations.py
from check_cost import PER_LAYER, SHAPES, llama, lora, tokens  # noqa: E402

import pytest_gradckpt as gc  # noqa: E402

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-agreement", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (tries the script)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import peft
    import transformers

    if args.smoke:
        SETUP.update(shape=SMOKE, device="cpu", dtype=torch.float32)
        os.environ["OUT"] = os.environ.get("OUT") or "/tmp"
    on_cuda = SETUP["device"] == "cuda"
    document: dict[str, Any] = {"device": torch.cuda.get_device_name() if on_cuda else "cpu", "torch": torch.__version__,
                                "transformers": transformers.__version__, "peft": peft.__version__,
                                "total_memory_gib": gib(torch.cuda.get_device_properties(0).total_memory)
                                if on_cuda else None}
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    path = out / f"layerwise-{document['device'].replace(' ', '-')}-{datetime.date.today().isoformat()}.json"
    if not args.skip_agreement:
        document["agreement"] = agreement()
        path.write_text(json.dumps(document, indent=1) + "\n")  # kept if the next part is cut off
    document["only_fits_with_checkpointing"] = only_fits_with_checkpointing(args.repeats)
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
