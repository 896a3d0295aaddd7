"""Unsloth's ``use_gradient_checkpointing="unsloth"`` built-in where it cannot run: CI has no GPU and
no Unsloth, so the built-in must say ``skipped`` with the reason, and never pass, fail or error.
(Its verdicts where it runs, with plain-transformers ground truth, come from an H200:
``tests/gpu/campaigns/unsloth_gpu.py``, ``benchmarks/results/unsloth-gpu-2026-12-01.json``.)"""

from __future__ import annotations

import importlib.util
import types

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import pytest_gradckpt as gc  # noqa: E402
from pytest_gradckpt.strategies import unsloth  # noqa: E402
from pytest_gradckpt.zoo.peft_models import llama_lora  # noqa: E402


@pytest.mark.skipif(importlib.util.find_spec("unsloth_zoo") is not None, reason="Unsloth is installed here")
def test_absent_unsloth_is_skipped_with_its_reason():
    with pytest.raises(ImportError, match=r"Unsloth is not installed \(pip install unsloth unsloth_zoo"):
        unsloth.checkpointing_module()
    model, inputs = llama_lora()
    [result] = gc.check(model, inputs, strategies=unsloth.STRATEGIES).results
    assert (result.strategy, result.outcome) == ("unsloth_gc", "skipped")
    assert result.message.startswith("Unsloth is not installed")


def test_unsloth_off_cuda_is_skipped_with_its_reason(monkeypatch):
    # only the import is stood in for: the reason must come from the model's device, not from Unsloth's code
    monkeypatch.setattr(unsloth, "checkpointing_module", lambda: types.SimpleNamespace())
    model, inputs = llama_lora()
    [result] = gc.check(model, inputs, strategies=unsloth.STRATEGIES, device="cpu").results
    assert result.outcome == "skipped"
    assert result.message == "Unsloth's checkpointing keeps its offload buffers on CUDA: it runs on CUDA only"

