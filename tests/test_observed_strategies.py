"""User-written whole-model strategies need no flags: which modules re-ran in backward, and
where saved activations went, are observed. Each verdict here has ground truth computed in a
few lines of plain torch/diffusers, never by the engine; ``units``/``recomputes`` stay
optional overrides, and a strategy that never checkpoints is still ``not_applied``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    apply_activation_checkpointing, offload_wrapper)

import pytest_gradckpt as gc

pytest.importorskip("transformers")
pytest.importorskip("peft")

from transformers.models.llama.modeling_llama import LlamaDecoderLayer  # noqa: E402

from pytest_gradckpt.zoo.peft_models import llama_lora  # noqa: E402
from tests.test_third_party import plain_torch_gradients, tiny_llama  # noqa: E402


class OffloadAsWritten(gc.Strategy):
    """What a user writes: torch's offload_wrapper on every decoder layer, and nothing else."""

    name = "offload_as_written"

    def apply(self, info):
        apply_activation_checkpointing(info.model, checkpoint_wrapper_fn=offload_wrapper,
                                       check_fn=lambda m: isinstance(m, LlamaDecoderLayer))


class DoesNothing(gc.Strategy):
    name = "does_nothing"

    def apply(self, info):
        pass


@pytest.mark.parametrize("build", [tiny_llama, llama_lora], ids=["llama", "lora"])
def test_offload_wrapper_strategy_without_flags_passes(build):
    model, inputs = build()
    truth, offloaded = plain_torch_gradients(model, inputs), plain_torch_gradients(model, inputs, offload_wrapper)
    for name in truth:  # ground truth: offloading changes no gradient
        torch.testing.assert_close(offloaded[name], truth[name], rtol=1.3e-6, atol=1e-5)
    report = gc.check(model, inputs, strategies=[OffloadAsWritten()])
    [result] = report.results
    assert result.outcome == "pass", report.table()
    assert result.metrics["recomputed_units"] == []  # nothing re-ran ...
    assert result.metrics["saved_elsewhere_units"] == report.baseline["layers"]  # ... every layer offloaded
    assert result.metrics["activation_reduction"] > 0.5


def test_overrides_stay_an_offload_strategy_declared_recomputing_is_not_applied():
    model, inputs = tiny_llama()

    class DeclaredRecomputing(OffloadAsWritten):
        name, recomputes = "declared_recomputing", True

    [result] = gc.check(model, inputs, strategies=[DeclaredRecomputing()]).results
    assert result.outcome == "not_applied", result.message


def test_a_strategy_that_never_checkpoints_is_not_applied_without_flags():
    model, inputs = tiny_llama()
    [result] = gc.check(model, inputs, strategies=[DoesNothing()]).results
    assert result.outcome == "not_applied"
    assert "no layer was recomputed" in result.message
    assert result.metrics["saved_elsewhere_units"] == []


def test_a_strategy_that_detaches_is_still_caught_without_flags():
    # Observation must not excuse a broken strategy: a wrapper that cuts the graph loses gradients.
    model, inputs = tiny_llama()

    class Cutting(gc.Strategy):
        name = "cutting"

        def apply(self, info):
            def detach(module, args, output):
                return output.detach() if torch.is_tensor(output) else (output[0].detach(), *output[1:])

            for layer in info.layers:
                layer.register_forward_hook(detach)

    [result] = gc.check(model, inputs, strategies=[Cutting()]).results
    assert result.outcome in ("silent", "mismatch"), result.message


# --------------------------------------------------------------------------- diffusers


def _unet():
    pytest.importorskip("diffusers")
    from pytest_gradckpt.zoo.diffusers_models import unet_2d

    try:
        return unet_2d()
    except Exception as error:  # noqa: BLE001 - diffusers beside an incompatible hub
        pytest.skip(f"diffusers cannot build UNet2DModel here: {error}")


def unet_loss(output, inputs):
    return output.sample.float().square().mean()


class DiffusersSwitch(gc.Strategy):
    """What a user writes: the model's own switch, called on the whole model."""

    name = "diffusers_switch"

    def apply(self, info):
        info.model.enable_gradient_checkpointing()


def test_diffusers_switch_strategy_without_flags_passes_and_chosen_units_override_stays():
    unet, inputs = _unet()

    def gradients(enable):
        model = copy.deepcopy(unet).train()
        if enable:
            model.enable_gradient_checkpointing()
        torch.manual_seed(0)
        unet_loss(model(**inputs), inputs).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    truth, checkpointed = gradients(False), gradients(True)
    for name in truth:  # ground truth: diffusers' own checkpointing is correct on UNet2DModel
        torch.testing.assert_close(checkpointed[name], truth[name], rtol=1.3e-6, atol=1e-5)

    class HeldToChosenUnits(DiffusersSwitch):
        name, units = "held_to_chosen_units", "chosen"

    report = gc.check(unet, inputs, loss=unet_loss, strategies=[DiffusersSwitch(), HeldToChosenUnits()])
    observed, chosen = report.results
    assert observed.outcome == "pass", report.table()
    assert observed.metrics["recomputed_units"]  # diffusers' own units (resnets, attentions), observed
    # The override still means what it says: held to the engine's units, which diffusers does not wrap whole.
    assert chosen.outcome == "recompute" and "down_blocks.0 ran 1 time(s), expected 2" in chosen.message
