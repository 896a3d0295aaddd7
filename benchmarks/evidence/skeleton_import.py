"""What the checking process pays the first time it reads a skeleton (issue 30): when the ranks build
the model, rank 0 pickles its meta-tensor skeleton and this process unpickles it. Unpickling imports
the modules the model's classes live in, so in a process that has not imported them (the benchmarks'
parent: the factory imports transformers inside the rank) the first check pays that import.

The 1.1B Llama shape's skeleton, built on ``meta``, unpickled in fresh interpreters with and without
``transformers.models.llama.modeling_llama`` imported first; nothing but torch, transformers and
:func:`pytest_gradckpt.ranks.rank_group.skeleton` (the function the ranks use).

    python -m benchmarks.evidence.skeleton_import [--repeats N] [--out FILE]

Writes the rows in the runner's envelope (``benchmarks/envelope.py``: commit, machine, versions) to
``FILE`` (default: stdout), each row also printed as it is found.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.envelope import envelope

CHILD = """
import pickle, sys, time
started = time.perf_counter(); import torch; torch_seconds = time.perf_counter() - started
started = time.perf_counter()
if sys.argv[2] == "imported first":
    import transformers.models.llama.modeling_llama
imported = time.perf_counter() - started
started = time.perf_counter(); pickle.loads(open(sys.argv[1], "rb").read()); unpickled = time.perf_counter() - started
print(round(torch_seconds, 3), round(imported, 3), round(unpickled, 3))
"""


def skeleton_file() -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from pytest_gradckpt.ranks.rank_group import skeleton

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    handle, path = tempfile.mkstemp(suffix=".pkl")
    with os.fdopen(handle, "wb") as file:
        file.write(skeleton(model))
    return path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="the envelope's file (default: stdout)")
    args = parser.parse_args()
    path = skeleton_file()
    environment = dict(os.environ, HF_HUB_OFFLINE="1")
    rows = []
    for _ in range(args.repeats):
        for mode in ("not imported", "imported first"):
            out = subprocess.run([sys.executable, "-c", CHILD, path, mode], capture_output=True, text=True,
                                 env=environment, check=True).stdout.split()
            rows.append({"transformers": mode, "skeleton_bytes": os.path.getsize(path), "import_torch": float(out[0]),
                         "import_llama_module": float(out[1]), "unpickle": float(out[2])})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    os.unlink(path)
    document = json.dumps(envelope("evidence/skeleton_import", "1b-llama", {"repeats": args.repeats}, rows), indent=1)
    if args.out:
        Path(args.out).write_text(document + "\n")
    else:
        print(document)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
