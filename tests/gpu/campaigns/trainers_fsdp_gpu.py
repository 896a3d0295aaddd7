"""check_trainer on real FSDP, one GPU: Lightning's FSDPStrategy(activation_checkpointing_policy=...)
and accelerate's FullyShardedDataParallelPlugin(activation_checkpointing=True), as JSON.

For each: the verdict of ``gc.check_trainer`` run as a user runs it, and ground truth without the
engine: the gradients (and buffers) of one real FSDP training step with checkpointing as
configured, against the same real FSDP step with it off, and against a plain-torch step.

Run on the GPU machine: ``python -m tests.gpu.campaigns.trainers_fsdp_gpu OUT.json`` (it starts Lightning
in a subprocess and accelerate under ``torchrun --nproc-per-node 1``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from typing import Any

import torch

#: a ~100M-parameter Llama (8 layers of 768, vocabulary 32000)
LLAMA = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=512, attention_dropout=0.0)
BATCH, LENGTH, ACCUMULATE = 2, 256, 2


def llama() -> Any:
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))


def token_batches(count: int = ACCUMULATE * 2) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(count * BATCH):
        ids = torch.randint(0, LLAMA["vocab_size"], (LENGTH,), generator=generator)
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def clean(name: str) -> str:
    for part in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module."):
        name = name.replace(part, "")
    return name


def distance(got: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> dict[str, Any]:
    common = [n for n in truth if n in got]
    diffs = {n: (got[n].float() - truth[n].float()).abs().max().item() for n in common}
    worst = max(diffs, key=lambda n: diffs[n]) if diffs else None
    return {"compared": len(common), "only_in_truth": len(set(truth) - set(got)),
            "only_in_run": len(set(got) - set(truth)), "max_abs_diff": diffs[worst] if worst else None,
            "worst": worst, "bitwise_equal": all(torch.equal(got[n].float(), truth[n].float()) for n in common),
            "max_abs_truth": max((truth[n].float().abs().max().item() for n in common), default=None)}


def verdict(report: Any) -> dict[str, Any]:
    [result] = report.results
    return {"outcome": result.outcome, "strategy": result.strategy, "message": result.message[:1500]} | {
        k: result.metrics.get(k) for k in ("recomputed_units", "max_grad_diff", "activation_reduction",
                                           "cuda_reduction", "saved_elsewhere_units")}


# --------------------------------------------------------------------------- Lightning


def lightning_modules() -> dict[str, Any]:
    import lightning.pytorch as pl
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    class LitLlama(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = llama()

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return self.model(**batch).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.norm = torch.nn.Linear(256, 256), torch.nn.BatchNorm1d(256)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.norm(self.lin(x)))

    class LitBatchNorm(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.blocks = torch.nn.Sequential(*[Block() for _ in range(3)])
            self.head = torch.nn.Linear(256, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.blocks(x)).squeeze(-1)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    return {"llama_bf16_mixed": (LitLlama, LlamaDecoderLayer, "bf16-mixed"),
            "batchnorm_blocks_32": (LitBatchNorm, Block, "32-true")}


def lightning_loader(name: str) -> Any:
    if name.startswith("llama"):
        return torch.utils.data.DataLoader(token_batches(), batch_size=BATCH)
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 256, generator=generator), torch.randn(64, generator=generator))
    return torch.utils.data.DataLoader(data, batch_size=16)


def lightning_real_fsdp(cls: Any, block: Any, precision: str, loader: Any, policy: bool) -> dict[str, Any]:
    """One real FSDP step through Lightning's Trainer; gradients and buffers read before the optimizer steps."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import FSDPStrategy

    seen: dict[str, Any] = {}

    class Capture(pl.Callback):
        def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
            seen["grads"] = {clean(n): p.grad.detach().float().cpu().clone() for n, p in module.named_parameters()
                             if p.grad is not None}
            seen["buffers"] = {clean(n): b.detach().float().cpu().clone() for n, b in module.named_buffers()}
            seen["wrappers"] = sum(type(m).__name__ == "CheckpointWrapper" for m in module.modules())
            seen["fsdp_units"] = sum(type(m).__name__ == "FullyShardedDataParallel" for m in module.modules())

    strategy = FSDPStrategy(activation_checkpointing_policy={block} if policy else None,
                            auto_wrap_policy={block})
    trainer = pl.Trainer(accelerator="cuda", devices=1, strategy=strategy, precision=precision, max_steps=1,
                         accumulate_grad_batches=ACCUMULATE, callbacks=[Capture()], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False)  # the loader's own order, as the plain step reads it
    trainer.fit(cls(), loader)
    return seen


def lightning_plain(cls: Any, precision: str, loader: Any) -> dict[str, torch.Tensor]:
    """Plain torch: the same micro-batches, loss / accumulate, under bf16 autocast where Lightning uses it."""
    module = cls().cuda().train()
    for index, batch in zip(range(ACCUMULATE), loader, strict=False):
        batch = {k: v.cuda() for k, v in batch.items()} if isinstance(batch, dict) else [t.cuda() for t in batch]
        with torch.autocast("cuda", torch.bfloat16, enabled=precision.startswith("bf16")):
            loss = module.training_step(batch, index)
        (loss / ACCUMULATE).backward()
    return {n: p.grad.float().cpu() for n, p in module.named_parameters() if p.grad is not None}


def run_lightning() -> dict[str, Any]:
    import lightning
    from lightning.pytorch.strategies import FSDPStrategy

    import pytest_gradckpt as gc
    from pytest_gradckpt.trainers.lightning import Fit

    out: dict[str, Any] = {"lightning": lightning.__version__}
    for name, (cls, block, precision) in lightning_modules().items():
        entry: dict[str, Any] = {"precision": precision}
        loader = lightning_loader(name)
        try:
            fit = Fit(cls(), FSDPStrategy(activation_checkpointing_policy={block}), loader,
                      accumulate_grad_batches=ACCUMULATE, precision=precision)
            started = time.perf_counter()
            entry["check_trainer"] = verdict(gc.check_trainer(fit)) | {
                "seconds": round(time.perf_counter() - started, 2),
                "module_device_after": str(next(fit.module.parameters()).device)}
        except Exception:  # noqa: BLE001 - recorded
            entry["check_trainer_error"] = traceback.format_exc()[-3000:]
        try:
            on = lightning_real_fsdp(cls, block, precision, loader, policy=True)
            off = lightning_real_fsdp(cls, block, precision, loader, policy=False)
            plain = lightning_plain(cls, precision, loader)
            entry["ground_truth"] = {
                "fsdp_policy_vs_fsdp_off": distance(on["grads"], off["grads"]),
                "fsdp_off_vs_plain_torch": distance(off["grads"], plain),
                "buffers_policy_vs_off": distance(on["buffers"], off["buffers"]) if off["buffers"] else None,
                "checkpoint_wrappers": on["wrappers"], "fsdp_units": on["fsdp_units"]}
        except Exception:  # noqa: BLE001 - recorded
            entry["ground_truth_error"] = traceback.format_exc()[-3000:]
        out[name] = entry
        print(name, json.dumps(entry, default=str)[:1500], flush=True)
    return out


# --------------------------------------------------------------------------- accelerate (under torchrun)


def accelerate_worker(version: int, mode: str, path: str) -> None:
    """mode: 'check' (check_trainer on the prepared model), 'on' / 'off' (one real FSDP step's gradients)."""
    import accelerate
    from accelerate import Accelerator, FullyShardedDataParallelPlugin

    import pytest_gradckpt as gc
    from pytest_gradckpt.trainers.accelerate import Prepared

    out: dict[str, Any] = {"accelerate": accelerate.__version__, "fsdp_version": version, "mode": mode}
    try:
        plugin = FullyShardedDataParallelPlugin(
            fsdp_version=version, auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=["LlamaDecoderLayer"], activation_checkpointing=mode != "off",
            use_orig_params=True if version == 1 else None, cpu_ram_efficient_loading=False)
        accelerator = Accelerator(mixed_precision="bf16", fsdp_plugin=plugin, gradient_accumulation_steps=ACCUMULATE)
        out["distributed_type"] = str(accelerator.distributed_type)
        loader = torch.utils.data.DataLoader(token_batches(), batch_size=BATCH)
        model = llama()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # FSDP2 needs it prepared with the model
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        out["checkpoint_wrappers"] = sum(type(m).__name__ == "CheckpointWrapper" for m in model.modules())
        if mode == "check":
            started = time.perf_counter()
            weights = {n: p.detach().clone() for n, p in model.named_parameters()}
            out["check_trainer"] = verdict(gc.check_trainer(Prepared(accelerator, model, loader)))
            out["seconds"] = round(time.perf_counter() - started, 2)
            out["prepared_model_untouched"] = all(p.grad is None and torch.equal(weights[n], p.detach())
                                                  for n, p in model.named_parameters())
        else:
            model.train()
            for batch in list(loader)[:ACCUMULATE]:
                with accelerator.accumulate(model), accelerator.autocast():
                    loss = model(**batch).loss
                accelerator.backward(loss)
            grads = {}
            for name, parameter in model.named_parameters():
                grad = parameter.grad
                if grad is not None:
                    grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
                    grads[clean(name)] = grad.detach().float().cpu()
            torch.save(grads, path + ".pt")
            out["gradients"] = len(grads)
    except Exception:  # noqa: BLE001 - recorded
        out["error"] = traceback.format_exc()[-4000:]
    with open(path, "w") as handle:
        json.dump(out, handle, default=str)


def run_accelerate(folder: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for version in (1, 2):
        entry: dict[str, Any] = {}
        for mode in ("check", "on", "off"):
            path = os.path.join(folder, f"accelerate-v{version}-{mode}.json")
            done = subprocess.run(["torchrun", "--standalone", "--nproc-per-node", "1", __file__, "accelerate-worker",
                                   str(version), mode, path], capture_output=True, text=True, timeout=300)
            try:
                with open(path) as handle:
                    entry[mode] = json.load(handle)
            except OSError:
                entry[mode] = {"returncode": done.returncode, "stderr_tail": done.stderr[-3000:]}
        if os.path.exists(os.path.join(folder, f"accelerate-v{version}-on.json.pt")) and \
                os.path.exists(os.path.join(folder, f"accelerate-v{version}-off.json.pt")):
            on = torch.load(os.path.join(folder, f"accelerate-v{version}-on.json.pt"))
            off = torch.load(os.path.join(folder, f"accelerate-v{version}-off.json.pt"))
            entry["ground_truth"] = {"fsdp_checkpointing_vs_fsdp_off": distance(on, off)}
        out[f"fsdp_v{version}"] = entry
        print(f"accelerate fsdp v{version}", json.dumps(entry, default=str)[:2500], flush=True)
    return out


def main(path: str) -> None:
    import tempfile

    import transformers

    results: dict[str, Any] = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                                            "device": torch.cuda.get_device_name(0)},
                               "llama": LLAMA | {"batch": BATCH, "length": LENGTH, "accumulate": ACCUMULATE,
                                                 "parameters": sum(p.numel() for p in llama().parameters())}}
    folder = tempfile.mkdtemp()
    lightning_json = os.path.join(folder, "lightning.json")
    done = subprocess.run([sys.executable, __file__, "lightning", lightning_json], capture_output=True, text=True,
                          timeout=400)
    try:
        with open(lightning_json) as handle:
            results["lightning"] = json.load(handle)
    except OSError:
        results["lightning"] = {"returncode": done.returncode, "stderr_tail": done.stderr[-4000:]}
    print(done.stdout[-3000:], flush=True)
    results["accelerate"] = run_accelerate(folder)
    with open(path, "w") as handle:
        json.dump(results, handle, indent=1, default=str)


if __name__ == "__main__":
    if sys.argv[1] == "lightning":
        found = run_lightning()
        with open(sys.argv[2], "w") as handle:
            json.dump(found, handle, default=str)
    elif sys.argv[1] == "accelerate-worker":
        accelerate_worker(int(sys.argv[2]), sys.argv[3], sys.argv[4])
    else:
        main(sys.argv[1])
