"""Planted faults under torch.compile on a CUDA GPU: the 1.1B Llama shape (bf16, sdpa, attention
dropout 0.1, 2 x 2048 tokens) with every decoder layer compiled (``layer.compile()``, inductor), in
both orders: checkpoints around the compiled blocks (``checkpoint_outside``) and checkpoints inside
them (``compile_outside``). Each check holds a correct strategy beside the faults of
``tests/mutations.py``, so one run shows both that correct checkpointing passes and that each
fault is caught.

``python -m tests.gpu.campaigns.compile_faults_gpu [--smoke]`` (run by tests/gpu/test_campaigns.py); writes ``compile-faults-<device>-<date>.json``
to ``$OUT`` or ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

import pytest_gradckpt as gc
from tests import mutations

ROOT = Path(__file__).resolve().parents[3]

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000)
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512)
#: (order, strategies): a correct one first, then the faults that order can hold.
CASES = [
    ("checkpoint_outside", ["non_reentrant", mutations.rng_not_preserved, mutations.gradient_three_percent_off,
                            mutations.output_detached]),
    ("compile_outside", ["non_reentrant", mutations.gradient_three_percent_off, mutations.sac_saving_everything,
                         mutations.not_checkpointing]),
]


def per_block_llama(shape: dict[str, Any], device: str, dtype: torch.dtype, backend: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, attention_dropout=0.1, max_position_embeddings=4096)
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa")
    for layer in model.model.layers:
        layer.compile(backend=backend)
    return model


def as_strategy(entry: Any) -> Any:
    return entry if isinstance(entry, str) else gc.Strategy.from_checkpoint_fn(entry.__name__, entry)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU with aot_eager")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    backend = "aot_eager" if args.smoke else "inductor"
    shape = SMOKE if args.smoke else SHAPE
    length = 64 if args.smoke else 2048
    ids = torch.randint(0, shape["vocab_size"], (2, length), generator=torch.Generator().manual_seed(1)).to(device)
    inputs = {"input_ids": ids, "labels": ids}
    rows = []
    for order, strategies in CASES:
        model = per_block_llama(shape, device, dtype, backend)
        started = time.perf_counter()
        report = gc.check(model, inputs, strategies=[as_strategy(s) for s in strategies], device=device,
                          compile_order=order)
        seconds = round(time.perf_counter() - started, 1)
        rows.append({"compile": "per_block", "order": order, "seconds": seconds,
                     "compile_distance": report.baseline.get("train", {}).get("compile_distance"),
                     "outcomes": {r.strategy: r.outcome for r in report.results},
                     "messages": {r.strategy: r.message[:300] for r in report.results}})
        print(json.dumps(rows[-1], indent=1), flush=True)
        del model, report
        torch.cuda.empty_cache() if device == "cuda" else None
    name = torch.cuda.get_device_name().replace("NVIDIA ", "").lower() if device == "cuda" else "cpu"
    document = {"device": name, "torch": torch.__version__, "shape": shape, "dtype": str(dtype),
                "tokens": [2, length], "backend": backend, "attention_dropout": 0.1, "rows": rows}
    out = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    path = out / f"compile-faults-{name}-{datetime.date.today()}.json"
    path.write_text(json.dumps(document, indent=1, default=str))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
