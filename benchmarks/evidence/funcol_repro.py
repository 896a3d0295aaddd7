"""Plain-torch look for issue 21's crash: SIGSEGV in ``AsyncCollectiveTensor.__new__`` (reached from
``_c10d_functional::_wrap_tensor_autograd``) when full FSDP2 gradients of a 1.1B bf16 Llama are
read with ``DTensor.full_tensor()`` in a torchrun process, as the plugin used to do.

Nothing of pytest-gradckpt is imported. Each variant runs in its own torchrun launch, so a crash
is seen as the launch's exit status instead of ending this script:

    python -m benchmarks.evidence.funcol_repro [--nproc 1] [--size 1b|tiny] [--variants full_tensor:1,all_gather:1]

Variants: gradients read with ``full_tensor()`` (functional collectives) or with a plain
``all_gather`` of the dimension-0 shards (what the plugin does now), each with
``torch.use_deterministic_algorithms`` off and on (a check on CUDA switches it on; spawned
ranks never had it, torchrun ranks run inside the checking process and do). Writes
``funcol-repro-<device>-x<N>-<date>.json`` to ``$OUT`` or ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {"1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                     num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
          "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)}


def rank_main(size: str, read: str, deterministic: bool) -> None:
    """One FSDP2 step of the Llama on this rank, then every gradient read whole."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    if deterministic:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        torch.use_deterministic_algorithms(True)
    cfg = LlamaConfig(**SHAPES[size])
    cfg.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ids = torch.randint(0, cfg.vocab_size, (1, 2048 if size == "1b" else 32), device=device,
                        generator=torch.Generator(device).manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    total = 0.0
    for param in model.parameters():
        grad = param.grad
        if read == "full_tensor":
            whole = grad.full_tensor()
        else:
            local, world = grad._local_tensor, dist.get_world_size()
            chunk = math.ceil(grad.shape[0] / world)
            padded = local.new_zeros((chunk, *grad.shape[1:]))
            padded[:local.shape[0]] = local
            pieces = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(pieces, padded)
            whole = torch.cat([p[:max(0, min(chunk, grad.shape[0] - r * chunk))] for r, p in enumerate(pieces)])
        total += float(whole.double().square().sum())
    print(f"rank {dist.get_rank()}: grad square sum {total:.6e}", flush=True)
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--size", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--variants", default="full_tensor:0,full_tensor:1,all_gather:0,all_gather:1",
                        help="read:deterministic pairs, comma separated")
    parser.add_argument("--rank", nargs=3, help=argparse.SUPPRESS)  # size read deterministic: inside torchrun
    args = parser.parse_args()
    if args.rank:
        rank_main(args.rank[0], args.rank[1], args.rank[2] == "1")
        return 0
    rows = []
    for variant in args.variants.split(","):
        read, deterministic = variant.split(":")[0], variant.split(":")[1] == "1"
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.nproc),
                               __file__, "--rank", args.size, read, str(int(deterministic))],
                              capture_output=True, text=True, timeout=600)
        tail = (done.stdout + done.stderr)[-1500:]
        rows.append({"read": read, "deterministic": deterministic, "exit_status": done.returncode,
                     "segfault": "Segmentation fault" in tail or "SIGSEGV" in tail,
                     "seconds": round(time.perf_counter() - started, 1), "tail": tail})
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "tail"}), flush=True)
    import torch

    device = torch.cuda.get_device_name().replace(" ", "-") if torch.cuda.is_available() else "cpu"
    out = Path(os.environ.get("OUT") or Path(__file__).resolve().parents[1] / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"funcol-repro-{device}-x{args.nproc}-{datetime.date.today()}.json"
    path.write_text(json.dumps({"torch": torch.__version__, "size": args.size, "rows": rows}, indent=1))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
