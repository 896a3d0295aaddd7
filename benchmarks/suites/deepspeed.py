"""check_trainer on a transformers Trainer with a DeepSpeed ZeRO-3 config, one GPU, the 1.1B Llama shape, as JSON.

Run as a user launches DeepSpeed training:

    torchrun --nproc-per-node 1 -m benchmarks deepspeed --case 1b-zero3 [--repeats 3] [--set budget=SECONDS]
    torchrun --nproc-per-node 1 -m benchmarks deepspeed --case tiny      # a two-layer Llama: tries the suite

Rows: (1) ground truth without the engine: one plain DeepSpeed ZeRO-3 step (``deepspeed.initialize``
with a torch AdamW, ``engine.backward``, no ``engine.step``) with transformers' checkpointing
(``use_reentrant=False``) against the same step without it, gradients read with
``deepspeed.utils.safe_get_full_grad``; the engine build and the step timed apart. (2)
``gc.check_trainer(trainer)`` on ``Trainer(args=TrainingArguments(deepspeed=ZERO3, bf16=True,
activation_checkpointing=True, ...))``, repeated, with its time against the plain step's. The file
is rewritten after every row, so a run cut short keeps what it measured. Rows, by ``kind``: ``ground_truth``,
``check`` (each repeat), ``summary`` (``identical_outcomes``, ``check_s_over_plain_step_s``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import torch

from benchmarks.case import Case, Emit

#: the 1.1B Llama shape (TinyLlama): hidden 2048, 16 layers, intermediate 5632, 16 heads, 4 KV heads
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=64)
ZERO3 = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
         "gradient_accumulation_steps": "auto", "zero_allow_untested_optimizer": True}
CHECKPOINTING = {"use_reentrant": False}
ABOUT = "check_trainer on a transformers Trainer with DeepSpeed ZeRO-3 (torchrun), against a plain DeepSpeed step"
CASES = {"1b-zero3": Case("1.1B Llama, bf16, 2 x 2048 tokens, ZeRO-3 on one GPU", {"tiny": False, "budget": 1e9},
                          needs="cuda", repeats=3),
         "tiny": Case("a two-layer Llama, 2 x 32 tokens: tries the suite", {"tiny": True, "budget": 1e9})}


def _device() -> torch.device:
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")


def _model(shape: dict) -> Any:
    import transformers

    torch.manual_seed(0)
    with _device():
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).to(torch.bfloat16)


def _rows(shape: dict, batch: int, length: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(batch):
        ids = torch.randint(0, shape["vocab_size"], (length,), generator=generator)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def plain_step(shape: dict, rows: list, checkpointing: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One plain DeepSpeed ZeRO-3 step (no engine.step); returns its timings and gathered gradients."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    model = _model(shape)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING)
    config = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True,
              "train_micro_batch_size_per_gpu": len(rows), "gradient_accumulation_steps": 1}
    _sync()
    start = time.perf_counter()
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-5),
                                      config=config)
    _sync()
    built = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    batch = {k: torch.stack([r[k] for r in rows]).to(engine.device) for k in rows[0]}
    torch.manual_seed(1)
    engine.train()
    loss = engine(**batch).loss
    engine.set_gradient_accumulation_boundary(is_boundary=True)
    engine.backward(loss)
    _sync()
    stepped = time.perf_counter()
    grads = {n: safe_get_full_grad(p).detach().float().clone() for n, p in model.named_parameters()}
    row = dict(checkpointing=checkpointing, engine_build_s=round(built - start, 3), step_s=round(stepped - built, 3),
               loss=float(loss), cuda_peak_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None)
    engine.destroy()
    del engine, model
    return row, grads


def ground_truth(shape: dict, rows: list) -> dict[str, Any]:
    off_row, off = plain_step(shape, rows, False)
    on_row, on = plain_step(shape, rows, True)
    diffs = {n: float((on[n] - off[n]).abs().max()) for n in off}
    worst = max(diffs, key=lambda n: diffs[n])
    return dict(off=off_row, on=on_row, gradients=len(off), max_abs_diff=diffs[worst], worst=worst,
                bitwise_equal=all(torch.equal(on[n], off[n]) for n in off),
                max_abs_grad=max(float(g.abs().max()) for g in off.values()))


def check_once(shape: dict, rows: list, out: str) -> dict[str, Any]:
    from transformers import Trainer, TrainingArguments

    import pytest_gradckpt as gc

    # transformers 5.2x names the switch activation_checkpointing; earlier releases gradient_checkpointing
    switch = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    args = TrainingArguments(out, deepspeed=json.loads(json.dumps(ZERO3)), bf16=True, **{switch: True},
                             **{f"{switch}_kwargs": dict(CHECKPOINTING)}, per_device_train_batch_size=len(rows),
                             gradient_accumulation_steps=1, max_steps=1, report_to=[], save_strategy="no", seed=0,
                             use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=_model(shape), args=args, train_dataset=rows)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    start = time.perf_counter()
    result = gc.check_trainer(trainer).results[0]
    seconds = time.perf_counter() - start
    untouched = all(torch.equal(before[n], p.detach()) and p.grad is None for n, p in trainer.model.named_parameters())
    return dict(outcome=result.outcome, message=result.message, strategy=result.strategy, seconds=round(seconds, 2),
                trainer_untouched=untouched, metrics={k: v for k, v in result.metrics.items() if k != "setting"})


def run(params: dict[str, Any], repeats: int, emit: Emit) -> None:
    start = time.perf_counter()
    import deepspeed

    shape = TINY if params["tiny"] else LLAMA_1B
    length = 32 if params["tiny"] else 2048
    rows = _rows(shape, 2, length)
    setting = dict(world_size=int(os.environ.get("WORLD_SIZE", 1)),
                   launcher="torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "python", shape=shape,
                   batch=f"{len(rows)} x {length} tokens", dtype="bf16", zero_config=ZERO3,
                   activation_checkpointing_kwargs=CHECKPOINTING)
    deepspeed.init_distributed()
    truth = ground_truth(shape, rows)
    emit({"kind": "ground_truth", **setting, **truth})
    print("ground truth", truth, flush=True)
    checks = []
    stopped = None
    with tempfile.TemporaryDirectory() as out:
        for _ in range(repeats):
            if time.perf_counter() - start > params["budget"]:
                stopped = f"budget of {params['budget']} s reached"
                break
            checks.append(check_once(shape, rows, out))
            emit({"kind": "check", **checks[-1]})
            print("check", checks[-1], flush=True)
    emit({"kind": "summary", "identical_outcomes": len({c["outcome"] for c in checks}) == 1, "stopped": stopped,
          "check_s_over_plain_step_s": [round(c["seconds"] / truth["on"]["step_s"], 1) for c in checks],
          "elapsed_s": round(time.perf_counter() - start, 1)})
