"""Who, in a checking process, first asks the CUDA runtime anything (issue 30): after that call a
forked GPU rank cannot use CUDA, so the check's ranks are spawned instead of forked.

Runs ``python -m benchmarks <args>`` with spies on ``torch._C._cuda_getDeviceCount`` (what
``torch.cuda.is_available()`` asks; it arms torch's fork poison) and ``torch.cuda._lazy_init``, in
this process only (forked ranks are not counted), and writes every distinct call stack with its
count to ``$OUT/cuda-first-touch.json`` (or prints it). The spies call through: what runs is the
suite as given.

    python -m benchmarks.evidence.cuda_first_touch dist-cost --case 1b-lora-fsdp2 --set factory=gpu --repeats 2
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.runner import main as run_benchmarks

TOUCHES: list[dict[str, Any]] = []


def _where() -> list[str]:
    frames = [f for f in traceback.extract_stack()[:-2] if "importlib" not in f.filename]
    return [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in frames[-14:]]


def _spy(owner: Any, name: str) -> None:
    original: Callable[..., Any] | None = getattr(owner, name, None)
    if original is None:
        return
    parent = os.getpid()

    def spied(*args: Any, **kwargs: Any) -> Any:
        if os.getpid() == parent:
            stack = _where()
            for seen in TOUCHES:
                if seen["what"] == name and seen["stack"] == stack:
                    seen["count"] += 1
                    break
            else:
                TOUCHES.append({"what": name, "order": len(TOUCHES), "count": 1, "stack": stack})
        return original(*args, **kwargs)

    setattr(owner, name, spied)


def main(argv: list[str]) -> int:
    _spy(torch._C, "_cuda_getDeviceCount")
    _spy(torch.cuda, "_lazy_init")
    _spy(torch.cuda, "is_available")  # also seen on a CPU build, where the runtime call does not exist
    status = run_benchmarks(argv)
    found = {"argv": argv, "status": status, "touches": TOUCHES}
    folder = os.environ.get("OUT")
    if folder:
        with open(os.path.join(folder, "cuda-first-touch.json"), "w") as handle:
            json.dump(found, handle, indent=1)
    print(json.dumps(found)[:6000], flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
