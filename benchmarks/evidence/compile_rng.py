"""Does a compiled, checkpointed region with dropout replay its dropout masks in recompute, with
``torch._functorch.config.functionalize_rng_ops`` off and on? Plain torch only (no engine), inductor.

For each setting, one step of a 3-block residual MLP with dropout inside every block, from one
seed, compiled as one program (relative error norms of the flattened gradients against the
compiled step without checkpointing):

- ``again``: the same compiled step once more (run-to-run: 0.0 means the comparison is exact);
- ``checkpoint``: every block under ``torch.utils.checkpoint`` (non-reentrant) inside the program;
- ``checkpoint_rng_not_preserved``: the same with ``preserve_rng_state=False``;
- ``budget_0.5``: no checkpoint, ``activation_memory_budget=0.5`` (the partitioner rematerialises);
- ``eager_checkpoint_outside``: eager checkpoints around each block's compiled forward,
  ``preserve_rng_state=False`` (a recompute that redraws: must differ, so the probe can see a redraw).

Then ``gc.check`` on the same model (whole-model compile) with ``non_reentrant`` and
``compile_budget`` under each setting. ``python -m benchmarks.evidence.compile_rng [--device cuda]``;
prints JSON and writes ``compile-rng-<device>-<date>.json`` to ``$OUT`` (if set).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

import pytest_gradckpt as gc
from tests.models import DropoutNet  # noqa: E402  (the model tests/test_compile.py checks)


def step(model: torch.nn.Module, inputs: torch.Tensor, wrap: Any, budget: float = 1.0,
         outside: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, flattened gradients) of one step: the blocks compiled as one program, each called
    through ``wrap``; ``outside``: each block's forward compiled, ``wrap`` eager around it."""
    import torch._functorch.config as functorch_config

    torch._dynamo.reset()
    target = copy.deepcopy(model)
    if outside:
        calls = [torch.compile(b.forward) for b in target.blocks]

        def run(x: torch.Tensor) -> torch.Tensor:
            for call in calls:
                x = wrap(call, x)
            return x
    else:
        def body(x: torch.Tensor) -> torch.Tensor:
            for block in target.blocks:
                x = wrap(block, x) if wrap else block(x)
            return x
        run = torch.compile(body)
    torch.manual_seed(0)
    with functorch_config.patch(activation_memory_budget=budget):
        loss = run(inputs.detach().requires_grad_()).square().mean()
        loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in target.parameters()])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def measure(model: torch.nn.Module, inputs: torch.Tensor, functionalize: bool) -> dict[str, Any]:
    import torch._functorch.config as functorch_config

    row: dict[str, Any] = {"functionalize_rng_ops": functionalize}
    with functorch_config.patch(functionalize_rng_ops=functionalize):
        try:
            loss, plain = step(model, inputs, None)
            variants = {
                "again": lambda: step(model, inputs, None),
                "checkpoint": lambda: step(model, inputs, lambda f, x: checkpoint(f, x, use_reentrant=False)),
                "checkpoint_rng_not_preserved": lambda: step(model, inputs, lambda f, x: checkpoint(
                    f, x, use_reentrant=False, preserve_rng_state=False)),
                "budget_0.5": lambda: step(model, inputs, None, budget=0.5),
                "eager_checkpoint_outside": lambda: step(model, inputs, lambda f, x: checkpoint(
                    f, x, use_reentrant=False, preserve_rng_state=False), outside=True),
            }
            for name, variant in variants.items():
                try:
                    other_loss, grads = variant()
                    row[name] = {"loss_equal": bool(torch.equal(loss, other_loss)), "grads_rel": rel(grads, plain),
                                 "grads_equal": bool(torch.equal(grads, plain))}
                except Exception as exc:  # noqa: BLE001 - what torch says is the measurement
                    row[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            compiled = torch.compile(copy.deepcopy(model))
            started = time.perf_counter()
            report = gc.check(compiled, inputs, strategies=["non_reentrant", "compile_budget"])
            row["check"] = {r.strategy: {"outcome": r.outcome, "message": r.message[:200],
                                         "max_rel_err": r.metrics.get("compiled", {}).get("max_rel_err")}
                            for r in report.results}
            row["check_seconds"] = round(time.perf_counter() - started, 1)
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = DropoutNet(args.width).to(args.device)
    inputs = torch.randn(8, 64, args.width, generator=torch.Generator().manual_seed(1)).to(args.device)
    started = time.perf_counter()
    rows = [measure(model, inputs, flag) for flag in (False, True)]
    name = torch.cuda.get_device_name().replace("NVIDIA ", "").lower() if args.device == "cuda" else "cpu"
    document = {"device": name, "torch": torch.__version__, "backend": "inductor", "width": args.width,
                "inputs": list(inputs.shape), "dropout": 0.1, "rows": rows,
                "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(document, indent=1))
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / f"compile-rng-{name}-{datetime.date.today()}.json"
        path.write_text(json.dumps(document, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
