"""Regional compile on transformers <= 5.22 (issue 31): where the switch's checkpoint sits, plain
torch against the check. A 3-layer Llama with attention dropout 0.2 on the CPU, regional
(``layers[i] = torch.compile(layer)``) and per block (``layer.compile()``); the switch with
``use_reentrant=False``, and with ``preserve_rng_state=False`` too. Prints one JSON line per part.

    PYTHONPATH=<a folder holding transformers 5.22> python -m benchmarks.evidence.regional_call_placement [backend]
"""

from __future__ import annotations

import copy
import json
import sys
import time
from typing import Any

import torch
import transformers

import pytest_gradckpt as gc
from pytest_gradckpt.strategies.base import Strategy, Units

BACKEND = sys.argv[1] if len(sys.argv) > 1 else "aot_eager"
NOT_PRESERVED = {"use_reentrant": False, "preserve_rng_state": False}


def llama() -> Any:
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      attention_dropout=0.2)
    config.use_cache = False
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager").train()


EAGER = llama()
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
INPUTS = {"input_ids": IDS, "labels": IDS}


def compiled(how: str) -> Any:
    model = copy.deepcopy(EAGER)
    for index, layer in enumerate(model.model.layers):
        if how == "regional":
            model.model.layers[index] = torch.compile(layer, backend=BACKEND)
        else:
            layer.compile(backend=BACKEND)
    return model


def grads(how: str, kwargs: dict[str, Any] | None) -> torch.Tensor:
    torch._dynamo.reset()
    model = compiled(how)
    if kwargs is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    torch.manual_seed(0)
    model(**INPUTS).loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class SwitchRngNotPreserved(Strategy):
    """The switch with ``preserve_rng_state=False``."""

    name, description, units, recomputes = "hf_rng_not_preserved", "switch, preserve_rng_state=False", Units.OWN, True

    def apply(self, info: Any) -> None:
        info.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=NOT_PRESERVED)


def main() -> None:
    plain = {}
    for how in ("regional", "per_block"):
        base = grads(how, None)
        plain[how] = {"noise": relative(grads(how, None), base),
                      "hf_non_reentrant": relative(grads(how, {"use_reentrant": False}), base),
                      "hf_rng_not_preserved": relative(grads(how, NOT_PRESERVED), base)}
    print(json.dumps({"transformers": transformers.__version__, "backend": BACKEND, "plain": plain}), flush=True)
    for how in ("regional", "per_block"):
        started = time.perf_counter()
        report = gc.check(compiled(how), INPUTS, strategies=["hf_non_reentrant", SwitchRngNotPreserved()])
        print(json.dumps({"how": how, "check": {r.strategy: [r.outcome, r.message[:160]] for r in report.results},
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    main()
