"""Unsloth's ``use_gradient_checkpointing="unsloth"`` on CUDA: the engine's verdict for the built-in
``unsloth_gc`` and plain-transformers ground truth, as JSON.

Ground truth, written out without the engine: gradients of one plain step (``loss.backward()``)
with Unsloth's checkpointing switched on the way its trainer does it
(``patch_unsloth_smart_gradient_checkpointing`` then ``gradient_checkpointing_enable``) against
the same step without checkpointing. A second ground truth runs in a fresh process that does
``import unsloth`` (the whole package, as a user would) and Unsloth's own
``apply_unsloth_gradient_checkpointing("unsloth", max_seq_length, dtype)`` and
``prepare_model_for_training(use_gradient_checkpointing="unsloth")`` against
``prepare_model_for_training(use_gradient_checkpointing=False)``; where ``import unsloth`` fails,
its error is recorded.

Run on the GPU machine: ``python -m tests.gpu.campaigns.unsloth_gpu OUT.json`` with ``unsloth_zoo``
importable (and ``unsloth`` for the second ground truth).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from typing import Any

import torch

#: hidden 512 x sequence 1024 x batch 4 in bf16 is 4 MiB per layer input: over Unsloth's 2 MiB offload minimum
SIZES = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=256, max_position_embeddings=1024, attention_dropout=0.0)
BATCH, LENGTH = 4, 1024


def build(name: str) -> tuple[Any, dict[str, Any]]:
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    dtype = torch.bfloat16 if "bf16" in name else torch.float32
    model: Any = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SIZES)).to(dtype)
    if "lora" in name:
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, init_lora_weights=False,
                                                 target_modules=["q_proj", "v_proj", "gate_proj"]))
    ids = torch.randint(0, SIZES["vocab_size"], (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))
    return model.cuda(), {"input_ids": ids.cuda(), "labels": ids.cuda(), "use_cache": False}


def step(model: Any, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    model.train()
    torch.manual_seed(0)
    torch.cuda.manual_seed_all(0)
    model(**inputs).loss.backward()
    return {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def distance(got: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> dict[str, Any]:
    diffs = {n: (got[n] - truth[n]).abs().max().item() for n in truth if n in got}
    worst = max(diffs, key=lambda n: diffs[n]) if diffs else None
    rel = (max((got[n] - truth[n]).norm().item() / max(truth[n].norm().item(), 1e-30) for n in diffs)
           if diffs else None)
    return {"gradients": len(got), "baseline_gradients": len(truth), "missing": sorted(set(truth) - set(got)),
            "max_abs_diff": diffs[worst] if worst else None, "worst_parameter": worst, "max_rel_norm_diff": rel,
            "bitwise_equal": all(torch.equal(got[n], truth[n]) for n in truth if n in got)}


def plain_ground_truth(model: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """Unsloth's switch as its trainer calls it (patch, then the model's own enable), one plain step."""
    from pytest_gradckpt.strategies.unsloth import checkpointing_module

    zoo = checkpointing_module()
    truth = step(copy.deepcopy(model), inputs)
    checkpointed = copy.deepcopy(model)
    base = checkpointed.get_base_model() if hasattr(checkpointed, "get_base_model") else checkpointed
    dtype = next(p.dtype for p in base.parameters())
    zoo.patch_unsloth_smart_gradient_checkpointing(dtype=dtype)
    try:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        generation = zoo.OFFLOAD_GENERATION
        torch.cuda.reset_peak_memory_stats()
        got = step(checkpointed, inputs)
        found = distance(got, truth)
        found["offloaded_forwards"] = zoo.OFFLOAD_GENERATION - generation  # bumped at each forward's first offload
        found["layer_function"] = getattr(getattr(base.model.layers[0], "_gradient_checkpointing_func", None),
                                          "func", None).__name__
    finally:
        zoo.unpatch_unsloth_smart_gradient_checkpointing()
    return found


FULL_PACKAGE = r'''
import json, sys, copy, torch
sys.path.insert(0, sys.argv[2])
out = {}
try:
    import unsloth
    out["unsloth"] = unsloth.__version__
except BaseException as error:
    import traceback
    out["import_unsloth_error"] = f"{type(error).__name__}: {error}"[:2000]
    out["traceback_tail"] = traceback.format_exc()[-3000:]
    print(json.dumps(out)); raise SystemExit(0)
import unsloth_zoo
from unsloth_zoo.training_utils import prepare_model_for_training
from unsloth.models._utils import apply_unsloth_gradient_checkpointing
from tests.gpu.campaigns import unsloth_gpu as bench
for name in sys.argv[1].split(","):
    model, inputs = bench.build(name)
    lora = "lora" in name
    def prepared(mode):
        m = copy.deepcopy(model)
        dtype = next(p.dtype for p in m.parameters())
        mode = apply_unsloth_gradient_checkpointing(mode, bench.LENGTH, dtype)
        return prepare_model_for_training(m, use_gradient_checkpointing=mode, use_reentrant=True,
                                          full_finetuning=not lora, float32_mixed_precision=False), mode
    off, _ = prepared(False)
    truth = bench.step(off, inputs)
    on, mode = prepared("unsloth")
    layer = (on.get_base_model() if lora else on).model.layers[0]
    func = getattr(layer, "_gradient_checkpointing_func", None)
    got = bench.step(on, inputs)
    out[name] = bench.distance(got, truth) | {"mode": str(mode),
        "layer_function": getattr(getattr(func, "func", func), "__name__", repr(func)),
        "checkpoint_function_class": torch.utils.checkpoint.CheckpointFunction.__name__}
print(json.dumps(out, default=str))
'''


def full_package_ground_truth(names: list[str]) -> dict[str, Any]:
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    done = subprocess.run([sys.executable, "-c", FULL_PACKAGE, ",".join(names), root],
                          capture_output=True, text=True, timeout=400)
    last = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if last:
        return json.loads(last[-1])
    return {"returncode": done.returncode, "stdout_tail": done.stdout[-2000:], "stderr_tail": done.stderr[-4000:]}


def main(path: str) -> None:
    import transformers

    import pytest_gradckpt as gc
    from pytest_gradckpt.strategies import unsloth

    results: dict[str, Any] = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                            "device": torch.cuda.get_device_name(0)},
                               "sizes": SIZES | {"batch": BATCH, "length": LENGTH}, "models": {}}
    try:
        results["versions"]["unsloth_zoo_module"] = unsloth.checkpointing_module().__file__
    except ImportError as error:
        results["unsloth_zoo_import_error"] = str(error)
    names = ["llama_fp32", "llama_bf16", "llama_lora_fp32", "llama_lora_bf16"]
    for name in names:
        model, inputs = build(name)
        started = time.perf_counter()
        report = gc.check(model, inputs, strategies=[*unsloth.STRATEGIES, "non_reentrant"], device="cuda")
        entry: dict[str, Any] = {"check_seconds": round(time.perf_counter() - started, 2), "verdicts": [
            {k: r.to_dict()[k] for k in ("strategy", "scenario", "outcome", "message")}
            | {k: r.metrics.get(k) for k in ("recomputed_units", "saved_elsewhere_units", "max_grad_diff",
                                             "activation_reduction", "cuda_reduction")}
            for r in report.results]}
        print(name, report.table(), flush=True)
        try:
            entry["ground_truth_plain"] = plain_ground_truth(model, inputs)
        except Exception as error:  # noqa: BLE001 - recorded
            entry["ground_truth_plain"] = {"error": f"{type(error).__name__}: {error}"}
        results["models"][name] = entry
        del model
        torch.cuda.empty_cache()
    results["ground_truth_full_package"] = full_package_ground_truth(names)
    with open(path, "w") as out:
        json.dump(results, out, indent=1, default=str)
    print(json.dumps(results["ground_truth_full_package"], indent=1, default=str)[:4000])


if __name__ == "__main__":
    main(sys.argv[1])
