"""Issue 21's FSDP2 gate, written the way a user writes it (run it explicitly; not collected by
``make test``)::

    torchrun --nproc-per-node 2 -m pytest -p no:cacheprovider -o addopts= --gradckpt tests/gpu/campaigns/dist_gate.py
    GATE_FACTORY=gpu torchrun --nproc-per-node 2 -m pytest -p no:cacheprovider -o addopts= --gradckpt tests/gpu/campaigns/dist_gate.py
    python -m pytest -p no:cacheprovider -o addopts= --gradckpt tests/gpu/campaigns/dist_gate.py   # self-started ranks

``GATE_FACTORY``: ``cpu`` (default, as most users build), ``gpu`` (the rank's GPU) or ``meta``;
``GATE_SIZE``: ``1b`` (default) or ``tiny`` (a two-layer Llama: the same gate on CPU with gloo,
``--gradckpt-device=cpu``); ``GATE_WORLD``: how many ranks a self-started check starts (default 2;
``1`` on one GPU).
"""

import os

import pytest
import torch

SHAPES = {"1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                     num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
          "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=32000, max_position_embeddings=4096)}


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[os.environ.get("GATE_SIZE", "1b")])
    cfg.use_cache = False
    torch.manual_seed(0)
    where = os.environ.get("GATE_FACTORY", "cpu")
    device = {"cpu": "cpu", "meta": "meta"}.get(where) or f"cuda:{torch.cuda.current_device()}"
    with torch.device(device):
        return LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.gradckpt(strategies=["non_reentrant", "hf_non_reentrant", "selective"], scenarios=["fsdp2"],
                      min_cuda_memory_reduction=0.3 if DEVICE == "cuda" else None)
def test_fsdp2_checkpointing(gradckpt):
    length = 2048 if os.environ.get("GATE_SIZE", "1b") == "1b" else 128
    ids = torch.randint(0, 32000, (2, length), generator=torch.Generator().manual_seed(1))
    world = {"distributed": {"world_size": int(os.environ["GATE_WORLD"])}} if "GATE_WORLD" in os.environ else {}
    gradckpt.check(llama, {"input_ids": ids, "labels": ids}, device=DEVICE, **world)
