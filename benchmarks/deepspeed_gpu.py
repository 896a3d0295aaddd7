"""check_trainer on a transformers Trainer with a DeepSpeed ZeRO-3 config, one GPU, the 1.1B Llama shape, as JSON.

Run as a user launches DeepSpeed training:

    torchrun --nproc-per-node 1 benchmarks/deepspeed_gpu.py OUT.json [--tiny] [--repeats 3] [--budget SECONDS]

Rows: (1) ground truth without the engine: one plain DeepSpeed ZeRO-3 step (``deepspeed.initialize``
with a torch AdamW, ``engine.backward``, no ``engine.step``) with transformers' checkpointing
(``use_reentrant=False``) against the same step without it, gradients read with
``deepspeed.utils.safe_get_full_grad``; the engine build and the step timed apart. (2)
``gc.check_trainer(trainer)`` on ``Trainer(args=TrainingArguments(deepspeed=ZERO3, bf16=True,
activation_checkpointing=True, ...))``, repeated, with its time against the plain step's. The file
is rewritten after every row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

import torch

#: the 1.1B Llama shape (TinyLlama): hidden 2048, 16 layers, intermediate 5632, 16 heads, 4 KV heads
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, max_position_embeddings=64)
ZERO3 = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto",
         "gradient_accumulation_steps": "auto", "zero_allow_untested_optimizer": True}
CHECKPOINTING = {"use_reentrant": False}


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=1e9, help="start no new repeat past this many seconds")
    options = parser.parse_args()
    start = time.perf_counter()
    import deepspeed
    import transformers

    shape = TINY if options.tiny else LLAMA_1B
    length = 32 if options.tiny else 2048
    rows = _rows(shape, 2, length)
    report: dict[str, Any] = dict(
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        world_size=int(os.environ.get("WORLD_SIZE", 1)), launcher="torchrun" if "TORCHELASTIC_RUN_ID" in os.environ
        else "python", versions=dict(torch=torch.__version__, transformers=transformers.__version__,
                                     deepspeed=deepspeed.__version__),
        shape=shape, batch=f"{len(rows)} x {length} tokens", dtype="bf16", zero_config=ZERO3,
        activation_checkpointing_kwargs=CHECKPOINTING, checks=[])

    def write() -> None:
        report["elapsed_s"] = round(time.perf_counter() - start, 1)
        with open(options.out, "w") as handle:
            json.dump(report, handle, indent=1)

    deepspeed.init_distributed()
    report["ground_truth"] = ground_truth(shape, rows)
    write()
    print("ground truth", report["ground_truth"], flush=True)
    with tempfile.TemporaryDirectory() as out:
        for _ in range(options.repeats):
            if time.perf_counter() - start > options.budget:
                report["stopped"] = f"budget of {options.budget} s reached"
                break
            report["checks"].append(check_once(shape, rows, out))
            write()
            print("check", report["checks"][-1], flush=True)
    outcomes = {c["outcome"] for c in report["checks"]}
    report["identical_outcomes"] = len(outcomes) == 1
    report["check_s_over_plain_step_s"] = [round(c["seconds"] / report["ground_truth"]["on"]["step_s"], 1)
                                           for c in report["checks"]]
    write()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
