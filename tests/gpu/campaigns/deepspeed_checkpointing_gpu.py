"""DeepSpeed's own activation checkpointing (``deepspeed.checkpointing``) as strategies, on one GPU, as JSON.

    torchrun --nproc-per-node 1 -m tests.gpu.campaigns.deepspeed_checkpointing_gpu OUT.json

For a Llama (4 layers of 512, attention dropout 0.1, bf16, 2 x 1024 tokens) and its LoRA: the verdict
of every strategy in ``pytest_gradckpt.strategies.deepspeed.STRATEGIES`` (``gc.check``),
and ground truth without the engine: plain steps with DeepSpeed's function wrapped around each decoder
layer by hand (after ``configure`` with the strategy's settings) against the step without it.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from typing import Any

import torch

SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
             vocab_size=32000, max_position_embeddings=1024, attention_dropout=0.1)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU only for a dry run of this script
LENGTH = 1024 if DEVICE == "cuda" else 32


def _model(lora: bool) -> Any:
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE)).to(DEVICE, torch.bfloat16)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1))
    return model


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, SHAPE["vocab_size"], (2, LENGTH), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    return {"input_ids": ids, "labels": ids}


def _layers(model: Any) -> list:
    inner = model.base_model.model if hasattr(model, "peft_config") else model
    return list(inner.model.layers)


def plain(lora: bool, strategy: Any | None) -> dict[str, Any]:
    """Gradients of one plain step; with DeepSpeed's function (configured as ``strategy``) around each layer."""
    import deepspeed

    model = _model(lora)
    model.train()
    if strategy is not None:
        deepspeed.checkpointing.configure(None, num_checkpoints=len(_layers(model)), **strategy.settings)
        function = (deepspeed.checkpointing.non_reentrant_checkpoint if strategy.non_reentrant
                    else deepspeed.checkpointing.checkpoint)
        for layer in _layers(model):
            layer.forward = lambda *a, _f=layer.forward, **k: function(functools.partial(_f, **k), *a)
    torch.manual_seed(2)
    try:
        model(**_batch(), use_cache=False).loss.backward()
    except RuntimeError as error:
        return {"error": f"{type(error).__name__}: {error}"}
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def main(path: str) -> None:
    import deepspeed

    import pytest_gradckpt as gc
    from pytest_gradckpt.strategies.deepspeed import STRATEGIES

    deepspeed.init_distributed()
    rows: list[dict[str, Any]] = []
    report = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", shape=SHAPE,
                  batch=f"2 x {LENGTH} tokens", dtype="bf16",
                  versions=dict(torch=torch.__version__, deepspeed=deepspeed.__version__), rows=rows)
    for lora in (False, True):
        off = plain(lora, None)
        start = time.perf_counter()
        results = gc.check(_model(lora), _batch(), strategies=STRATEGIES).results
        seconds = time.perf_counter() - start
        for strategy, result in zip(STRATEGIES, results, strict=True):
            truth: dict[str, Any] = {}
            if result.outcome != "skipped":
                on = plain(lora, strategy)
                if "error" in on:
                    truth = on
                else:
                    diffs = {n: float((on[n] - off[n]).abs().max()) for n in off if n in on}
                    truth = dict(lost=len(set(off) - set(on)), max_abs_diff=max(diffs.values()),
                                 bitwise_equal=all(torch.equal(on[n], off[n]) for n in diffs))
            metrics = {k: v for k, v in result.metrics.items() if k in (
                "max_grad_diff", "activation_reduction", "cuda_reduction", "recomputed_layers", "baseline_noise")}
            rows.append(dict(model="Llama LoRA" if lora else "Llama", strategy=result.strategy, outcome=result.outcome,
                             message=result.message, metrics=metrics, ground_truth=truth, check_s=round(seconds, 2)))
            print(rows[-1], flush=True)
            with open(path, "w") as handle:
                json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
