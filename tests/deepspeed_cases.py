"""DeepSpeed ZeRO cases on CPU ranks (gloo): plain DeepSpeed's ground truth and the check's verdicts.

Run by tests/test_deepspeed.py under ``torchrun --nproc-per-node N`` (any N):

    torchrun --nproc-per-node 2 tests/deepspeed_cases.py OUT.json z3-full-nonreentrant z2-lora-reentrant-dropout-norng ...

A case name is ``z<stage>-<full|lora>-<reentrant|nonreentrant>`` plus optional flags: ``-dropout``
(attention dropout 0.1, LoRA dropout 0.1), ``-norng`` (``preserve_rng_state=False``, the planted
hazard), ``-fromconfig`` (the model built by ``from_config`` after the ZeRO-3 ``TrainingArguments``,
so ``zero.Init`` partitions it), ``-engine`` (the raw engine adapter instead of the ``Trainer``),
``-accelerate`` (accelerate's DeepSpeed plugin: run these in a launch of their own, since accelerate's
state is one per process).

Ground truth is a few lines of plain DeepSpeed with no part of pytest_gradckpt: the same seeded
model, ``deepspeed.initialize`` with a torch AdamW, ``engine.backward`` per micro-batch (the
accumulation boundary on the last), the gradients read with ``deepspeed.utils.safe_get_full_grad``;
once with transformers' checkpointing switched on with the case's kwargs, once without. Rank 0
writes one row per case: the ground truth's largest gradient and loss differences, and every
rank's verdict.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time

import torch

VOCAB, SEQ, MICRO, ACCUMULATION = 128, 16, 2, 2


def _quiet() -> None:
    import logging

    import deepspeed.ops

    # CPU DeepSpeed JIT-compiles a shared-memory all-reduce kernel at its first init (minutes on 2 cores);
    # deepspeed.ops documents this dict as editable: gloo's all-reduce stands in.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)


def _flags(case: str) -> dict:
    parts = case.split("-")
    return dict(stage=int(parts[0][1:]), lora=parts[1] == "lora", reentrant=parts[2] == "reentrant",
                dropout="dropout" in parts, norng="norng" in parts, fromconfig="fromconfig" in parts,
                engine="engine" in parts, accelerate="accelerate" in parts)


def _llama_config(flags: dict):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=VOCAB, attention_dropout=0.1 if flags["dropout"] else 0.0)


def _model(flags: dict, from_config: bool = False):
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    torch.manual_seed(0)
    config = _llama_config(flags)
    model = AutoModelForCausalLM.from_config(config) if from_config else LlamaForCausalLM(config)
    if flags["lora"]:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.1 if flags["dropout"] else 0.0))
    return model


def _ckpt_kwargs(flags: dict) -> dict:
    kwargs = {"use_reentrant": flags["reentrant"]}
    if flags["norng"]:
        kwargs["preserve_rng_state"] = False
    return kwargs


def _ds_config(flags: dict) -> dict:
    return {"zero_optimization": {"stage": flags["stage"]}, "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": ACCUMULATION, "zero_allow_untested_optimizer": True}


def _rank_batches(rank: int) -> list[dict]:
    generator = torch.Generator().manual_seed(100 + rank)
    return [{"input_ids": (ids := torch.randint(0, VOCAB, (MICRO, SEQ), generator=generator)), "labels": ids.clone()}
            for _ in range(ACCUMULATION)]


def plain_deepspeed_step(flags: dict, checkpointing: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """One optimizer step's gradients from plain DeepSpeed (no engine.step), as a user's loop runs it."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    model = _model(flags)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_ckpt_kwargs(flags))
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-3),
                                      config=_ds_config(flags))
    engine.train()
    torch.manual_seed(1)
    total = 0.0
    batches = _rank_batches(torch.distributed.get_rank())
    for index, batch in enumerate(batches):
        loss = engine(**batch).loss
        engine.set_gradient_accumulation_boundary(is_boundary=index == len(batches) - 1)
        engine.backward(loss)
        total += float(loss)
    grads = {name: safe_get_full_grad(p).detach().float().clone() for name, p in model.named_parameters()
             if p.requires_grad}
    engine.destroy()
    return total, grads


def ground_truth(flags: dict) -> dict:
    loss_off, off = plain_deepspeed_step(flags, False)
    loss_on, on = plain_deepspeed_step(flags, True)
    diffs = {name: float((on[name] - off[name]).abs().max()) for name in off}
    worst = max(diffs, key=diffs.get)
    row = dict(loss_diff=abs(loss_on - loss_off), max_grad_diff=diffs[worst], worst=worst,
               grad_scale=max(float(g.abs().max()) for g in off.values()),
               bitwise=all(torch.equal(on[n], off[n]) for n in off) and loss_on == loss_off, gradients=len(off))
    if flags["engine"] and not flags["dropout"]:
        row["adapter_vs_plain_grad_diff"] = check_gradients_against_plain(flags, off)
    return row


def _trainer(flags: dict, out: str):
    from transformers import Trainer, TrainingArguments

    ds = {"zero_optimization": {"stage": flags["stage"]}, "train_micro_batch_size_per_gpu": "auto",
          "gradient_accumulation_steps": "auto", "zero_allow_untested_optimizer": True}
    args = TrainingArguments(out, deepspeed=ds, activation_checkpointing=True,
                             activation_checkpointing_kwargs=_ckpt_kwargs(flags), per_device_train_batch_size=MICRO,
                             gradient_accumulation_steps=ACCUMULATION, max_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", seed=0)
    model = _model(flags, from_config=flags["fromconfig"])
    generator = torch.Generator().manual_seed(7)
    data = [{"input_ids": (ids := torch.randint(0, VOCAB, (SEQ,), generator=generator)), "labels": ids.clone()}
            for _ in range(4 * MICRO * ACCUMULATION)]
    return Trainer(model=model, args=args, train_dataset=data)


def _raw_engine(flags: dict):
    import deepspeed

    from pytest_gradckpt.trainers.deepspeed import DeepSpeedEngine

    model = _model(flags)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_ckpt_kwargs(flags))
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-3),
                                      config=_ds_config(flags))
    return DeepSpeedEngine(engine, _rank_batches(torch.distributed.get_rank()))


def _trainer_state(trainer) -> str:
    accelerator = trainer.accelerator
    plugin = accelerator.state.deepspeed_plugin
    return json.dumps(dict(optimizer=repr(trainer.optimizer), scheduler=repr(trainer.lr_scheduler),
                           wrapped=trainer.model_wrapped is trainer.model, deepspeed=repr(trainer.deepspeed),
                           engine=repr(accelerator.deepspeed_engine_wrapped), models=len(accelerator._models),
                           config=plugin.hf_ds_config.config, plugin=repr(plugin.deepspeed_config)), default=repr)


def _accelerate_prepared(flags: dict):
    """accelerate with its DeepSpeed plugin, prepared as an accelerate training script prepares it."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    from pytest_gradckpt.trainers.accelerate import Prepared

    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=_ds_config(flags)))
    model = _model(flags)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_ckpt_kwargs(flags))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    rows = [{k: v[i] for k, v in batch.items()} for batch in _rank_batches(0) + _rank_batches(1) for i in range(MICRO)]
    loader = torch.utils.data.DataLoader(rows, batch_size=MICRO)  # accelerate shards it across the ranks
    engine, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return Prepared(accelerator, engine, loader)


def verdict(flags: dict, out: str) -> dict:
    import pytest_gradckpt as gc

    if flags["accelerate"]:
        subject = _accelerate_prepared(flags)
        flags = dict(flags, engine=True)  # judged like the raw engine below
    else:
        subject = _raw_engine(flags) if flags["engine"] else _trainer(flags, out)
    model = (getattr(subject, "engine", None) or subject.model).module if flags["engine"] else subject.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer_before = None if flags["engine"] else _trainer_state(subject)
    start = time.perf_counter()
    result = gc.check_trainer(subject).results[0]
    seconds = time.perf_counter() - start
    untouched = all(torch.equal(before[n], p.detach()) and p.grad is None for n, p in model.named_parameters())
    if not flags["engine"]:  # the trainer, its accelerator and its DeepSpeed config as they were; it still trains
        untouched = untouched and _trainer_state(subject) == trainer_before
        try:
            subject.train()
        except Exception as error:  # noqa: BLE001 - reported in the row
            untouched = f"Trainer.train() failed after the check: {type(error).__name__}: {error}"
    metrics = {k: result.metrics.get(k) for k in ("max_grad_diff", "worst_parameter", "recomputed_units")}
    from pytest_gradckpt.trainers import adapter_for

    return dict(outcome=result.outcome, message=result.message, strategy=result.strategy, seconds=round(seconds, 2),
                adapter=adapter_for(subject).name,
                untouched=untouched, partitioned=any(hasattr(p, "ds_id") for p in model.parameters()), **metrics)


def check_gradients_against_plain(flags: dict, plain: dict[str, torch.Tensor]) -> float:
    """The largest difference between the gradients the engine adapter's step (checkpointing off)
    gathers and plain DeepSpeed's on the same batches (no dropout: the seed does not matter)."""
    from pytest_gradckpt.trainers import adapter_for
    from pytest_gradckpt.trainers.compare import SCENARIO, TrainerStepper

    subject = _raw_engine(flags)
    adapter = adapter_for(subject)
    with adapter.preserved(subject):
        run = TrainerStepper(adapter, subject, adapter.batches(subject), seed=0, timeout=None).step(SCENARIO, None)
    assert run.error is None, run.error
    assert len(run.grads) == len(plain), (list(run.grads), list(plain))
    return max(float((mine.float() - theirs).abs().max()) for mine, theirs in zip(run.grads.values(), plain.values(),
                                                                                     strict=True))


def _plain_layers(model) -> list:
    inner = model.base_model.model if hasattr(model, "base_model") and hasattr(model, "peft_config") else model
    return list(inner.model.layers)


def deepspeed_checkpoint_truth(flags: dict, function_name: str) -> dict:
    """Plain torch steps without checkpointing and with DeepSpeed's checkpoint function wrapped around
    every decoder layer's forward by hand (no engine, no transformers switch)."""
    import deepspeed

    function = getattr(deepspeed.checkpointing, function_name)
    grads = []
    for wrapped in (False, True):
        model = _model(flags)
        model.train()
        if wrapped:
            deepspeed.checkpointing.configure(None)
            for layer in _plain_layers(model):
                layer.forward = lambda *a, _forward=layer.forward, **k: function(functools.partial(_forward, **k), *a)
        batch = _rank_batches(0)[0]
        torch.manual_seed(1)
        try:  # use_cache=False as transformers sets it under checkpointing (a cache would grow again in recompute)
            model(**batch, use_cache=False).loss.backward()
        except RuntimeError as error:  # reentrant with no input requiring grad: nothing to differentiate
            return dict(error=f"{type(error).__name__}: {error}")
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    off, on = grads
    lost = sum(bool(on[n] is None or (off[n] is not None and not on[n].any() and off[n].any())) for n in off)
    diffs = [float((on[n] - off[n]).abs().max()) for n in off if on[n] is not None and off[n] is not None]
    return dict(lost=lost, max_grad_diff=max(diffs, default=0.0), gradients=len(off))


def deepspeed_strategies(flags: dict) -> dict:
    """gc.check with DeepSpeed's checkpointing strategies, and plain DeepSpeed's ground truth."""
    import pytest_gradckpt as gc
    from pytest_gradckpt.strategies.deepspeed import STRATEGIES

    model = _model(flags)
    batch = _rank_batches(0)[0]
    report = gc.check(model, batch, strategies=STRATEGIES)
    return dict(truth={name: deepspeed_checkpoint_truth(flags, name) for name in ("checkpoint", "non_reentrant_checkpoint")},
                verdicts={r.strategy: dict(outcome=r.outcome, message=r.message) for r in report.results})


def main(path: str, cases: list[str]) -> None:
    import deepspeed

    _quiet()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for case in cases:
            if case.startswith("dsckpt"):  # DeepSpeed's own checkpointing: dsckpt-<full|lora>[-dropout]
                flags = _flags("z0-" + case.split("-", 1)[1] + "-reentrant")
                rows.append(dict(case=case, world=world, **deepspeed_strategies(flags)))
                continue
            flags = _flags(case)
            truth = ground_truth(flags)
            mine = verdict(flags, out)
            everyone: list = [None] * world
            torch.distributed.all_gather_object(everyone, mine)
            rows.append(dict(case=case, world=world, truth=truth, verdicts=everyone))
            if rank == 0:
                print(case, truth["max_grad_diff"], truth["loss_diff"], [v["outcome"] for v in everyone], flush=True)
    if rank == 0:
        with open(path, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv[1], sys.argv[2:])
