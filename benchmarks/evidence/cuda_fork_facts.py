"""Which first question to CUDA leaves a forked child unable to use it (issue 30, session eight): in a
fresh process per variant, import torch, ask one thing, fork, and use CUDA in the child. Plain torch;
nothing of this package is imported.

    python -m benchmarks.evidence.cuda_fork_facts            # every variant, one JSON line each
    python -m benchmarks.evidence.cuda_fork_facts is_available

Variants: ``none``, ``is_available``, ``device_count``, ``get_device_name``, ``transformers`` (its
import), each also with ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` when given as ``<variant>+nvml``.
"""

import json
import os
import subprocess
import sys
import time

VARIANTS = ["none", "is_available", "device_count", "get_device_name", "transformers", "is_available+nvml"]


def one(variant):
    import torch

    ask = {"none": lambda: None, "is_available": torch.cuda.is_available, "device_count": torch.cuda.device_count,
           "get_device_name": lambda: torch.cuda.get_device_name(0),
           "transformers": lambda: __import__("transformers") and "imported"}[variant]
    fact = {"variant": variant, "nvml_env": os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK"), "answer": str(ask()),
            "initialized": torch.cuda.is_initialized(), "threads": len(os.listdir("/proc/self/task"))}
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        child = {}
        try:
            started = time.time()
            child["child_bad_fork"] = torch.cuda._is_in_bad_fork()
            child["child_cuda"] = float((torch.ones(4, device="cuda") * 2).sum())
            child["child_seconds"] = round(time.time() - started, 3)
        except Exception as error:  # the answer sought
            child["child_error"] = f"{type(error).__name__}: {str(error)[:160]}"
        os.write(write, json.dumps(child).encode())
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 65536):
        data += chunk
    os.waitpid(pid, 0)
    fact.update(json.loads(data))
    return fact


def main():
    if len(sys.argv) > 1:
        variant = sys.argv[1]
        print(json.dumps(one(variant.removesuffix("+nvml"))))
        return
    for variant in VARIANTS:
        env = dict(os.environ, **({"PYTORCH_NVML_BASED_CUDA_CHECK": "1"} if variant.endswith("+nvml") else {}))
        out = subprocess.run([sys.executable, "-m", "benchmarks.evidence.cuda_fork_facts", variant], env=env,
                             capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
