"""Built-in and user-written strategies are measured the same way: no module-level channel
between strategies and the memory probe. A user's offloading (torch's ``offload_wrapper`` in a
``gc.Strategy`` subclass, or a checkpoint function that keeps layer inputs on the host and
declares them to its run's probe) gets the metrics and verdict of the equivalent built-in.

Ground truth for the models' gradients is plain torch; the comparisons between strategies are
of figures each run measured on its own."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    apply_activation_checkpointing, offload_wrapper)
from torch.utils.checkpoint import checkpoint

import pytest_gradckpt as gc

MEASURED = ("activation_bytes", "recomputed_units", "saved_elsewhere_units", "layer_calls", "max_grad_diff")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(hidden)).view(hidden.shape)  # a view of the input's shape, as layers do


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(4))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


def stack() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Stack(), torch.randn(8, 16, generator=torch.Generator().manual_seed(1))


class UserOffloadWrapper(gc.Strategy):
    """What a user writes: torch's offload_wrapper on the checkpoint units, nothing declared."""

    name = "user_offload_wrapper"

    def apply(self, info):
        units = {id(layer) for layer in info.layers}
        apply_activation_checkpointing(info.model, checkpoint_wrapper_fn=offload_wrapper,
                                       check_fn=lambda module: id(module) in units)


def user_offload(function, hidden, *rest):
    """A user's offloading checkpoint function: the layer input kept on the host, the layer recomputed,
    the host copy declared to this run's memory probe (as the built-in ``offload`` does)."""
    device = hidden.device  # not ``hidden``: a closure over it would keep it alive on the device
    host = hidden.to("cpu", copy=True)
    probe = gc.memory_probe_of(function)
    if probe is not None:
        probe.mark_offloaded(host)
    anchor = torch.empty(0, device=device)
    return checkpoint(lambda h, _anchor, *r: function(h.to(device), *r), host, anchor, *rest,
                      use_reentrant=False)


def results(strategies: list) -> dict[str, gc.Result]:
    model, inputs = stack()
    report = gc.check(model, inputs, strategies=strategies, scenarios=["train"], layers="layers")
    return {r.strategy: r for r in report.results}


def assert_measured_alike(mine: gc.Result, builtin: gc.Result) -> None:
    assert (mine.outcome, mine.message) == (builtin.outcome, builtin.message)
    for key in MEASURED:
        assert mine.metrics[key] == builtin.metrics[key], key


def test_plain_torch_gradients_are_unchanged_by_either_offloading():
    model, inputs = stack()
    model(inputs).float().square().mean().backward()
    truth = {n: p.grad.clone() for n, p in model.named_parameters()}
    for wrap in (offload_wrapper, None):
        model, inputs = stack()
        if wrap is not None:
            apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrap, check_fn=lambda m: isinstance(m, Block))
            hidden = model(inputs)
        else:
            hidden = inputs
            for layer in model.layers:
                hidden = user_offload(layer.forward, hidden)
        hidden.float().square().mean().backward()
        for (name, param), expected in zip(model.named_parameters(), truth.values(), strict=True):
            torch.testing.assert_close(param.grad, expected, rtol=0, atol=0, msg=name)


def test_a_users_offload_wrapper_strategy_is_measured_as_the_builtin():
    found = results([UserOffloadWrapper(), "torch_offload_wrapper"])
    mine, builtin = found["user_offload_wrapper"], found["torch_offload_wrapper"]
    assert builtin.outcome == "pass", builtin.message
    assert builtin.metrics["saved_elsewhere_units"] == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert_measured_alike(mine, builtin)


def test_a_users_offloading_checkpoint_function_is_measured_as_the_builtin():
    mine_strategy = gc.Strategy.from_checkpoint_fn("user_offload", user_offload)
    found = results([mine_strategy, "offload", "non_reentrant"])
    mine, builtin, recomputing = found["user_offload"], found["offload"], found["non_reentrant"]
    assert builtin.outcome == "pass", builtin.message
    # the declaration reaches the probe: host copies are not device activations
    assert builtin.metrics["activation_bytes"] < recomputing.metrics["activation_bytes"]
    assert_measured_alike(mine, builtin)


def test_undeclared_host_copies_count_as_activations():
    # The same function without the declaration: on a CPU device the host copies are device memory,
    # so they count. Proves the equality above comes from the per-run declaration, not from chance.
    def undeclared(function, hidden, *rest):
        anchor = torch.empty(0)
        return checkpoint(lambda h, _anchor, *r: function(h, *r), hidden.to("cpu", copy=True), anchor, *rest,
                          use_reentrant=False)

    found = results([gc.Strategy.from_checkpoint_fn("undeclared", undeclared), "offload"])
    assert found["undeclared"].metrics["activation_bytes"] > found["offload"].metrics["activation_bytes"]


def test_the_probe_is_reached_only_inside_a_run():
    layer = Block()
    assert gc.memory_probe_of(layer.forward) is None
    seen = []

    def spy(function, *args):
        seen.append(gc.memory_probe_of(function))
        return checkpoint(function, *args, use_reentrant=False)

    model, inputs = stack()
    gc.check(model, inputs, strategies=[gc.Strategy.from_checkpoint_fn("spy", spy)], scenarios=["train"],
             layers="layers")
    assert seen and all(probe is not None for probe in seen)
    assert all(probe is seen[0] for probe in seen)  # one probe, the one checked run's
    assert gc.memory_probe_of(layer.forward) is None
