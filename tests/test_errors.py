"""Every bad input gets a message naming the argument, the value and the fix."""

from __future__ import annotations

import os

import pytest
import torch

import pytest_gradckpt as gc
from pytest_gradckpt.zoo import plain
from tests.models import TwoBlocks


@pytest.fixture
def tanh():
    return plain.tanh_net()


class NonFinite(TwoBlocks):
    def finish(self, hidden):
        return hidden * float("inf")


class Unreproducible(TwoBlocks):
    """Draws noise from the operating system, outside torch's seeded generator."""

    def finish(self, hidden):
        return hidden * (1 + int.from_bytes(os.urandom(2), "little") / 65536)


@pytest.mark.parametrize(("call", "message"), [
    (lambda m, x: gc.check(42, x), "model=42: expected an nn.Module or a zero-argument factory returning one"),
    (lambda m, x: gc.check(lambda: "not a model", x), "returned 'not a model'; it must return a new nn.Module"),
    (lambda m, x: gc.check(m, {"wrong": x}), "the model fails without checkpointing (TypeError"),
    (lambda m, x: gc.check(m, torch.randn(4, 7)), "check that the inputs fit TanhNet.forward"),
    (lambda m, x: gc.check(m, "text"), "inputs='text': expected a mapping of keyword arguments"),
    (lambda m, x: gc.check(m, [1, 2]), "inputs contain no tensor (int, int)"),
    (lambda m, x: gc.check(m, x, loss=lambda out, inp: out), "loss must return a scalar floating-point tensor, "
                                                            "got (4, 4); reduce it"),
    (lambda m, x: gc.check(m, x, loss="mse"), "loss='mse': expected a callable(output, inputs)"),
    (lambda m, x: gc.check(m, x, strategies=["fast"]), "unknown strategy 'fast'; available: reentrant"),
    (lambda m, x: gc.check(m, x, strategies=[]), "strategies is empty"),
    (lambda m, x: gc.check(m, x, scenarios=["upside_down"]), "unknown scenario 'upside_down'; available: train"),
    (lambda m, x: gc.check(m, x, layers="decoder.layers"), "layers='decoder.layers': TanhNet has no submodule at "
                                                          "that path; top-level children are: stem, blocks, head"),
    (lambda m, x: gc.check(m, x, layers=torch.nn.Conv2d), "layers=Conv2d: no submodule of TanhNet is an instance"),
    (lambda m, x: gc.check(torch.nn.Linear(16, 4), x), "found no repeated layers in Linear"),
    (lambda m, x: gc.check(m.requires_grad_(False), x), "TanhNet has no trainable parameters"),
    (lambda m, x: gc.check(NonFinite(), torch.ones(2, 4)), "baseline loss under train is inf, not finite"),
    (lambda m, x: gc.check(m, x, min_memory_reduction=1.0), "min_memory_reduction=1.0 is out of range; "
                                                            "pass a fraction in [0, 1)"),
    (lambda m, x: gc.check(m, x, rtol=-1), "rtol=-1 is not a usable tolerance"),
    (lambda m, x: gc.check(m, x, timeout=0), "timeout=0: pass a positive number of seconds"),
    (lambda m, x: gc.check(m, x, device="tpu"), "device='tpu': not a device"),
])
def test_bad_input_message(tanh, call, message):
    model, inputs = tanh
    with pytest.raises(gc.GradckptUsageError) as raised:
        call(model, inputs)
    assert message in str(raised.value)


def test_cuda_device_without_cuda_is_explained(tanh):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(gc.GradckptUsageError, match="CUDA is not available here"):
        gc.check(*tanh, device="cuda")


def test_unreproducible_model_is_not_blamed_on_strategies():
    report = gc.check(Unreproducible(), torch.ones(2, 4), strategies=["non_reentrant", "reentrant"])
    assert {r.outcome for r in report.results} == {"error"}
    assert all("not judged: the model is not reproducible" in r.message for r in report.results)
    assert report.baseline["train"]["judged"] is False
    assert not report.passed


def test_scenario_that_does_not_apply_is_skipped_with_reason(tanh):
    report = gc.check(*tanh, strategies=["non_reentrant"], scenarios=["frozen_inputs"])
    assert report.results[0].outcome == "skipped"
    assert "no input embedding" in report.results[0].message


def test_same_report_ten_times():
    def stable(report):
        return [(r.strategy, r.scenario, r.outcome, r.message, r.metrics.get("max_grad_diff"),
                 r.metrics.get("activation_bytes"), r.metrics.get("layer_calls")) for r in report.results]

    model, inputs = plain.dropout_mask_net()
    first = stable(gc.check(model, inputs, scenarios=["train", "frozen_inputs"]))
    for _ in range(9):
        assert stable(gc.check(model, inputs, scenarios=["train", "frozen_inputs"])) == first
