"""LLaMA-Factory's own checkpointing (``prepare_model_for_training``), run from its code, judged
against plain transformers: on a release it supports (<= 5.6) it must pass, on 5.23 (outside its
range: transformers now checkpoints ``partial(forward, layer)``, and LLaMA-Factory 0.9.5 reads
``func.func.__self__``) plain transformers raises, and so must the verdict say."""

from __future__ import annotations

import copy
import types

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import transformers  # noqa: E402
from packaging.version import Version  # noqa: E402

import pytest_gradckpt as gc  # noqa: E402
from pytest_gradckpt.strategies import llamafactory  # noqa: E402
from pytest_gradckpt.zoo.peft_models import llama_lora  # noqa: E402


def _module():
    try:
        return llamafactory.checkpointing_module()
    except ImportError as error:
        pytest.skip(str(error))


def _plain(model, inputs, enable):
    """Ground truth: the step in plain transformers, after LLaMA-Factory's own preparation."""
    model = copy.deepcopy(model).train()
    if enable:
        _module().prepare_model_for_training(model.get_base_model(), types.SimpleNamespace(
            upcast_layernorm=False, upcast_lmhead_output=False, disable_gradient_checkpointing=False,
            use_unsloth_gc=False, use_reentrant_gc=True))
    torch.manual_seed(0)
    model(**inputs).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_llamafactory_checkpointing_on_lora_follows_plain_transformers():
    _module()
    model, inputs = llama_lora()
    report = gc.check(model, inputs, strategies=llamafactory.STRATEGIES)
    by = {r.strategy: r for r in report.results}
    assert by["llamafactory_unsloth_gc"].outcome == "skipped"  # CPU here; its backward moves to "cuda"
    assert "CUDA only" in by["llamafactory_unsloth_gc"].message
    if Version(transformers.__version__) > Version("5.6.0"):
        with pytest.raises(AttributeError, match="__self__"):
            _plain(model, inputs, True)
        assert by["llamafactory_gc"].outcome == "error"
        assert "has no attribute '__self__'" in by["llamafactory_gc"].message
    else:
        truth, checkpointed = _plain(model, inputs, False), _plain(model, inputs, True)
        for name in truth:
            torch.testing.assert_close(checkpointed[name], truth[name], rtol=1.3e-6, atol=1e-5)
        assert by["llamafactory_gc"].outcome == "pass", by["llamafactory_gc"].message
        assert by["llamafactory_gc_non_reentrant"].outcome == "pass"


def test_absent_llamafactory_is_skipped_with_its_reason(monkeypatch):
    def absent():
        raise ImportError("LLaMA-Factory is not installed (pip install llamafactory)")

    monkeypatch.setattr(llamafactory, "checkpointing_module", absent)
    model, inputs = llama_lora()
    report = gc.check(model, inputs, strategies=llamafactory.STRATEGIES[:1])
    assert [(r.outcome, r.message) for r in report.results] == [
        ("skipped", "LLaMA-Factory is not installed (pip install llamafactory)")]
