"""Deliberately broken checkpoint functions. Each one imitates a real bug; the engine
must give each its specific verdict. All have torch.utils.checkpoint's signature."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from pytest_gradckpt.pipeline.units import layer_of


def correct(function: Any, *args: Any) -> Any:
    return checkpoint(function, *args, use_reentrant=False)


def output_detached(function: Any, *args: Any) -> Any:
    """Returns the layer's output cut from the graph: everything before it loses its gradient."""
    return checkpoint(function, *args, use_reentrant=False).detach()


def rng_not_preserved(function: Any, *args: Any) -> Any:
    """Recompute draws fresh dropout masks."""
    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False)


def kwargs_dropped(function: Any, *args: Any) -> Any:
    """Calls the layer without the keyword arguments transformers put in the partial (masks)."""
    return checkpoint(getattr(function, "func", function), *args, use_reentrant=False)


def not_checkpointing(function: Any, *args: Any) -> Any:
    """Switched on, never applied: a plain call."""
    return function(*args)


def forward_twice(function: Any, *args: Any) -> Any:
    """Runs the layer once more than needed before checkpointing it."""
    function(*args)
    return checkpoint(function, *args, use_reentrant=False)


def off_by_a_tenth_percent(function: Any, *args: Any) -> Any:
    """A numerically wrong wrapper: output scaled by 1.001."""
    return checkpoint(function, *args, use_reentrant=False) * 1.001


def off_by_one_percent(function: Any, *args: Any) -> Any:
    """The same fault, ten times larger: output scaled by 1.01 (representable in bf16, whose
    spacing near 1 is 2**-7, where 1.001 rounds back to 1)."""
    return checkpoint(function, *args, use_reentrant=False) * 1.01


def raises(function: Any, *args: Any) -> Any:
    raise RuntimeError("this checkpoint function always fails")


def hangs(function: Any, *args: Any) -> Any:
    while True:
        time.sleep(0.01)


def inverted_frozen_skipper(function: Any, *args: Any) -> Any:
    """Claims to skip frozen layers, but checkpoints exactly the frozen ones."""
    layer = layer_of(function)
    assert layer is not None, "called outside a layer the engine instrumented"
    if any(p.requires_grad for p in layer.parameters()):
        return function(*args)
    return checkpoint(function, *args, use_reentrant=False)


def selective_forgetting_input_grads(function: Any, *args: Any) -> Any:
    """Skips frozen layers, reentrant on the rest, but forgets that reentrant needs a
    grad-requiring input: with frozen embeddings the LoRA weights get nothing."""
    layer = layer_of(function)
    assert layer is not None, "called outside a layer the engine instrumented"
    if not any(p.requires_grad for p in layer.parameters()):
        return function(*args)
    return checkpoint(function, *args, use_reentrant=True)


def offload_losing_input_grad(function: Any, *args: Any) -> Any:
    """Offloads the hidden state with .detach().cpu(): the input's gradient is lost."""
    hidden, *rest = args
    host = hidden.detach().cpu()
    return checkpoint(lambda h, *r: function(h.to(hidden.device).requires_grad_(), *r), host, *rest,
                      use_reentrant=False)


class _UnslothStyleOffload(torch.autograd.Function):
    """Hand-written offload in the style popular frameworks use: input kept on the host,
    the layer rerun in backward, but without stashing the RNG state."""

    @staticmethod
    def forward(ctx: Any, function: Any, hidden: torch.Tensor) -> torch.Tensor:
        ctx.function, ctx.device = function, hidden.device
        ctx.save_for_backward(hidden.to("cpu"))
        with torch.no_grad():
            return function(hidden)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> Any:
        (host,) = ctx.saved_tensors
        hidden = host.to(ctx.device).detach().requires_grad_()
        with torch.enable_grad():
            output = ctx.function(hidden)
        torch.autograd.backward(output, grad_output)
        return None, hidden.grad


def offload_losing_rng(function: Any, *args: Any) -> Any:
    hidden, *rest = args
    return _UnslothStyleOffload.apply(lambda h: function(h, *rest), hidden)


def recompute_outside_autocast(function: Any, *args: Any) -> Any:
    """Recomputes with autocast switched off, so backward sees float32 where forward used bf16."""
    device_type = args[0].device.type
    return checkpoint(function, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), torch.autocast(device_type, enabled=False)))


class _GradientTimes103(torch.autograd.Function):
    """Identity forward; backward scales the gradient by 1.03."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * 1.03


def gradient_three_percent_off(function: Any, *args: Any) -> Any:
    """Correct forward, but every gradient leaving the layer's output is 3% too large
    (e.g. a recompute that rescales what it hands back)."""
    return _GradientTimes103.apply(checkpoint(function, *args, use_reentrant=False))


def _save_every_op(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE


def _saving_everything() -> Any:
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_save_every_op)


def sac_saving_everything(function: Any, *args: Any) -> Any:
    """Selective checkpointing whose policy keeps every op's output: switched on, it saves no memory."""
    return checkpoint(function, *args, use_reentrant=False, context_fn=_saving_everything)
