"""What a check costs next to the training steps it runs, and whether its verdicts are stable.

``python benchmarks/check_cost.py gpu [--repeats 10]``  (on a CUDA GPU)
    Cases ``1b-full-bf16``, ``1b-lora-bf16`` (the 1.1B Llama shape, 2 x 2048 tokens) and
    ``7b-lora-bf16`` (the 7B shape, 1 x 2048), bf16, default CUDA settings. For each: the six
    per-layer strategies checked ``--repeats`` times in a row (outcomes must be identical, all
    ``pass``); the check's wall time over the raw steps it runs (the same 2 baseline + 6
    strategy steps, bare: a copy of the model, the strategy applied, forward + backward, timed
    after a warm-up, median of 3); the check's GPU peak above the caller's model, against the
    bound ``no-checkpoint step peak above weights + one copy of the weights + one copy of the
    trainable gradients``. Then the mutation suite's broken checkpoint functions on bf16
    models of real width (2048). Writes ``check-cost-<device>-<date>.json`` to ``$OUT`` or
    ``results/``.

``python benchmarks/check_cost.py cpu``  (any machine)
    The same figures for fp32 Llama shapes from about 2M to 90M parameters on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest_gradckpt as gc  # noqa: E402
from pytest_gradckpt.arguments import tensor_bytes  # noqa: E402
from pytest_gradckpt.layers import ModelInfo, find_layers, instrument  # noqa: E402
from pytest_gradckpt.probes.recompute import LayerCounter  # noqa: E402
from pytest_gradckpt.strategies import get_strategy  # noqa: E402

GIB = 2 ** 30
PER_LAYER = ["non_reentrant", "hf_non_reentrant", "hf_reentrant", "selective", "offload", "sequential"]
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=4, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
}
#: (name, hidden, layers, intermediate, heads, tokens) for the CPU sweep, fp32.
CPU_SHAPES = [("cpu-2M", 128, 4, 344, 4, 128), ("cpu-12M", 256, 8, 688, 8, 256),
              ("cpu-25M", 384, 8, 1024, 8, 256), ("cpu-50M", 512, 10, 1376, 8, 256),
              ("cpu-90M", 640, 12, 1728, 10, 256)]


def llama(shape: dict[str, Any], device: str, dtype: torch.dtype, **extra: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    extra.setdefault("max_position_embeddings", 4096)
    config = LlamaConfig(**shape, attention_dropout=0.0, **extra)
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")


def lora(model: Any, dropout: float = 0.0) -> Any:
    from peft import LoraConfig, get_peft_model

    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=linear,
                                            task_type="CAUSAL_LM"))


def tokens(batch: int, length: int, vocab: int, device: str) -> dict[str, Any]:
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1)).to(device)
    return {"input_ids": ids, "labels": ids, "use_cache": False}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def raw_step_seconds(model: Any, inputs: dict[str, Any], strategy: str | None, device: str) -> tuple[float, int]:
    """A bare step (copy, strategy applied, forward + backward): median of 3 after a warm-up,
    and the step's allocator peak above the copy (CUDA)."""
    names, found_by = find_layers(model)
    times, peak = [], 0
    for attempt in range(4):
        sync(device)
        started = time.perf_counter()
        copied = copy.deepcopy(model)
        if strategy is not None:
            info = ModelInfo(copied, names, found_by)
            for name, layer in zip(names, info.layers, strict=True):  # as the engine does: strategies route calls through it
                instrument(layer, name, LayerCounter())
            get_strategy(strategy).apply(info)
        if device.startswith("cuda"):
            sync(device)
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        copied(**inputs).loss.backward()
        sync(device)
        if device.startswith("cuda"):
            peak = max(peak, torch.cuda.max_memory_allocated() - before)
        if attempt:
            times.append(time.perf_counter() - started)
        del copied
    return statistics.median(times), peak


def measure_case(case: str, model: Any, inputs: dict[str, Any], device: str, repeats: int,
                 strategies: list[str]) -> dict[str, Any]:
    weights = tensor_bytes(model.parameters())
    trainable = tensor_bytes(p for p in model.parameters() if p.requires_grad)
    base_seconds, base_peak = raw_step_seconds(model, inputs, None, device)
    raw = 2 * base_seconds + sum(raw_step_seconds(model, inputs, s, device)[0] for s in strategies)
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


def fault_rows(device: str) -> list[dict[str, Any]]:
    """The mutation suite's broken functions on bf16 models 2048 wide; expected verdicts from CPU."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import mutations  # tests/mutations.py

    from pytest_gradckpt.zoo.plain import DropoutMaskNet

    def masked() -> tuple[Any, Any]:
        torch.manual_seed(0)
        model = DropoutMaskNet(vocab=32000, width=2048, depth=4, dropout=0.1).to(device, torch.bfloat16)
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
    rows = []
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
        rows.append(row)
        del model, inputs
        torch.cuda.empty_cache() if device.startswith("cuda") else None
    return rows


def write(document: dict[str, Any], device_name: str) -> Path:
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    path = out / f"check-cost-{device_name.replace(' ', '-')}-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(document, indent=1) + "\n")
    print(f"wrote {path}")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("where", choices=["gpu", "cpu"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--cases", default="1b-full-bf16,1b-lora-bf16,7b-lora-bf16")
    parser.add_argument("--no-faults", action="store_true")
    parser.add_argument("--profile", action="store_true", help="profile one check of the first case and stop")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    document: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__, "rows": []}
    if args.where == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        for case, hidden, layers, intermediate, heads, length in CPU_SHAPES:
            shape = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, vocab_size=32000)
            model = llama(shape, "cpu", torch.float32)
            case = f"cpu-{round(sum(p.numel() for p in model.parameters()) / 1e6)}M"
            document["rows"].append(measure_case(case, model, tokens(2, length, 32000, "cpu"), "cpu",
                                                 args.repeats, PER_LAYER))
        write(document, "cpu")
        return 0
    device = "cuda"
    document["device"] = torch.cuda.get_device_name()
    for case in args.cases.split(","):
        size, kind, _ = case.split("-")
        model = llama(SHAPES[size], device, torch.bfloat16)
        model = lora(model) if kind == "lora" else model
        inputs = tokens(2 if size == "1b" else 1, 2048, 32000, device)
        if args.profile:
            import cProfile
            import pstats

            gc.check(model, inputs, strategies=PER_LAYER, device=device, timeout=None)
            with cProfile.Profile() as profile:
                gc.check(model, inputs, strategies=PER_LAYER, device=device, timeout=None)
            pstats.Stats(profile).sort_stats("tottime").print_stats(25)
            return 0
        document["rows"].append(measure_case(case, model, inputs, device, args.repeats, PER_LAYER))
        del model, inputs
        torch.cuda.empty_cache()
        write(document, document["device"])
    if not args.no_faults:
        document["faults"] = fault_rows(device)
    write(document, document["device"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
