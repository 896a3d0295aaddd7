"""Promises as facts: what a strategy promises beyond equal gradients (which units recompute,
which ops it keeps, where activations live), held against plain torch/transformers ground truth."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

import pytest_gradckpt as gc
from pytest_gradckpt.strategies import TransformersSwitch, get_strategy

transformers = pytest.importorskip("transformers")
from pytest_gradckpt.zoo.peft_models import llama_inputs, tiny_llama_config  # noqa: E402

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


# --------------------------------------------------------------------------- which units recompute


def four_layer_llama(model_class=None):
    torch.manual_seed(0)
    model_class = model_class or transformers.LlamaForCausalLM
    return model_class(tiny_llama_config(num_hidden_layers=4)), llama_inputs()


def plain_recomputed_layers(model, inputs, switch):
    """Ground truth in plain transformers: which decoder layers run twice in one step."""
    calls = [0] * len(model.model.layers)
    for index, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda module, args, index=index: calls.__setitem__(index, calls[index] + 1))
    model.train()
    switch(model)
    model(**inputs).loss.backward()
    return [index for index, count in enumerate(calls) if count == 2]


class OldFormatLlama(transformers.LlamaForCausalLM):
    """A model whose switch is the old ``_set_gradient_checkpointing(module, value)`` format, as
    models on the Hub still have: transformers then checkpoints every layer, whatever was asked."""

    def _set_gradient_checkpointing(self, module, value=False):
        if isinstance(module, transformers.modeling_layers.GradientCheckpointingLayer):
            module.gradient_checkpointing = value
            module._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)


def every_second(model):
    model.activation_checkpointing_enable(every_n_layers=2)


def test_every_n_layers_keeps_its_promise():
    assert plain_recomputed_layers(*four_layer_llama(), every_second) == [0, 2]
    (result,) = gc.check(*four_layer_llama(), strategies=[TransformersSwitch(every_n_layers=2)]).results
    assert result.outcome == "pass", result.message
    assert result.metrics["layer_calls"] == {"model.layers.0": 2, "model.layers.1": 1, "model.layers.2": 2,
                                             "model.layers.3": 1}


def test_a_switch_that_drops_every_n_layers_breaks_the_promise():
    assert plain_recomputed_layers(*four_layer_llama(OldFormatLlama), every_second) == [0, 1, 2, 3]
    model, inputs = four_layer_llama(OldFormatLlama)
    (result,) = gc.check(model, inputs, strategies=["hf_every_2"]).results
    assert (result.outcome, result.message) == ("recompute",
                                                "every_n_layers=2 promised layers 0, 2; recomputed 0, 1, 2, 3")
    # the gradients themselves are right: only the promise is broken
    assert result.metrics["max_grad_diff"] == 0.0


def test_offload_without_an_accelerator_is_an_error_as_in_plain_transformers():
    # transformers' offload=True asks save_on_cpu for pinned memory on the host's own device type:
    # without an accelerator, torch has no pinned allocator and the step raises (plain transformers too).
    model, inputs = four_layer_llama()
    if torch.cuda.is_available():
        pytest.skip("the CPU-only failure: on a GPU offload runs (python -m benchmarks promises)")
    with pytest.raises(RuntimeError, match="pin_memory=True requires") as plain:
        plain_recomputed_layers(model, inputs, lambda m: m.activation_checkpointing_enable(offload=True))
    (result,) = gc.check(*four_layer_llama(), strategies=["hf_offload"]).results
    assert result.outcome == "error"
    assert str(plain.value).splitlines()[0] in result.message
    assert get_strategy("hf_offload").label == "every_n_layers=1, offload=True"


# --------------------------------------------------------------------------- which ops recompute


class MatmulsInBackward(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in MATMULS
        return func(*args, **(kwargs or {}))


def three_block_mlp():
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
                                   for _ in range(3)])
    return blocks, torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


def plain_backward_matmuls(policy):
    """Ground truth in plain torch, as torchtitan's tests count: matmuls run by backward when each
    block is checkpointed with ``policy`` for matmuls (None: no checkpointing)."""
    model, x = three_block_mlp()
    hidden = x
    for block in model:
        if policy is None:
            hidden = block(hidden)
            continue
        choose = functools.partial(create_selective_checkpoint_contexts, lambda ctx, op, *a, **k: (
            policy if op in MATMULS else CheckpointPolicy.PREFER_RECOMPUTE))
        hidden = checkpoint(block, hidden, use_reentrant=False, context_fn=choose)
    loss = hidden.float().square().mean()
    with MatmulsInBackward() as seen:
        loss.backward()
    return seen.count


def test_sac_offload_policy_is_recomputed_in_eager_torch():
    plain_save, plain_offload = plain_backward_matmuls(CheckpointPolicy.MUST_SAVE), plain_backward_matmuls(
        CheckpointPolicy.MUST_CPU_OFFLOAD)
    assert plain_backward_matmuls(None) == plain_save < plain_offload
    report = gc.check(*three_block_mlp(), strategies=["sac", "sac_offload"])
    saved, offloaded = report.results
    assert saved.outcome == "pass", saved.message
    assert saved.metrics["recomputed_matmuls"] == 0
    assert offloaded.outcome == "recompute"
    version = torch.__version__.split("+")[0]
    assert offloaded.message == (f"MUST_CPU_OFFLOAD recomputed matmuls in eager torch {version} "
                                 f"({plain_save} vs {plain_offload} matmuls in backward)")
    assert offloaded.metrics["recomputed_matmuls"] == plain_offload - plain_save


def test_full_checkpointing_counts_its_recomputed_flops():
    from pytest_gradckpt.probes import registry

    with registry.asking("ops"):  # it promises nothing the counts judge: counted only when asked
        (result,) = gc.check(*three_block_mlp(), strategies=["non_reentrant"]).results
    # each block recomputes its first Linear (the second's output is not needed for its backward):
    # 3 matmuls of 4x8x8, 2 FLOPs per multiply-add
    assert result.metrics["recomputed_matmuls"] == 3
    assert result.metrics["recomputed_flops"] == 3 * 2 * 4 * 8 * 8
    (unasked,) = gc.check(*three_block_mlp(), strategies=["non_reentrant"]).results
    assert unasked.outcome == result.outcome == "pass" and "recomputed_flops" not in unasked.metrics


def test_a_users_strategy_declares_its_promise():
    from pytest_gradckpt.pipeline.promises import Promise

    lying = gc.Strategy.from_checkpoint_fn(
        "says_it_saves", functools.partial(checkpoint, use_reentrant=False),
        promise=Promise("saves matmuls", kept_ops="matmuls"))
    (result,) = gc.check(*three_block_mlp(), strategies=[lying]).results
    assert result.outcome == "recompute"
    assert result.message.startswith("saves matmuls recomputed matmuls in eager torch")


# --------------------------------------------------------------------------- memory in two numbers


def test_resident_after_forward_and_peak_against_plain_torch():
    """Ground truth: the bytes autograd keeps alive when forward returns, counted with plain
    saved-tensor hooks (one count per storage, weights' storages left out), and the boundary
    arithmetic of a decoder."""
    model, inputs = four_layer_llama()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = model(**inputs)
    plain_resident = sum(kept.values())
    del output
    report = gc.check(*four_layer_llama(), strategies=["non_reentrant"])
    (result,) = report.results
    metrics = result.metrics
    assert metrics["baseline_resident_bytes"] == plain_resident
    assert metrics["resident_bytes"] < metrics["baseline_resident_bytes"]
    assert metrics["resident_bytes"] <= metrics["activation_bytes"]
    assert metrics["boundary_bytes"] == 4 * inputs["input_ids"].numel() * 32 * 4  # units x tokens x hidden x fp32
    assert "host_resident_bytes" not in metrics  # one memory on a CPU: no host figure


def test_a_flop_formula_that_fails_never_fails_the_step():
    from pytest_gradckpt.probes.op_counts import OpCounter

    def broken_formula(*args, **kwargs):
        raise AssertionError("sdpa_flop_count: query/key/value shapes are incompatible")

    w = torch.nn.Parameter(torch.ones(4, 4))
    with OpCounter() as seen:
        seen.formulas = {**seen.formulas, torch.ops.aten.mm: broken_formula}
        (torch.ones(2, 4) @ w).sum().backward()
    assert seen.matmuls == {"forward": 1, "backward": 1}
    assert seen.uncounted == {"aten.mm"}
