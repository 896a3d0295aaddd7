"""The engine on a tiny transformers Llama with PEFT LoRA: real hazards, real verdicts."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import pytest_gradckpt as gc  # noqa: E402
from pytest_gradckpt.zoo.peft_models import llama_lora  # noqa: E402
from tests import mutations  # noqa: E402


@pytest.fixture(scope="module")
def lora():
    return llama_lora()


@pytest.fixture(scope="module")
def lora_with_head():
    return llama_lora(modules_to_save=True)


@pytest.fixture(scope="module")
def lora_report(lora):
    model, inputs = lora
    return gc.check(model, inputs)


def outcomes_of(report):
    return {r.strategy: r.outcome for r in report.results}


def test_every_builtin_strategy_gets_the_known_verdict_on_lora(lora_report):
    assert outcomes_of(lora_report) == {
        "reentrant": "silent",  # frozen embeddings: reentrant loses every LoRA gradient
        "non_reentrant": "pass", "hf_reentrant": "pass", "hf_non_reentrant": "pass", "selective": "pass",
        "offload": "pass", "sac": "pass", "sequential": "pass",
        "torch_wrapper": "pass", "torch_wrapper_reentrant": "silent",  # torch's wrapper: the same reentrant hazard
        "torch_offload_wrapper": "pass", "native": "pass"}


def test_non_reentrant_need_not_recompute_the_frozen_layer(lora_report):
    (result,) = [r for r in lora_report.results if r.strategy == "non_reentrant"]
    calls = result.metrics["layer_calls"]
    assert calls["base_model.model.model.layers.0"] == 1  # backward never reaches it
    assert calls["base_model.model.model.layers.1"] == 2


def test_selective_skips_the_frozen_layer_and_saves_memory(lora_report):
    (result,) = [r for r in lora_report.results if r.strategy == "selective"]
    assert result.metrics["layer_calls"]["base_model.model.model.layers.0"] == 1
    assert result.metrics["activation_reduction"] > 0.3


def test_reentrant_with_modules_to_save_loses_lora_gradients_silently(lora_with_head):
    model, inputs = lora_with_head
    (result,) = gc.check(model, inputs, strategies=["reentrant"]).results
    assert result.outcome == "silent"
    assert "None of the inputs have requires_grad=True" in result.message


def test_custom_function_meets_transformers_calling_convention(lora):
    seen = []

    def spy(function, *args, **kwargs):
        seen.append(gc.layer_of(function))
        return mutations.correct(function, *args)

    model, inputs = lora
    (result,) = gc.check(model, inputs, strategies=[gc.Strategy.from_checkpoint_fn("spy", spy)]).results
    assert result.outcome == "pass", result.message
    assert seen and all(type(layer).__name__ == "LlamaDecoderLayer" for layer in seen)


@pytest.mark.parametrize(("fn", "outcome"), [
    (mutations.rng_not_preserved, "mismatch"),  # LoRA dropout masks redrawn
    (mutations.kwargs_dropped, "error"),  # position embeddings are keyword arguments
    (mutations.not_checkpointing, "not_applied"),
    (mutations.selective_forgetting_input_grads, "silent"),
])
def test_broken_functions_on_lora(lora, fn, outcome):
    model, inputs = lora
    strategy = gc.Strategy.from_checkpoint_fn(fn.__name__, fn)
    (result,) = gc.check(model, inputs, strategies=[strategy]).results
    assert result.outcome == outcome, result.message


def test_transformers_checkpointing_is_off_in_eval_mode(lora):
    model, inputs = lora
    report = gc.check(model, inputs, strategies=["hf_non_reentrant", "sequential"], scenarios=["eval_mode"])
    assert outcomes_of(report) == {"hf_non_reentrant": "not_applied", "sequential": "pass"}
