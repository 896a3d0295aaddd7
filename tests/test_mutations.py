"""The mutation suite: every broken checkpoint function must get its specific verdict,
and every correct one must pass. Detection that regresses fails here."""

from __future__ import annotations

from copy import deepcopy

import pytest
import torch

import pytest_gradckpt as gc
from pytest_gradckpt.zoo import plain
from tests import mutations


def verdict(factory, fn, *, skips_frozen=False, scenario="train", layers=None, **kwargs):
    model, inputs = factory()
    strategy = gc.Strategy.from_checkpoint_fn(fn.__name__, fn, skips_frozen=skips_frozen)
    report = gc.check(model, inputs, strategies=[strategy], scenarios=[scenario], layers=layers, **kwargs)
    (result,) = report.results
    return result


def frozen_tanh_net():
    """TanhNet with blocks 0 and 2 frozen."""
    model, inputs = plain.tanh_net()
    for index in (0, 2):
        model.blocks[index].requires_grad_(False)
    return model, inputs


@pytest.mark.parametrize("factory", [plain.dropout_mask_net, plain.tanh_net, plain.reused_block_net],
                         ids=["dropout_mask", "tanh", "reused_block"])
def test_correct_function_passes(factory):
    result = verdict(factory, mutations.correct)
    assert result.outcome == "pass", result.message
    assert result.metrics["max_grad_diff"] == 0.0


@pytest.mark.parametrize(("fn", "factory", "scenario", "outcome", "words"), [
    (mutations.output_detached, plain.dropout_mask_net, "train", "silent", "got None or all zeros"),
    (mutations.rng_not_preserved, plain.dropout_mask_net, "train", "mismatch", "gradients differ"),
    (mutations.kwargs_dropped, plain.dropout_mask_net, "train", "mismatch", "differ"),
    (mutations.not_checkpointing, plain.tanh_net, "train", "not_applied", "no layer was recomputed"),
    (mutations.forward_twice, plain.tanh_net, "train", "recompute", "ran 3 time(s), expected 2"),
    (mutations.off_by_a_tenth_percent, plain.tanh_net, "train", "mismatch", "loss differ"),
    (mutations.raises, plain.tanh_net, "train", "error", "always fails"),
    (mutations.offload_losing_input_grad, plain.dropout_mask_net, "train", "silent", "embed.weight"),
    (mutations.offload_losing_rng, plain.dropout_mask_net, "train", "mismatch", "gradients differ"),
    (mutations.correct, plain.batchnorm_net, "train", "buffers", "num_batches_tracked"),
    (mutations.selective_forgetting_input_grads, plain.dropout_mask_net, "frozen_inputs", "silent",
     "None of the inputs have requires_grad=True"),
], ids=lambda v: getattr(v, "__name__", None))
def test_broken_function_gets_its_verdict(fn, factory, scenario, outcome, words):
    result = verdict(factory, fn, scenario=scenario)
    assert (result.outcome, words in result.message) == (outcome, True), result.message


def test_a_differing_loss_also_shows_the_gradients_damage():
    # Ground truth in plain torch: scaling every block's output by 1.001 changes the gradients too.
    model, inputs = plain.tanh_net()
    plain_grads = {}
    for scale in (1.0, 1.001):
        copy = deepcopy(model)
        for block in copy.blocks:
            block.register_forward_hook(lambda module, args, out, s=scale: out * s)
        copy(inputs).float().square().mean().backward()
        plain_grads[scale] = {n: p.grad for n, p in copy.named_parameters()}
    differ = [n for n, g in plain_grads[1.0].items() if not torch.allclose(g, plain_grads[1.001][n], 1.3e-6, 1e-5)]
    assert differ
    result = verdict(plain.tanh_net, mutations.off_by_a_tenth_percent)
    assert result.message.startswith("1 loss differ")
    assert f"; also {len(differ)} gradients differ; worst " in result.message


def test_recompute_outside_autocast_is_caught():
    result = verdict(plain.tanh_net, mutations.recompute_outside_autocast, scenario="autocast")
    assert result.outcome == "error"
    assert "dtype" in result.message  # the recompute meets bf16 activations in float32


def test_inverted_frozen_skipper_breaks_its_promise():
    result = verdict(frozen_tanh_net, mutations.inverted_frozen_skipper, skips_frozen=True)
    assert result.outcome == "recompute"
    # frozen blocks 0 and 2 recomputed, trainable blocks 1 and 3 not: the first is named, three more counted
    assert result.message.startswith("blocks.0 ran 2 time(s), expected 1: the strategy promises not to recompute it")
    assert result.message.endswith("(+3 more)")


def test_builtin_selective_keeps_its_promise_on_frozen_layers():
    model, inputs = frozen_tanh_net()
    (result,) = gc.check(model, inputs, strategies=["selective"]).results
    assert result.outcome == "pass", result.message
    calls = result.metrics["layer_calls"]
    assert calls == {"blocks.0": 1, "blocks.1": 2, "blocks.2": 1, "blocks.3": 2}


def test_hanging_function_times_out_as_error():
    result = verdict(plain.tanh_net, mutations.hangs, timeout=0.5)
    assert result.outcome == "error"
    assert "timed out after 0.5 s" in result.message


def test_memory_threshold_turns_a_useless_strategy_into_not_applied():
    # Checkpointing a 1-op-per-block stack saves nothing: every block input is saved anyway.
    def relu_stack():
        torch.manual_seed(0)
        net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()) for _ in range(3)],
                                  torch.nn.Linear(8, 2))
        return net, torch.randn(4, 8)

    result = verdict(relu_stack, mutations.correct, min_memory_reduction=0.3)
    assert result.outcome == "not_applied"
    assert "below min_memory_reduction=30%" in result.message


def test_reentrant_with_autograd_grad_is_an_error_with_torchs_message():
    model, inputs = plain.tanh_net()
    (result,) = gc.check(model, inputs, strategies=["reentrant"], scenarios=["autograd_grad"]).results
    assert result.outcome == "error"
    assert "use_reentrant=True" in result.message


def test_raw_reentrant_with_frozen_embeddings_is_silent():
    model, inputs = plain.dropout_mask_net()
    (result,) = gc.check(model, inputs, strategies=["reentrant"], scenarios=["frozen_inputs"]).results
    assert result.outcome == "silent"


def test_transformers_strategies_are_skipped_on_plain_models():
    model, inputs = plain.tanh_net()
    report = gc.check(model, inputs, strategies=["hf_reentrant", "hf_non_reentrant"])
    assert [r.outcome for r in report.results] == ["skipped", "skipped"]
    assert "not a transformers model" in report.results[0].message


@pytest.mark.parametrize("name", ["non_reentrant", "reentrant", "selective", "offload", "sac", "sequential"])
def test_builtin_strategies_pass_on_dropout_and_masks(name):
    model, inputs = plain.dropout_mask_net()
    (result,) = gc.check(model, inputs, strategies=[name], scenarios=["train"]).results
    assert result.outcome == "pass", result.message
    assert result.metrics["activation_reduction"] > 0.2


def test_reused_block_recomputes_once_per_call():
    model, inputs = plain.reused_block_net()
    (result,) = gc.check(model, inputs, strategies=["non_reentrant"]).results
    assert result.outcome == "pass"
    assert result.metrics["layer_calls"]["blocks.0"] == 4  # two calls, each recomputed once


class ScaledBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)

    def forward(self, x, scale):
        return x + torch.tanh(self.linear(x)) * scale


class ScaledNet(torch.nn.Module):
    """Each block gets its own extra argument, so consecutive blocks cannot be fused."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(ScaledBlock() for _ in range(4))

    def forward(self, x):
        for i, block in enumerate(self.blocks):
            x = block(x, torch.full((1,), float(i)))
        return x


def test_sequential_reports_skipped_when_layers_are_not_chained():
    torch.manual_seed(0)
    (result,) = gc.check(ScaledNet(), torch.randn(2, 4, requires_grad=True), strategies=["sequential"]).results
    assert result.outcome == "skipped"
    assert "cannot be fused" in result.message
