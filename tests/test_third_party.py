"""Checkpointing code nobody here wrote: torch's own wrapper family (as torchtitan, torchtune,
accelerate and Lightning apply it) and each library's own switch, judged by identity (the
wrappers rename every parameter) and by what really ran in backward. Ground truth comes
from plain torch, computed here in a few lines, never from the engine."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (  # noqa: E402
    CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper, offload_wrapper)
from transformers import LlamaForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaDecoderLayer  # noqa: E402

import pytest_gradckpt as gc  # noqa: E402
from pytest_gradckpt.zoo.peft_models import llama_inputs, llama_lora, tiny_llama_config  # noqa: E402

WRAPPERS = {
    "no_reentrant": functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
    "reentrant": functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.REENTRANT),
    "offload": offload_wrapper,
}


class UserWrapperStrategy(gc.Strategy):
    """Exactly what a torchtitan-style user writes: one line of torch on the whole model."""

    units = "own"

    def __init__(self, impl):
        self.name, self.impl = f"user_{impl}", impl
        self.recomputes = impl != "offload"  # offload_wrapper keeps activations on the host instead

    def apply(self, info):
        apply_activation_checkpointing(info.model, checkpoint_wrapper_fn=WRAPPERS[self.impl],
                                       check_fn=lambda m: isinstance(m, LlamaDecoderLayer))


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()), llama_inputs()


def plain_torch_gradients(model, inputs, wrapper=None, freeze_embeddings=False):
    """Ground truth: one step in plain torch, optionally under torch's own wrapper."""
    model = copy.deepcopy(model)
    if freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    names = {id(p): n for n, p in model.named_parameters()}
    if wrapper is not None:
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper,
                                       check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    torch.manual_seed(0)
    model(**inputs).loss.backward()
    return {names[id(p)]: p.grad for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("build", [tiny_llama, llama_lora], ids=["llama", "lora"])
@pytest.mark.parametrize("impl", ["no_reentrant", "offload"])
def test_torch_wrappers_are_correct_and_pass(build, impl):
    model, inputs = build()
    truth, wrapped = plain_torch_gradients(model, inputs), plain_torch_gradients(model, inputs, WRAPPERS[impl])
    assert truth.keys() == wrapped.keys()
    for name in truth:  # the wrappers really are correct here
        torch.testing.assert_close(wrapped[name], truth[name], rtol=1.3e-6, atol=1e-5)
    builtin = {"no_reentrant": "torch_wrapper", "offload": "torch_offload_wrapper"}[impl]
    report = gc.check(model, inputs, strategies=[UserWrapperStrategy(impl), builtin])
    assert [r.outcome for r in report.results] == ["pass", "pass"], report.table()


def test_reentrant_wrapper_on_llama_passes_and_on_frozen_embedding_lora_is_silent():
    model, inputs = tiny_llama()
    report = gc.check(model, inputs, strategies=[UserWrapperStrategy("reentrant"), "torch_wrapper_reentrant"])
    assert [r.outcome for r in report.results] == ["pass", "pass"], report.table()

    lora, lora_inputs = llama_lora()
    assert all(g is not None for g in plain_torch_gradients(lora, lora_inputs).values())
    # Ground truth: under the reentrant wrapper no LoRA weight is reached at all (torch warns,
    # then backward finds nothing that requires grad).
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"), \
            pytest.raises(RuntimeError, match="does not require grad"):
        plain_torch_gradients(lora, lora_inputs, WRAPPERS["reentrant"])
    report = gc.check(lora, lora_inputs, strategies=[UserWrapperStrategy("reentrant"), "torch_wrapper_reentrant"])
    assert [r.outcome for r in report.results] == ["silent", "silent"], report.table()
    assert "None of the inputs have requires_grad=True" in report.results[0].message


def test_wrapper_renames_are_invisible_gradients_match_by_identity():
    model, inputs = tiny_llama()
    (result,) = gc.check(model, inputs, strategies=["torch_wrapper"]).results
    assert result.outcome == "pass"
    assert result.metrics["worst_parameter"] is None
    assert all("_checkpoint_wrapped_module" not in unit for unit in result.metrics["recomputed_units"])


def test_recomputed_units_are_what_really_ran_in_backward():
    model, inputs = tiny_llama()
    report = gc.check(model, inputs, strategies=["torch_wrapper", "torch_offload_wrapper", "native"])
    by = {r.strategy: r for r in report.results}
    layers = [f"model.layers.{i}" for i in range(3)]
    assert by["torch_wrapper"].metrics["recomputed_units"] == layers
    assert by["native"].metrics["recomputed_units"] == layers  # transformers' own switch, found by observation
    assert by["torch_offload_wrapper"].metrics["recomputed_units"] == []  # offloads, never recomputes


def test_native_switch_passes_on_transformers_and_skips_models_without_one():
    model, inputs = tiny_llama()
    (native,) = gc.check(model, inputs, strategies=["native"]).results
    assert native.outcome == "pass", native.message
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    (skipped,) = gc.check(net, torch.ones(2, 4), strategies=["native"]).results
    assert skipped.outcome == "skipped" and "no checkpointing switch of its own" in skipped.message


def test_own_unit_strategy_that_never_recomputes_is_not_applied():
    class SwitchThatDoesNothing(gc.Strategy):
        name, units = "does_nothing", "own"

        def apply(self, info):
            pass

    model, inputs = tiny_llama()
    (result,) = gc.check(model, inputs, strategies=[SwitchThatDoesNothing()]).results
    assert result.outcome == "not_applied", result.message


def tiny_unet():
    pytest.importorskip("diffusers")
    from pytest_gradckpt.zoo.diffusers_models import unet_2d

    return unet_2d()


def unet_loss(output, inputs):
    return output.sample.float().square().mean()


def test_diffusers_own_switch_is_correct_and_judged_by_the_units_it_really_recomputed():
    unet, inputs = tiny_unet()

    def gradients(enable):
        model = copy.deepcopy(unet).train()
        if enable:
            model.enable_gradient_checkpointing()
        unet_loss(model(**inputs), inputs).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    truth, checkpointed = gradients(False), gradients(True)
    for name in truth:  # ground truth: diffusers' checkpointing is correct here
        torch.testing.assert_close(checkpointed[name], truth[name], rtol=1.3e-6, atol=1e-5)
    report = gc.check(unet, inputs, loss=unet_loss, strategies=["native", "non_reentrant", "torch_wrapper"])
    assert [r.outcome for r in report.results] == ["pass"] * 3, report.table()
    native = report.results[0].metrics["recomputed_units"]
    assert native and any(unit.startswith("down_blocks.") for unit in native)  # diffusers' own units, observed


def test_automatic_units_of_a_unet_are_its_down_and_up_blocks():
    unet, inputs = tiny_unet()
    report = gc.check(unet, inputs, loss=unet_loss, strategies=["non_reentrant"])
    layers = report.baseline["layers"]
    assert {"down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1"} <= set(layers)
    assert "down_blocks, up_blocks" in report.baseline["layers_found_by"]


def test_conditional_unet_native_and_per_block_strategies_pass():
    pytest.importorskip("diffusers")
    from pytest_gradckpt.zoo.diffusers_models import unet_2d_condition

    model, inputs = unet_2d_condition()
    report = gc.check(model, inputs, strategies=["native", "non_reentrant", "offload", "torch_wrapper"])
    assert [r.outcome for r in report.results] == ["pass"] * 4, report.table()
    assert report.results[0].metrics["recomputed_units"]


UNET_REENTRANT = """
import functools, torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)
from pytest_gradckpt.zoo.diffusers_models import unet_2d
model, inputs = unet_2d()
blocks = (*model.down_blocks, *model.up_blocks)
{apply}
model.train()(**inputs).sample.float().square().mean().backward()
"""

#: Plain torch, no engine: reentrant checkpointing of the UNet's blocks, two ways.
UNET_PLAIN_REENTRANT = {
    # torch.utils.checkpoint(use_reentrant=True) per block, called as transformers calls its
    # checkpoint function: keyword arguments bound in a partial, positional ones passed on
    "reentrant": """
def checkpointed(forward, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(functools.partial(forward, **kwargs), *args, use_reentrant=True)
for block in blocks:
    block.forward = functools.partial(checkpointed, block.forward)
""",
    # torch's own wrapper, as torchtitan applies it
    "torch_wrapper_reentrant": """
apply_activation_checkpointing(model, checkpoint_wrapper_fn=functools.partial(
    checkpoint_wrapper, checkpoint_impl=CheckpointImpl.REENTRANT), check_fn=lambda m: any(m is b for b in blocks))
""",
}


@pytest.mark.parametrize("strategy", list(UNET_PLAIN_REENTRANT))
def test_unet2d_reentrant_hazards_match_plain_torch_and_never_end_the_session(strategy):
    """Ground truth in a separate interpreter (one of them crashes it): plain reentrant
    checkpointing of UNet2DModel's blocks segfaults, and torch's reentrant wrapper raises; the
    isolated check reports each as its verdict and this process goes on."""
    import subprocess
    import sys

    tiny_unet()
    plain = subprocess.run([sys.executable, "-c", UNET_REENTRANT.format(apply=UNET_PLAIN_REENTRANT[strategy])],
                           capture_output=True, text=True, timeout=120)
    unet, inputs = tiny_unet()
    (result,) = gc.check(unet, inputs, strategies=[strategy], isolate=True).results
    assert result.outcome == "error"
    if strategy == "reentrant":
        assert plain.returncode == -11, plain.stderr[-2000:]  # SIGSEGV: plain torch crashes the interpreter
        assert result.message == "StepCrashed: the step crashed its process: SIGSEGV (a fault in native code)"
    else:
        assert plain.returncode == 1, plain.stderr[-2000:]
        last = plain.stderr.strip().splitlines()[-1]
        assert result.message.startswith(last[:60]), (result.message, last)
