"""LLaMA-Factory's checkpointing on CUDA (its use_unsloth_gc offloading function needs a GPU):
the engine's verdicts, and plain-transformers ground truth (gradients after LLaMA-Factory's own
``prepare_model_for_training`` against the step without checkpointing), as JSON.

Run on the GPU machine: ``python -m tests.gpu.campaigns.llamafactory_gpu OUT.json`` with LLaMA-Factory's
package importable (only its checkpointing module is imported).
"""

from __future__ import annotations

import copy
import json
import sys
import types

import torch
import transformers

import pytest_gradckpt as gc
from pytest_gradckpt.strategies import llamafactory
from pytest_gradckpt.zoo.peft_models import llama_inputs, llama_lora, tiny_llama_config


def plain_gradients(model, inputs, unsloth_gc):
    """Ground truth: LLaMA-Factory's preparation (or none), then one plain step on CUDA."""
    model = copy.deepcopy(model).train()
    if unsloth_gc is not None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        llamafactory.checkpointing_module().prepare_model_for_training(base, types.SimpleNamespace(
            upcast_layernorm=False, upcast_lmhead_output=False, disable_gradient_checkpointing=False,
            use_unsloth_gc=unsloth_gc, use_reentrant_gc=True))
    torch.manual_seed(0)
    torch.cuda.manual_seed_all(0)
    model(**inputs).loss.backward()
    return {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def ground_truth(model, inputs):
    truth = plain_gradients(model, inputs, None)
    found = {}
    for unsloth_gc in (False, True):
        got = plain_gradients(model, inputs, unsloth_gc)
        found["use_unsloth_gc" if unsloth_gc else "standard"] = {
            "gradients": len(got), "baseline_gradients": len(truth),
            "max_abs_diff": max(((got[n] - truth[n]).abs().max().item() for n in truth if n in got), default=None)}
    return found


def main(path: str) -> None:
    torch.use_deterministic_algorithms(True)
    results = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "device": torch.cuda.get_device_name(0)}, "models": {}}
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(tiny_llama_config())
    builds = {"llama": (llama, llama_inputs()), "llama_lora": llama_lora()}
    for name, (model, inputs) in builds.items():
        model = model.cuda()
        inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()}
        report = gc.check(model, inputs, strategies=[*llamafactory.STRATEGIES, "non_reentrant"], device="cuda")
        results["models"][name] = {
            "verdicts": [{k: r.to_dict()[k] for k in ("strategy", "scenario", "outcome", "message")}
                         | {"recomputed_units": r.metrics.get("recomputed_units"),
                            "saved_elsewhere_units": r.metrics.get("saved_elsewhere_units"),
                            "max_grad_diff": r.metrics.get("max_grad_diff"),
                            "activation_reduction": r.metrics.get("activation_reduction"),
                            "cuda_reduction": r.metrics.get("cuda_reduction")} for r in report.results],
            "ground_truth": ground_truth(model, inputs)}
        print(report.table(), flush=True)
    with open(path, "w") as out:
        json.dump(results, out, indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1])
