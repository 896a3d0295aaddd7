"""What starting a GPU rank costs, part by part (issue 30): whether a rank may be forked after this
process asked ``torch.cuda.is_available()`` / ``device_count()``, spawn + imports, the 1.1B bf16 build on
the CPU with 1 and with all threads, on the GPU, and NCCL's init at world 1. Prints one JSON line.

``python -m benchmarks.evidence.dist_start_facts [--fork-only]``

Also whether a rank may be forked after each import and call a checking process makes before its
ranks start (``fork_after_*``): torch refuses CUDA in a child forked after this process called
``torch.cuda.is_available()`` (or initialised CUDA), and the check's GPU ranks are then spawned.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time


def _child_cuda(queue: object) -> None:
    import torch

    try:
        started = time.perf_counter()
        x = torch.ones(4, device="cuda")
        queue.put(("ok", float(x.sum()), time.perf_counter() - started))  # type: ignore[attr-defined]
    except Exception as error:  # noqa: BLE001
        queue.put(("error", f"{type(error).__name__}: {error}"[:300], 0.0))  # type: ignore[attr-defined]


def _fork_probe(before: str) -> dict[str, object]:
    """In a fresh interpreter: call ``before`` then fork a child that uses CUDA."""
    code = (f"import sys, json, time, multiprocessing as mp; sys.path.insert(0, {os.getcwd()!r}); import torch; "
            f"{before}; from benchmarks.evidence.dist_start_facts import _child_cuda; "
            "q = mp.get_context('fork').Queue(); t = time.perf_counter(); "
            "p = mp.get_context('fork').Process(target=_child_cuda, args=(q,)); p.start(); "
            "r = q.get(timeout=60); p.join(); print(json.dumps({'child': r, 'wall': time.perf_counter() - t, "
            "'exit': p.exitcode}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception:  # noqa: BLE001
        return {"stdout": out.stdout[-500:], "stderr": out.stderr[-800:]}


def _timed_python(code: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=300)
    return round(time.perf_counter() - started, 2)


def main() -> int:
    facts: dict[str, object] = {"cpus": os.cpu_count()}
    facts["fork_after_is_available"] = _fork_probe("torch.cuda.is_available()")
    facts["fork_after_device_count"] = _fork_probe("torch.cuda.device_count()")
    facts["fork_after_nothing"] = _fork_probe("pass")
    # What, in a process that runs a check, leaves a forked rank unable to use CUDA (torch's fork poison)?
    for name, before in (("import_dynamo", "import torch._dynamo"),
                         ("import_pytest_gradckpt", "import pytest_gradckpt"),
                         ("import_transformers_llama", "from transformers import LlamaForCausalLM"),
                         ("import_peft", "import peft"),
                         ("import_dist_cost_suite", "import benchmarks.suites.dist_cost"),
                         ("envelope_machine", "from benchmarks import envelope; envelope.machine()"),
                         ("autocast_state", "from pytest_gradckpt.pipeline.process_state import _autocast_state; "
                                            "_autocast_state()"),
                         ("warm_up", "from pytest_gradckpt.strategies.checkpoint_functions import warm_up; warm_up()")):
        facts[f"fork_after_{name}"] = _fork_probe(before)
    if "--fork-only" in sys.argv:  # the fork probes alone take seconds; the builds below a minute
        print(json.dumps(facts), flush=True)
        return 0
    facts["python_import_torch"] = _timed_python("import torch")
    facts["python_import_torch_transformers_gradckpt"] = _timed_python(
        "import torch, transformers, pytest_gradckpt; from transformers import LlamaForCausalLM")
    facts["python_import_all_plus_cuda_init"] = _timed_python(
        "import torch, transformers, pytest_gradckpt; from transformers import LlamaForCausalLM; "
        "torch.ones(1, device='cuda').sum().item()")
    build = ("import time, torch; torch.set_num_threads({n}); from benchmarks.common import build; "
             "torch.cuda.is_available(); t = time.perf_counter(); build('1b', False, {where!r}); "
             "print(time.perf_counter() - t)")
    for name, n, where in (("build_1b_cpu_1_thread", 1, "cpu"), ("build_1b_cpu_all_threads", os.cpu_count(), "cpu"),
                           ("build_1b_gpu", 1, "gpu")):
        out = subprocess.run([sys.executable, "-c", build.format(n=n, where=where)], capture_output=True, text=True,
                             timeout=300)
        facts[name] = out.stdout.strip()[-40:] or out.stderr[-300:]
    nccl = ("import time, torch, torch.distributed as d, tempfile, os; torch.cuda.set_device(0); "
            "torch.ones(1, device='cuda'); t = time.perf_counter(); "
            "d.init_process_group('nccl', init_method='file://' + os.path.join(tempfile.mkdtemp(), 's'), rank=0, "
            "world_size=1); x = torch.ones(4, device='cuda'); d.all_reduce(x); torch.cuda.synchronize(); "
            "print(time.perf_counter() - t); d.destroy_process_group()")
    out = subprocess.run([sys.executable, "-c", nccl], capture_output=True, text=True, timeout=300)
    facts["nccl_init_world_1"] = out.stdout.strip()[-40:] or out.stderr[-300:]
    print(json.dumps(facts), flush=True)
    folder = os.environ.get("OUT")
    if folder:
        with open(os.path.join(folder, "dist-start-facts.json"), "w") as handle:
            json.dump(facts, handle, indent=1)
    return 0


if __name__ == "__main__":
    multiprocessing.set_start_method("fork", force=True)
    sys.exit(main())
