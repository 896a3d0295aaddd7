"""Why the check's compile distance is large under whole-model compile on CUDA (docs/compile.md,
"An open finding"): plain torch, a small Llama (hidden 256, 2 layers, bf16, sdpa, attention dropout
0.1, 2 x 256 tokens) compiled whole with inductor, random ops drawn as eager; compiled vs eager step
(largest relative error norm over logits and gradients) with deterministic algorithms off and on,
then the check's own compile distance on the same model.

``python -m benchmarks.evidence.compile_determinism_gpu`` (CUDA); prints one JSON line.
"""

from __future__ import annotations

import json
import os

import torch

from benchmarks.suites import compile_truth as ct

SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1024)


def main() -> int:
    import pytest_gradckpt as gc

    ids = ct.tokens(SHAPE, 256, "cuda")
    model = ct.build(SHAPE, "cuda", torch.bfloat16)
    found = {}
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        compiled_step = ct.plain_step(model, ids, "whole", "inductor")
        eager_step = ct.plain_step(model, ids, "eager", "inductor")
        found[f"deterministic={deterministic}"] = {"d_BE": ct.distance(compiled_step, eager_step)}
    torch.use_deterministic_algorithms(False)
    report = gc.check(torch.compile(model, backend="inductor"), {"input_ids": ids, "labels": ids},
                      strategies=["non_reentrant"], device="cuda")
    found["check_compile_distance"] = report.baseline["train"].get("compile_distance")
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
