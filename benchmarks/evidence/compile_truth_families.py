"""Issue 31's ground-truth table on one GPU, every case family, the check 3 times, plus the cost.

Families (a Llama of the 1.1B width, 8 layers, bf16, sdpa, 2 x 1024 tokens, inductor):

- ``whole``: ``torch.compile(model)``, attention dropout 0.1;
- ``per_block``: ``layer.compile()`` on every decoder layer, attention dropout 0.1;
- ``regional``: ``layers[i] = torch.compile(layer)``, attention dropout 0.1;
- ``per_block_no_dropout``: per block, attention dropout 0;
- ``lora``: per block, LoRA (r 16 on q/k/v/o) with ``lora_dropout=0.05``, attention dropout 0;
- ``inside``: an eager model whose checkpoint function compiles the layer itself
  (``checkpoint(torch.compile(layer), ...)``, the pattern of pytorch issue 147565), dropout 0.1.

Plain torch (no code of this project; the checkpoint functions are plain torch.utils.checkpoint
calls) computes each case's verdict: B = the same program without checkpointing, E = the eager step
without checkpointing, S = the program with the checkpoint function around every decoder layer's
forward; d = the largest relative error norm over the logits and every gradient; ``pass`` when
d(S, B) <= 2 d(B, E) (capped at bf16's 0.125; the check's rule, docs/compile.md), random ops drawn
as eager draws them (``fallback_random``, the check's oracle). Per block, the checkpoint sits inside
the compiled layer and, separately, around the compiled call (where transformers' own switch puts
it): both verdicts are kept. For ``inside``, B is the eager model calling each layer through the
same ``torch.compile`` without the checkpoint (the user's program without checkpointing).

Cost (item 5): whole-model plain torch (baseline, eager and each function once) in one process with
cold inductor/triton caches, the check in another, cold too. Then the check twice more on warm
caches (repeats 2 and 3), then the other families: plain torch once, the check 3 times.

``python -m benchmarks.evidence.compile_truth_families [--smoke] [--budget S] [--families F,G,...]``; JSON to
``$OUT`` (the whole-model steps run when ``whole`` is named, then the other families named, one process).
``--parallel --families F,G,...`` runs each family in its own process at once (rows written to
``$OUT/rows-FAMILY.jsonl`` as found; ``--no-plain`` for the checks only), ``--layers N`` sets the
decoder layers, and ``--table FILE,FILE,...`` prints the agreement table of results files (plain
torch's verdict for the placement the check runs beside the check's outcomes).
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
from torch._dynamo.eval_frame import OptimizedModule

ROOT = Path(__file__).resolve().parents[2]

from benchmarks.suites import compile_truth as truth  # noqa: E402 - the compile-truth suite's plain-torch helpers

BF16_CAP = 0.125
FAMILIES = ("whole", "per_block", "regional", "per_block_no_dropout", "lora", "inside")
#: The check's strategies per family (names of built-ins, or tests/mutations.py / this module's functions).
CHECKED = {
    "whole": ["non_reentrant", "hf_non_reentrant", "sac", "rng_not_preserved", "gradient_three_percent_off",
              "not_checkpointing"],
    "per_block": ["non_reentrant", "hf_non_reentrant", "sac", "rng_not_preserved", "gradient_three_percent_off"],
    "regional": ["non_reentrant", "sac", "rng_not_preserved", "gradient_three_percent_off"],
    "per_block_no_dropout": ["non_reentrant", "sac", "rng_not_preserved", "gradient_three_percent_off"],
    "lora": ["non_reentrant", "sac", "rng_not_preserved", "gradient_three_percent_off"],
    "inside": ["compiled_inside", "compiled_inside_rng_redrawn"],
}


def compiled_inside(function: Any, *args: Any) -> Any:
    """A user's checkpoint function that compiles the layer itself (pytorch issue 147565)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(torch.compile(function, backend=BACKEND[0]), *args, use_reentrant=False)


def compiled_inside_rng_redrawn(function: Any, *args: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    return checkpoint(torch.compile(function, backend=BACKEND[0]), *args, use_reentrant=False,
                      preserve_rng_state=False)


def compiled_plain(function: Any, *args: Any) -> Any:
    """The ``inside`` family's program without checkpointing: the layer through the same compile."""
    return torch.compile(function, backend=BACKEND[0])(*args)


BACKEND = ["inductor"]
#: The compiled-regions probe's figures kept per strategy: graphs, regions, recomputed regions and layers,
#: then the backward graphs executed and those of them that recomputed (per execution: 8 per block, 8 layers).
REGION_METRICS = ("compiled_graphs", "checkpoint_regions", "recomputed_regions", "recomputed_layers",
                  "compiled_backward_executions", "recomputing_backward_executions")


def functions() -> dict[str, Any]:
    from tests import mutations

    return {"non_reentrant": mutations.correct, "sac": truth.plain_sac, "rng_not_preserved": mutations.rng_not_preserved,
            "gradient_three_percent_off": mutations.gradient_three_percent_off,
            "not_checkpointing": mutations.not_checkpointing, "compiled_inside": compiled_inside,
            "compiled_inside_rng_redrawn": compiled_inside_rng_redrawn}


def layers_of(model: Any) -> list[Any]:
    return [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]


def build(family: str, shape: dict[str, Any], device: str, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    dropout = 0.0 if family in ("per_block_no_dropout", "lora") else 0.1
    config = LlamaConfig(**shape, attention_dropout=dropout, max_position_embeddings=4096)
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    if family == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    return model.train()


def form(family: str) -> str:
    return {"whole": "whole", "regional": "regional", "inside": "eager"}.get(family, "per_block")


def compile_as(model: Any, how: str, backend: str) -> Any:
    """``model`` compiled as the caller would: whole, per block, regional (layers replaced), or eager."""
    if how == "whole":
        return torch.compile(model, backend=backend)
    if how == "per_block":
        for layer in layers_of(model):
            layer.compile(backend=backend)
    if how == "regional":
        parent = next(m for m in model.modules() if isinstance(getattr(m, "layers", None), torch.nn.ModuleList))
        for index, layer in enumerate(parent.layers):
            parent.layers[index] = torch.compile(layer, backend=backend)
    return model


def plain_step(model0: Any, ids: torch.Tensor, how: str, backend: str, function: Any = None,
               around: bool = False) -> dict[str, Any]:
    """One training step of a fresh copy in plain torch; ``function`` around each decoder layer's
    forward (inside the compiled code), or around its compiled call (``around``, per block)."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    device = ids.device.type
    torch._dynamo.reset()
    model = copy.deepcopy(model0)
    if function is not None and not around:
        for layer in layers_of(model):
            layer.forward = functools.partial(truth._wrapped, function, layer.forward)
    runner = compile_as(model, how, backend)
    if function is not None and around and how == "regional":  # around each OptimizedModule's compiled forward
        for wrapper in [m for m in model.modules() if isinstance(m, OptimizedModule)]:
            wrapper.forward = functools.partial(truth._wrapped, function, wrapper.forward)
    elif function is not None and around:
        for layer in layers_of(model):
            layer._compiled_call_impl = functools.partial(truth._wrapped, function, layer._compiled_call_impl)
    truth.seed(device)
    truth.sync(device)
    started = time.perf_counter()
    with inductor_config.patch(fallback_random=True):
        out = runner(input_ids=ids, labels=ids)
        out.loss.backward()
    truth.sync(device)
    seconds = time.perf_counter() - started
    grads = {n.replace("._orig_mod", ""): p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {"logits": out.logits.detach(), "grads": grads, "seconds": seconds}


def setting(args: argparse.Namespace) -> tuple[dict[str, Any], str, torch.dtype, str, int]:
    """The compile-truth suite's setting, with ``--layers`` decoder layers where given."""
    shape, device, dtype, backend, length = truth.setting(args)
    if getattr(args, "layers", None):
        shape = dict(shape, num_hidden_layers=args.layers)
    return shape, device, dtype, backend, length


def plain_truth(family: str, args: argparse.Namespace) -> dict[str, Any]:
    shape, device, dtype, backend, length = setting(args)
    BACKEND[0] = backend
    ids = truth.tokens(shape, length, device)
    model0 = build(family, shape, device, dtype)
    how = form(family)
    found: dict[str, Any] = {"family": family, "seconds": {}, "truth": {}}
    fns = functions()
    if how == "eager":  # the user's program without checkpointing: each layer through the same compile
        base = plain_step(model0, ids, "eager", backend, compiled_plain)
    else:
        base = plain_step(model0, ids, how, backend)
    found["seconds"]["baseline"] = round(base["seconds"], 2)
    eager = plain_step(model0, ids, "eager", backend)
    found["seconds"]["eager"] = round(eager["seconds"], 2)
    d_be = truth.distance(base, eager)
    tolerance = min(2 * d_be, BF16_CAP)
    found.update(d_BE=d_be, tolerance=tolerance)
    placements = [False, True] if how in ("per_block", "regional") else [False]
    for name in CHECKED[family]:
        if name not in fns:
            continue
        for around in placements:
            if time.time() > args.deadline:
                found["truth"][name] = "not reached (time)"
                continue
            run = plain_step(model0, ids, "eager" if how == "eager" else how, backend, fns[name], around)
            key = f"{name} (around the compiled call)" if around else name
            found["seconds"][key] = round(run["seconds"], 2)
            d_sb = truth.distance(run, base)
            found["truth"][key] = {"d_SB": d_sb, "verdict": "pass" if d_sb <= tolerance else "mismatch"}
            del run
    return found


def check(family: str, args: argparse.Namespace) -> dict[str, Any]:
    from tests import mutations

    import pytest_gradckpt as gc

    shape, device, dtype, backend, length = setting(args)
    BACKEND[0] = backend
    ids = truth.tokens(shape, length, device)
    model = compile_as(build(family, shape, device, dtype), form(family), backend)
    here = sys.modules[__name__]
    strategies: list[Any] = []
    for name in CHECKED[family]:
        fn = getattr(here, name, None) if name.startswith("compiled_") else getattr(mutations, name, None)
        strategies.append(name if fn is None or name in ("non_reentrant", "sac") else
                          gc.Strategy.from_checkpoint_fn(name, fn))
    started = time.perf_counter()
    report = gc.check(model, {"input_ids": ids, "labels": ids}, strategies=strategies, device=device)
    seconds = time.perf_counter() - started
    train = report.baseline.get("train", {})
    keep = ("max_rel_err",)
    return {"family": family, "seconds": round(seconds, 1),
            "compile_distance": train.get("compile_distance"), "compile_tolerance": train.get("compile_tolerance"),
            "outcomes": {r.strategy: r.outcome for r in report.results},
            "compiled": {r.strategy: {k: r.metrics.get("compiled", {}).get(k) for k in keep} for r in report.results},
            "regions": {r.strategy: [r.metrics.get(k) for k in REGION_METRICS] for r in report.results},
            "region_metrics": list(REGION_METRICS),
            "messages": {r.strategy: r.message[:240] for r in report.results}}


def phase(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One process: for each family named, plain torch (unless --no-plain), then the check --checks times."""
    rows = []
    for family in args.families.split(","):
        if not args.no_plain and time.time() < args.deadline:
            started = time.perf_counter()
            try:
                row = plain_truth(family, args)
            except Exception as exc:  # noqa: BLE001 - a family that fails is reported, the others go on
                row = {"family": family, "error": f"{type(exc).__name__}: {exc}"[:600]}
            rows.append(dict(row, kind="plain", wall=round(time.perf_counter() - started, 1)))
            print(json.dumps(rows[-1], default=str), flush=True)
        for repeat in range(args.checks):
            if time.time() > args.deadline:
                rows.append({"family": family, "kind": "check", "repeat": repeat, "skipped": "budget spent"})
                print(json.dumps(rows[-1]), flush=True)
                continue
            try:
                row = check(family, args)
            except Exception as exc:  # noqa: BLE001
                row = {"family": family, "error": f"{type(exc).__name__}: {exc}"[:600]}
            rows.append(dict(row, kind="check", repeat=repeat))
            print(json.dumps(rows[-1], default=str), flush=True)
    return rows


def child_command(families: str, args: argparse.Namespace, checks: int, no_plain: bool) -> list[str]:
    command = [sys.executable, "-m", "benchmarks.evidence.compile_truth_families", "--phase", "--families", families,
               "--checks", str(checks), "--deadline", str(args.deadline)]
    command += ["--no-plain"] if no_plain else []
    command += ["--smoke"] if args.smoke else []
    command += ["--layers", str(args.layers)] if args.layers else []
    return command


def cache_env(cache: str) -> dict[str, str]:
    return dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{cache}/inductor", TRITON_CACHE_DIR=f"{cache}/triton")


def run_process(families: str, cache: str, args: argparse.Namespace, checks: int, no_plain: bool) -> list[Any]:
    started = time.perf_counter()
    done = subprocess.run(child_command(families, args, checks, no_plain), env=cache_env(cache), capture_output=True,
                          text=True, timeout=max(args.deadline - time.time(), 1) + 60)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0:
        rows.append({"families": families, "error": done.stderr[-2000:]})
    return [dict(row, process=families, process_seconds=round(time.perf_counter() - started, 1)) for row in rows]


def run_parallel(args: argparse.Namespace, out: Path) -> list[Any]:
    """``--parallel``: each family in its own process at once (one GPU, cold caches of its own), each
    row written to ``out/rows-FAMILY.jsonl`` as it is found (a call that runs out of time keeps the
    rows written so far); stderr to ``out/log-FAMILY.txt``. Times of parallel processes share the
    CPU and the GPU: they are not the cost figure (that is the sequential whole-model run)."""
    children = {}
    for family in args.families.split(","):
        rows_file = open(out / f"rows-{family}.jsonl", "w")  # noqa: SIM115 - closed below, after the child
        log_file = open(out / f"log-{family}.txt", "w")  # noqa: SIM115
        process = subprocess.Popen(child_command(family, args, args.checks, args.no_plain),
                                   env=cache_env(f"/tmp/ctf-cache/parallel-{family}"), stdout=rows_file,
                                   stderr=log_file, text=True)
        children[family] = (process, rows_file, log_file, time.perf_counter())
    rows: list[Any] = []
    for family, (process, rows_file, log_file, started) in children.items():
        try:
            process.wait(timeout=max(args.deadline - time.time(), 1) + args.grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        rows_file.close()
        log_file.close()
        text = (out / f"rows-{family}.jsonl").read_text()
        found = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        if process.returncode != 0:
            found.append({"family": family, "error": (out / f"log-{family}.txt").read_text()[-2000:]})
        rows += [dict(row, process=family, process_seconds=round(time.perf_counter() - started, 1)) for row in found]
    return rows


#: Cases whose plain-torch figure is about values only, while their verdict is about recompute
#: (``not_checkpointing`` is a plain call: right values, nothing recomputed; the CPU tests decide it).
VALUES_ONLY = ("not_checkpointing",)


def around_the_call(family: str, transformers_version: str) -> bool:
    """Where the check's checkpoint sits for ``family``: around each compiled block's call where the
    blocks are compiled per block (``layer.compile()`` compiles ``_call_impl``) and transformers' switch
    checkpoints ``Module.__call__`` (transformers <= 5.22; 5.23 checkpoints ``forward``, inside the
    compiled code). Regional compile (``torch.compile(layer)``) compiles the block's whole ``__call__``,
    the switch's checkpoint included, and the check compiles its copies the same way
    (``compiled._compile_whole_call``, since 9ed8367): inside the compiled code on every line."""
    major, minor = (int(part) for part in transformers_version.split(".")[:2])
    return form(family) == "per_block" and (major, minor) < (5, 23)


def table(paths: list[str]) -> dict[str, Any]:
    """Issue 31's table from results files of this script: for each family and case, plain torch's
    verdict for the program the check runs (the placement of :func:`around_the_call`) beside the
    check's outcome in each repeat. Check rows of a later file replace a family's earlier ones, or
    join them when both files are of the same commit (repeats run in two calls)."""
    plain: dict[str, Any] = {}
    checks: dict[str, list[Any]] = {}
    sources: dict[str, Any] = {}
    version = ""
    for path in paths:
        document = json.loads(Path(path).read_text())
        version = document.get("transformers", version)
        found: dict[str, list[Any]] = {}
        for row in document["rows"]:
            if row.get("kind") == "plain" and "truth" in row:
                plain[row["family"]] = dict(row, commit=document.get("commit"))
            elif row.get("kind") == "check" and "outcomes" in row:
                found.setdefault(row["family"], []).append(row)
        for family, rows in found.items():
            same_commit = sources.get(family, {}).get("commit") == document.get("commit")
            checks[family] = checks.get(family, []) + rows if same_commit else rows
            files = sources[family]["file"] + ", " if same_commit else ""
            sources[family] = {"file": files + Path(path).name, "commit": document.get("commit")}
    cases = []
    for family, rows in checks.items():
        truth = plain.get(family, {}).get("truth", {})
        around = around_the_call(family, version)
        for name in rows[0]["outcomes"]:
            key = "non_reentrant" if name == "hf_non_reentrant" else name  # the same checkpoint function
            key = f"{key} (around the compiled call)" if around else key
            found_truth = truth.get(key)
            verdict = found_truth.get("verdict") if isinstance(found_truth, dict) else None
            if name in VALUES_ONLY:  # its values are right by construction: its verdict is about recompute
                verdict = None
            outcomes = [row["outcomes"].get(name) for row in rows]
            cases.append({"family": family, "case": name, "placement": "around the compiled call" if around else
                          "inside the compiled code", "plain_d_SB": None if verdict is None else found_truth["d_SB"],
                          "plain_tolerance": plain.get(family, {}).get("tolerance"), "plain_verdict": verdict,
                          "check": outcomes, "repeats_identical": len(set(outcomes)) == 1,
                          "agrees": verdict is not None and set(outcomes) == {verdict}})
    return {"transformers": version, "plain": {f: {"commit": r.get("commit"), "d_BE": r.get("d_BE"),
                                                   "tolerance": r.get("tolerance")} for f, r in plain.items()},
            "checks_from": sources, "cases": cases,
            "all_agree": all(c["agrees"] for c in cases if c["plain_verdict"] is not None)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--budget", type=float, default=540.0)
    parser.add_argument("--phase", action="store_true")
    parser.add_argument("--parallel", action="store_true",
                        help="each family of --families in its own process at once; rows to $OUT as found")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--checks", type=int, default=3)
    parser.add_argument("--layers", type=int, default=0, help="decoder layers (default: the setting's, 8 at 1.1B)")
    parser.add_argument("--no-plain", action="store_true")
    parser.add_argument("--grace", type=float, default=60.0,
                        help="--parallel: seconds a child may run past --budget (a phase started before the "
                             "deadline finishes; a whole-model check takes about 110 s cold) before it is killed")
    parser.add_argument("--deadline", type=float)
    parser.add_argument("--commit", default="")
    parser.add_argument("--tag", default="m31", help="the results file's name ends with DATE-TAG")
    parser.add_argument("--table", help="comma-separated results files of this script: print the agreement table")
    args = parser.parse_args()
    if args.table:
        print(json.dumps(table(args.table.split(",")), indent=1))
        return 0
    if args.phase:
        phase(args)
        return 0
    args.deadline = time.time() + args.budget
    out = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    name = torch.cuda.get_device_name().replace(" ", "-") if torch.cuda.is_available() and not args.smoke else "cpu"
    out.mkdir(parents=True, exist_ok=True)
    date = time.strftime("%Y-%m-%d", time.gmtime())
    path = out / f"compile-truth-families-{name}-{date}-{args.tag}.json"
    shape, _, dtype, backend, length = setting(args)
    document: dict[str, Any] = {"commit": args.commit or os.environ.get("GRADCKPT_COMMIT", ""), "device": name,
                                "torch": torch.__version__, "shape": shape, "dtype": str(dtype), "tokens": [2, length],
                                "backend": backend, "rows": []}
    import transformers

    document["transformers"] = transformers.__version__
    if args.parallel:
        document["parallel"] = args.families.split(",")
        document["rows"] = run_parallel(args, out)
        path.write_text(json.dumps(document, indent=1, default=str))
        print(path)
        return 0
    cold = "/tmp/ctf-cache"
    named = args.families.split(",")
    steps = [("whole", f"{cold}/plain-whole", 0, False),      # cost: plain torch, cold caches
             ("whole", f"{cold}/check-whole", 1, True),       # cost: the check, cold caches (repeat 1)
             ("whole", f"{cold}/check-whole", 2, True)] if "whole" in named else []  # repeats 2, 3: warm
    rest = ",".join(family for family in named if family != "whole")
    steps += [(rest, f"{cold}/families", 3, False)] if rest else []
    for families, cache, checks, no_plain in steps:
        document["rows"] += run_process(families, cache, args, checks, no_plain)
        path.write_text(json.dumps(document, indent=1, default=str))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
