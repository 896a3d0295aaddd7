"""GPU memory and step time of every built-in strategy on a ~1.1B Llama, and the CPU prediction.

Shape: hidden 2048, 16 layers, intermediate 5632, 16 heads, 4 KV heads, vocab 32000, bf16,
batch 2 x 2048 tokens, random weights. Settings: ``full`` (every parameter trainable),
``lora`` (all linear layers, r=16), ``lora_half`` (the same on the top 8 layers only, so 8
layers are frozen), ``qlora`` (bitsandbytes 4-bit nf4 base + LoRA on all linear layers).

Two parts, run where each belongs:

``python -m benchmarks strategies-gpu --case predict``  (any machine, CPU only)
    The engine's saved-activation probe (what downstream CPU-only CI measures) on the same
    16-layer model with 16 tokens, scaled to 4096 tokens (saved activations grow linearly in
    tokens: flash attention saves O(T)), plus the gradient bytes of the trainable parameters.
    One row per setting (the committed one is ``results/cpu-prediction.json``, which the GPU cases read).

``python -m benchmarks strategies-gpu --case full --case lora --case lora_half --case qlora``  (on the GPU)
    For each setting and strategy: a fresh copy of the model with the strategy applied, one
    two warm-up steps, then eight timed steps; the CUDA allocator peak of a step above what was
    allocated before it (the weights), the fastest step time (and the median), and the ratio to no
    checkpointing, and the floor row. Merges the CPU prediction of ``results/cpu-prediction.json``.

``python -m benchmarks.suites.strategies_gpu chart RESULT.json [MORE.json ...]``  draws the PNG and prints the table of docs/gpu.md
(from a historic result or an envelope).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import common
from benchmarks.case import Case, Emit

RESULTS = Path(__file__).resolve().parents[1] / "results"
BUILTIN = common.builtin_strategies()
ABOUT = "peak memory and step time of every built-in strategy on a ~1.1B Llama, beside the CPU prediction"
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4,
             vocab_size=32000, max_position_embeddings=4096, attention_dropout=0.0)
LAYERS, BATCH, SEQUENCE = 16, 2, 2048
SETTINGS = ("full", "lora", "lora_half", "qlora")
GIB = 2 ** 30
CASES = {"predict": Case("the engine's CPU probe at 16 tokens, scaled to 2 x 2048: predicted reductions per setting",
                         {"settings": list(SETTINGS)}),
         **{setting: Case(f"{setting}: each built-in strategy's step peak above weights and step time, and the floor",
                          {"setting": setting}, needs="cuda") for setting in SETTINGS}}


def llama(layers: int, device: str, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPE, num_hidden_layers=layers)
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model


def lora_config(layers: int | None = None) -> Any:
    """r=16 on all linear layers; with ``layers``, only on the top half of them."""
    from peft import LoraConfig

    top_half = None if layers is None else list(range(layers // 2, layers))
    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # all but lm_head
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=linear, task_type="CAUSAL_LM",
                      layers_to_transform=top_half)


def build(setting: str, layers: int, device: str, dtype: torch.dtype = torch.bfloat16) -> Any:
    """The model for ``setting``, on ``device``."""
    from peft import get_peft_model

    if setting == "full":
        return llama(layers, device, dtype)
    if setting == "lora":
        return get_peft_model(llama(layers, device, dtype), lora_config())
    if setting == "lora_half":
        return get_peft_model(llama(layers, device, dtype), lora_config(layers))
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as folder:
        llama(layers, "cpu", dtype).save_pretrained(folder)
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        model = LlamaForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=dtype,
                                                 device_map={"": device}, attn_implementation="sdpa")
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, lora_config())


def token_batch(batch: int, sequence: int, device: str) -> dict[str, Any]:
    ids = torch.randint(0, SHAPE["vocab_size"], (batch, sequence), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    return {"input_ids": ids, "labels": ids, "use_cache": False}


def trainable_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- CPU prediction


def predict(settings: tuple[str, ...], tokens: int = 16) -> dict[str, Any]:
    """Saved-activation peaks from the engine's CPU probe on the same 16-layer model with few
    tokens, scaled to the GPU's token count (saved activations grow linearly in tokens: flash
    attention saves O(T)), plus the gradient bytes of the trainable parameters.

    Depth is not extrapolated: segment sizes (``sequential``) and frozen-layer patterns depend
    on it, so the model is run at its real depth."""
    import pytest_gradckpt as gc

    prediction: dict[str, Any] = {"tokens": tokens, "layers": LAYERS, "settings": {}}
    for setting in settings:
        model = build(setting, LAYERS, "cpu")
        report = gc.check(model, token_batch(1, tokens, "cpu"), strategies=list(BUILTIN), timeout=None)
        print(f"predict {setting}:", report.table(), sep="\n", flush=True)
        peaks = {"none": report.baseline["train"]["activation_bytes"]}
        peaks.update({r.strategy: r.metrics["activation_bytes"] for r in report.results
                      if "activation_bytes" in r.metrics})
        gradients = trainable_bytes(model)
        scale = BATCH * SEQUENCE / tokens
        scaled = {k: v * scale for k, v in peaks.items()}
        base = scaled["none"] + gradients
        prediction["settings"][setting] = {
            "gradient_bytes": gradients,
            "activation_bytes": {k: round(v) for k, v in scaled.items()},
            "predicted_reduction": {k: round(1 - (v + gradients) / base, 4) for k, v in scaled.items()
                                    if k != "none"},
            "cpu_verdicts": {r.strategy: r.outcome for r in report.results},
        }
        del model, report
    return prediction


# --------------------------------------------------------------------------- GPU measurement


def _step(model: Any, inputs: dict[str, Any]) -> None:
    model(**inputs).loss.backward()
    for param in model.parameters():
        param.grad = None


def measure(setting: str, strategies: list[str], steps: int = 8) -> list[dict[str, Any]]:
    """Peak above weights and step time for each strategy (``none`` first)."""
    device = "cuda"
    base_model = build(setting, LAYERS, device)
    inputs = token_batch(BATCH, SEQUENCE, device)
    rows = []
    for name in ["none", *strategies]:
        model = copy.deepcopy(base_model)
        model.train()
        info, counter, layer_names = common.instrumented(model)
        row: dict[str, Any] = {"setting": setting, "strategy": name}
        try:
            if name != "none":
                reason = common.switch_on(info, name)
                if reason:
                    raise RuntimeError(f"skipped: {reason}")
            for _ in range(2):  # warm-up: kernels chosen, allocator settled
                _step(model, inputs)
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(steps):
                torch.cuda.synchronize()
                started = time.perf_counter()
                _step(model, inputs)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
            row.update(peak_gib=round((torch.cuda.max_memory_allocated() - before) / GIB, 3),
                       # the fastest of the timed steps: the others only add noise (clocks, launches)
                       step_seconds=round(min(times), 4), step_seconds_median=round(statistics.median(times), 4),
                       recomputed_layers=sum(1 for n in layer_names if counter.counts[n] > 2 + steps))
        except Exception as error:  # noqa: BLE001 - a failing strategy is a row, not a crash
            row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model, info
        torch.cuda.empty_cache()
    del base_model
    torch.cuda.empty_cache()
    none = rows[0]
    for row in rows:
        if "peak_gib" in row and "peak_gib" in none:
            row["memory_reduction"] = round(1 - row["peak_gib"] / none["peak_gib"], 4)
            row["step_time_ratio"] = round(row["step_seconds"] / none["step_seconds"], 3)
    return rows


def measure_floor(setting: str, steps: int = 3) -> dict[str, Any]:
    """The least a step can hold with every layer input off the device: the same setting with
    ONE layer, checkpointed (logits path + one layer's recompute), plus the gradients of the
    other layers' trainable weights, which exist whatever the strategy."""
    model = build(setting, 1, "cuda")
    one_layer_gradients = trainable_bytes(model.get_submodule(common.unit_names(model)[0]))
    common.apply_strategy(model, "non_reentrant")
    inputs = token_batch(BATCH, SEQUENCE, "cuda")
    for _ in range(2):
        _step(model, inputs)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        _step(model, inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before + (LAYERS - 1) * one_layer_gradients
    del model
    torch.cuda.empty_cache()
    row = {"setting": setting, "strategy": "floor", "peak_gib": round(peak / GIB, 3)}
    print(json.dumps(row), flush=True)
    return row


def run(params: dict[str, Any], repeats: int, emit: Emit) -> None:
    if "settings" in params:
        prediction = predict(tuple(params["settings"]))
        for setting, found in prediction["settings"].items():
            emit({"setting": setting, "tokens": prediction["tokens"], "layers": prediction["layers"], **found})
        return
    if not torch.cuda.is_available():
        raise SystemExit("strategies-gpu: the measuring cases need a CUDA GPU (the predict case runs anywhere)")
    setting = params["setting"]
    prediction_path = RESULTS / "cpu-prediction.json"
    prediction = json.loads(prediction_path.read_text()) if prediction_path.exists() else {"settings": {}}
    predicted = prediction["settings"].get(setting, {}).get("predicted_reduction", {})
    rows = []
    for row in measure(setting, list(BUILTIN)):
        row["cpu_predicted_reduction"] = predicted.get(row["strategy"])
        rows.append(row)
        emit(row)
    floor = measure_floor(setting)
    offload = next((r for r in rows if r["strategy"] == "offload"), {})
    if "peak_gib" in offload:
        floor["offload_above_floor"] = round(offload["peak_gib"] / floor["peak_gib"] - 1, 4)
    emit(floor)


# --------------------------------------------------------------------------- chart and table


def chart(path: Path, *more: Path) -> None:
    """The chart (PNG next to ``path``) and table of one historic result, or of the envelopes of several cases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    document = json.loads(path.read_text())
    envelope = "machine" in document
    for other in more:
        document["rows"] += json.loads(other.read_text())["rows"]
    if envelope:  # the historic header from the envelope's machine and versions
        document.update(device=document["machine"]["device"], torch=document["versions"].get("torch"),
                        transformers=document["versions"].get("transformers"))
    prediction_path = RESULTS / "cpu-prediction.json"
    prediction: dict[str, Any] = {}
    if prediction_path.exists():  # the prediction may be made after the GPU run: merge it in
        prediction = json.loads(prediction_path.read_text())["settings"]
        for row in document["rows"]:
            row["cpu_predicted_reduction"] = prediction.get(row["setting"], {}).get(
                "predicted_reduction", {}).get(row["strategy"])
        if not envelope:
            path.write_text(json.dumps(document, indent=1) + "\n")
    rows = [r for r in document["rows"] if r["strategy"] not in ("none", "floor") and "memory_reduction" in r]
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    strategies = [s for s in BUILTIN if any(r["strategy"] == s for r in rows)]
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(settings)
    for i, setting in enumerate(settings):
        by = {r["strategy"]: r for r in rows if r["setting"] == setting}
        xs = [j + i * width for j in range(len(strategies))]
        axes[0].bar(xs, [100 * by[s]["memory_reduction"] if s in by else 0 for s in strategies], width, label=setting)
        axes[1].bar(xs, [by[s]["step_time_ratio"] if s in by else 0 for s in strategies], width, label=setting)
    for axis, title in zip(axes, ("peak memory above weights: reduction (%)", "step time vs no checkpointing (x)"), strict=True):
        axis.set_xticks([j + width * (len(settings) - 1) / 2 for j in range(len(strategies))])
        axis.set_xticklabels(strategies, rotation=30, ha="right")
        axis.set_title(title)
        axis.set_ylim(0, axis.get_ylim()[1] * 1.18)  # room for the legend above the bars
        axis.legend(loc="upper center", ncols=len(settings), fontsize=8)
    figure.suptitle(f"{document['device']}, torch {document['torch']}, transformers {document['transformers']}")
    figure.tight_layout()
    png = path.with_suffix(".png")
    figure.savefig(png, dpi=110)
    print(f"wrote {png}")
    print("| setting | strategy | peak above weights (GiB) | memory reduction | step time | CPU-predicted reduction |")
    print("| --- | --- | --- | --- | --- | --- |")
    gradient_bytes = {k: v.get("gradient_bytes") for k, v in prediction.items()} if prediction_path.exists() else {}
    for row in document["rows"]:
        if row["strategy"] == "floor":
            offload = next(r for r in document["rows"] if r["setting"] == row["setting"] and r["strategy"] == "offload")
            if row["setting"] == "full" and gradient_bytes.get("full"):
                # Every weight's gradient exists at the end of backward whatever the strategy: a hard
                # lower bound. The 1-layer measurement plus the other layers' gradients over-states the
                # floor here, since those gradients do not all coexist with the logits' transients.
                bound = gradient_bytes["full"] / GIB
                print(f"| full | floor: the gradients alone (lower bound) | {bound:.2f} | | | offload is "
                      f"{100 * (offload['peak_gib'] / bound - 1):+.0f}% above it |")
                continue
            print(f"| {row['setting']} | floor: the same with 1 layer, checkpointed | {row['peak_gib']:.2f} | | | "
                  f"offload is {100 * row.get('offload_above_floor', float('nan')):+.0f}% above it |")
            continue
        if "peak_gib" not in row:
            print(f"| {row['setting']} | {row['strategy']} | {row.get('error', '')[:60]} | | | |")
            continue
        predicted = row.get("cpu_predicted_reduction")
        print(f"| {row['setting']} | {row['strategy']} | {row['peak_gib']:.2f} | {-100 * row['memory_reduction']:.0f}% | "
              f"{row['step_time_ratio']:.2f}x | {'' if predicted is None else f'{-100 * predicted:.0f}%'} |")


def main() -> int:
    parser = argparse.ArgumentParser(description="draw the chart and print the table of docs/gpu.md")
    parser.add_argument("command", choices=["chart"])
    parser.add_argument("paths", type=Path, nargs="+")
    args = parser.parse_args()
    chart(*args.paths)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
