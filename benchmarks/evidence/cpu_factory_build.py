"""Where the 1.1B CPU-built factory's time goes (bf16 direct, as the benchmark builds) against fp32 then cast.

Ran on one H200 host (16 cores) as ``PYTHONPATH=. python3 .gpu/cpubuild.py <mode> 16``, one process per
mode: ``normal`` (torch's ``normal_`` over the model's 1.1B elements alone, bf16 then fp32), ``bf16``
(``benchmarks.common.llama`` on the CPU in bf16, as the ``dist-cost`` CPU factory builds), ``fp32cast``
(the same in fp32, then cast to bf16). Result: ``results/cpu-factory-build-NVIDIA-H200-2026-12-03.json``
(issue 30). Frozen here with its statements one per line for ruff; what it runs is unchanged.
"""

import cProfile
import io
import json
import pstats
import sys
import time

import torch

from benchmarks.common import llama, shape


def main() -> None:
    mode = sys.argv[1]
    torch.set_num_threads(int(sys.argv[2]))
    profile = cProfile.Profile()
    started = time.perf_counter()
    profile.enable()
    if mode == "bf16":
        llama(shape("1b"), "cpu", torch.bfloat16)
    elif mode == "fp32cast":
        llama(shape("1b"), "cpu", torch.float32).to(torch.bfloat16)
    elif mode == "normal":  # plain torch: 1.1B bf16 normal_ fills alone
        count = sum(p.numel() for p in llama(shape("1b"), "meta", torch.bfloat16).parameters())
        started = time.perf_counter()
        torch.empty(count, dtype=torch.bfloat16).normal_(0, 0.02)
        fp32 = torch.empty(count, dtype=torch.float32)
        middle = time.perf_counter()
        fp32.normal_(0, 0.02)
        print(json.dumps({"mode": mode, "bf16_normal_s": round(middle - started, 2),
                          "fp32_normal_s": round(time.perf_counter() - middle, 2)}))
        return
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(14)
    print(json.dumps({"mode": mode, "threads": torch.get_num_threads(),
                      "seconds": round(time.perf_counter() - started, 2)}))
    print(text.getvalue()[-3500:])


if __name__ == "__main__":
    main()
