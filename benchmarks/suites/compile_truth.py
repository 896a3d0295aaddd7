"""Ground truth for compiled checks (issue 31): each case's verdict computed in plain torch, beside
the check's verdict on the same case, and what plain torch takes to compile and run each program of
the check once against what the check takes.

A Llama of the 1.1B width (hidden 2048, intermediate 5632, 16 heads, 4 KV heads, vocab 32000; 8
layers), bf16, sdpa, ``attention_dropout=0.1``, 2 x 1024 tokens, inductor, compiled whole
(``torch.compile(model)``) and per block (``layer.compile()``). Each checkpoint function is applied
the same way in plain torch and in the check: around every decoder layer's forward, inside the
compiled code (the check's default order, ``compile_outside``).

Plain torch, per case (no code of this project; the checkpoint functions are tests/mutations.py's
plain torch.utils.checkpoint calls): B = the compiled step without checkpointing, E = the eager
step, S = the compiled step with the checkpoint function, all seeded alike, random ops drawn as
eager draws them (inductor's ``fallback_random``: the check's oracle, docs/compile.md). d(X, Y) =
the largest relative error norm over the logits and every parameter's gradient. Verdict:
``pass`` when d(S, B) <= 2 d(B, E) (capped at bf16's 0.125), else ``mismatch``. Also reported:
d(S, B) with inductor's own random numbers (the user's program as it is), where reached.

Each phase runs in its own process with its own inductor and triton caches (cold, as a first
check in CI is), so the check and plain torch are timed alike.

``python -m benchmarks compile-truth --case 1b-width [--repeats N] [--set budget=SECONDS]``; case
``smoke-cpu`` is a tiny shape on the CPU with aot_eager. Each phase runs as
``python -m benchmarks.suites.compile_truth --phase plain|check --how whole|per_block``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.case import Case, Emit

ROOT = Path(__file__).resolve().parents[2]
ABOUT = "compiled checks' verdicts beside plain torch's, and what each costs to compile and run (issue 31)"
CASES = {"1b-width": Case("8 layers of the 1.1B width, bf16, inductor, whole and per block, on CUDA",
                          {"smoke": False, "budget": 3000.0,
                           "setting": "SHAPE, bf16, 2 x 1024 tokens, inductor, attention_dropout 0.1"}, needs="cuda"),
         "smoke-cpu": Case("a two-layer Llama on the CPU with aot_eager: tries the suite", {"smoke": True, "budget": 3000.0,
                                    "setting": "SMOKE, fp32, 2 x 32 tokens, aot_eager, attention_dropout 0.1"})}

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512)
#: The check's strategies per compile form; plain torch computes the verdict of each function-shaped one.
STRATEGIES = {
    "per_block": ["non_reentrant", "hf_non_reentrant", "sac", "rng_not_preserved", "gradient_three_percent_off"],
    "whole": ["non_reentrant", "sac", "rng_not_preserved", "gradient_three_percent_off"],
}
BF16_CAP = 0.125


def sac_contexts() -> Any:
    """Selective checkpointing that saves matmul outputs (module level: dynamo needs that)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default}

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def plain_sac(function: Any, *args: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    return checkpoint(function, *args, use_reentrant=False, context_fn=sac_contexts)


def plain_functions() -> dict[str, Any]:
    from tests import mutations

    return {"non_reentrant": mutations.correct, "sac": plain_sac, "rng_not_preserved": mutations.rng_not_preserved,
            "gradient_three_percent_off": mutations.gradient_three_percent_off}


def build(shape: dict[str, Any], device: str, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, attention_dropout=0.1, max_position_embeddings=4096)
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.train()


def _wrapped(function: Any, forward: Any, *args: Any, **kwargs: Any) -> Any:
    return function(functools.partial(forward, **kwargs), *args)


def compile_as(model: Any, how: str, backend: str) -> Any:
    if how == "whole":
        return torch.compile(model, backend=backend)
    if how == "per_block":
        for layer in model.model.layers:
            layer.compile(backend=backend)
    return model


def seed(device: str) -> None:
    torch.manual_seed(1234)
    if device == "cuda":
        torch.cuda.manual_seed_all(1234)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_step(model0: Any, ids: torch.Tensor, how: str, backend: str, function: Any = None,
               eager_draws: bool = True, outside: bool = False) -> dict[str, Any]:
    """One training step of a fresh copy in plain torch: (logits, gradients, seconds to compile and run).
    ``outside`` (per block): ``function`` wraps each layer's compiled call, eager around it, where
    transformers' own switch puts a checkpoint (it checkpoints the layer's ``Module.__call__``)."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    device = ids.device.type
    torch._dynamo.reset()
    model = copy.deepcopy(model0)
    if function is not None and not outside:
        for layer in model.model.layers:
            layer.forward = functools.partial(_wrapped, function, layer.forward)
    runner = compile_as(model, how, backend)
    if function is not None and outside:
        for layer in model.model.layers:
            layer._compiled_call_impl = functools.partial(_wrapped, function, layer._compiled_call_impl)
    seed(device)
    sync(device)
    started = time.perf_counter()
    with inductor_config.patch(fallback_random=eager_draws):
        out = runner(input_ids=ids, labels=ids)
        out.loss.backward()
    sync(device)
    seconds = time.perf_counter() - started
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {"logits": out.logits.detach(), "grads": grads, "seconds": seconds}


def distance(a: dict[str, Any], b: dict[str, Any]) -> float:
    """The largest relative error norm of ``a`` from ``b`` over the logits and every gradient."""
    pairs = [(a["logits"], b["logits"])] + [(a["grads"][n], b["grads"][n]) for n in b["grads"]]
    worst = 0.0
    for x, y in pairs:
        norm = y.float().norm().item()
        worst = max(worst, (x.float() - y.float()).norm().item() / norm if norm else (x.float() - y.float()).norm().item())
    return worst


def phase_plain(args: argparse.Namespace) -> dict[str, Any]:
    shape, device, dtype, backend, length = setting(args)
    ids = tokens(shape, length, device)
    model0 = build(shape, device, dtype)
    deadline = args.deadline
    found: dict[str, Any] = {"compile": args.how, "seconds": {}, "truth": {}}
    started = time.perf_counter()
    base = plain_step(model0, ids, args.how, backend)
    found["seconds"]["baseline"] = round(base["seconds"], 2)
    eager = plain_step(model0, ids, "eager", backend)
    found["seconds"]["eager"] = round(eager["seconds"], 2)
    d_be = distance(base, eager)
    tolerance = min(2 * d_be, BF16_CAP)
    found.update(d_BE=d_be, tolerance=tolerance)
    functions = plain_functions()
    kept: dict[str, Any] = {}
    for name in STRATEGIES[args.how]:
        if name not in functions:
            continue
        if time.time() > deadline:
            found["truth"][name] = "not reached (time)"
            continue
        run = plain_step(model0, ids, args.how, backend, functions[name])
        found["seconds"][name] = round(run["seconds"], 2)
        d_sb, d_se = distance(run, base), distance(run, eager)
        found["truth"][name] = {"d_SB": d_sb, "d_SE": d_se, "verdict": "pass" if d_sb <= tolerance else "mismatch"}
        if name == "non_reentrant":
            kept = run["grads"]
        if name == "rng_not_preserved" and kept:
            found["truth"][name]["bitwise_equal_to_preserved"] = all(torch.equal(run["grads"][n], kept[n]) for n in kept)
        del run
    if args.how == "per_block":  # where transformers' switch puts the checkpoint: around the compiled call
        for name in ("non_reentrant", "rng_not_preserved"):
            if time.time() > deadline:
                break
            run = plain_step(model0, ids, args.how, backend, functions[name], outside=True)
            d_sb = distance(run, base)
            found["truth"][f"{name} (around the compiled call)"] = {
                "d_SB": d_sb, "verdict": "pass" if d_sb <= tolerance else "mismatch"}
            del run
    if args.how == "per_block" and time.time() < deadline:  # the user's program as it is: inductor's own numbers
        own_base = plain_step(model0, ids, args.how, backend, eager_draws=False)
        own = plain_step(model0, ids, args.how, backend, functions["non_reentrant"], eager_draws=False)
        found["inductor_own_random"] = {"non_reentrant_d_SB": distance(own, own_base),
                                        "baseline_own_vs_eager_draws": distance(own_base, base)}
    found["wall_seconds"] = round(time.perf_counter() - started, 1)
    return found


def phase_check(args: argparse.Namespace) -> dict[str, Any]:
    from tests import mutations

    import pytest_gradckpt as gc

    shape, device, dtype, backend, length = setting(args)
    ids = tokens(shape, length, device)
    model = compile_as(build(shape, device, dtype), args.how, backend)
    strategies = [getattr(mutations, name) if hasattr(mutations, name) else name for name in STRATEGIES[args.how]]
    strategies = [s if isinstance(s, str) else gc.Strategy.from_checkpoint_fn(s.__name__, s) for s in strategies]
    started = time.perf_counter()
    report = gc.check(model, {"input_ids": ids, "labels": ids}, strategies=strategies, device=device)
    seconds = time.perf_counter() - started
    train = report.baseline.get("train", {})
    return {"compile": args.how, "seconds": round(seconds, 1),
            "compile_distance": train.get("compile_distance"), "compile_tolerance": train.get("compile_tolerance"),
            "outcomes": {r.strategy: r.outcome for r in report.results},
            "max_rel_err": {r.strategy: r.metrics.get("compiled", {}).get("max_rel_err") for r in report.results},
            "random": {r.strategy: r.metrics.get("compiled", {}).get("random") for r in report.results},
            "messages": {r.strategy: r.message[:300] for r in report.results}}


def setting(args: argparse.Namespace) -> tuple[dict[str, Any], str, torch.dtype, str, int]:
    if args.smoke:
        return SMOKE, "cpu", torch.float32, "aot_eager", 32
    return SHAPE, "cuda", torch.bfloat16, "inductor", 1024


def tokens(shape: dict[str, Any], length: int, device: str) -> torch.Tensor:
    return torch.randint(0, shape["vocab_size"], (2, length), generator=torch.Generator().manual_seed(1)).to(device)


def run_phase(kind: str, how: str, args: argparse.Namespace, deadline: float, repeat: int) -> dict[str, Any]:
    """One phase in a fresh process with cold inductor/triton caches of its own."""
    cache = Path(f"/tmp/compile-truth-cache/{kind}-{how}-{repeat}")
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), TRITON_CACHE_DIR=str(cache / "triton"))
    command = [sys.executable, "-m", "benchmarks.suites.compile_truth", "--phase", kind, "--how", how,
               "--deadline", str(deadline)]
    command += ["--smoke"] if args.smoke else []
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT,
                          timeout=max(deadline - time.time(), 1) + 60)
    if done.returncode != 0:
        return {"kind": kind, "compile": how, "error": done.stderr[-3000:]}
    found = json.loads(done.stdout.strip().splitlines()[-1])
    found.update(kind=kind, process_seconds=round(time.perf_counter() - started, 1))
    return found


def run(params: dict[str, Any], repeats: int, emit: Emit) -> None:
    args = argparse.Namespace(smoke=params["smoke"])
    deadline = time.time() + params["budget"]
    for repeat in range(repeats):
        for how in ("per_block", "whole"):
            for kind in ("plain", "check"):
                if time.time() > deadline - 30:
                    emit({"kind": kind, "compile": how, "repeat": repeat, "skipped": "budget spent"})
                    continue
                found = dict(run_phase(kind, how, args, deadline, repeat), repeat=repeat)
                print(json.dumps(found, default=str), flush=True)
                emit(found)


def main() -> int:
    """A phase's process (started by :func:`run_phase`): prints its row as the last line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU with aot_eager")
    parser.add_argument("--phase", choices=["plain", "check"], required=True)
    parser.add_argument("--how", choices=["whole", "per_block"], required=True)
    parser.add_argument("--deadline", type=float)
    args = parser.parse_args()
    found = (phase_plain if args.phase == "plain" else phase_check)(args)
    print(json.dumps(found, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
