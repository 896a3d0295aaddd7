"""Putting a factory's model on the check's device, wherever the factory built it.

A factory may build on the CPU, on the rank's GPU, or on the ``meta`` device (no storage:
how big models are usually built for sharding). The first two are moved. A meta model has
shapes but no values, so it is given storage on the device (``to_empty``) and initialised
by its own code under a fixed seed: every run and every rank then holds identical weights,
which is all a gradient comparison needs (the baseline and every strategy start from the
same numbers; they need not be pretrained ones). Values no initialiser writes (a buffer
computed in ``__init__``, such as rotary frequencies, or a parameter of a module without
``reset_parameters``) cannot be recovered: every tensor is first filled with NaN, and one
still holding NaN after initialisation makes the check refuse the model with a clear error
rather than compare garbage.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from pytest_gradckpt.errors import GradckptUsageError

#: The seed of a meta model's initialisation (any fixed number: runs and ranks must agree).
INIT_SEED = 0


def is_meta(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is on the meta device (has no values).

    Example:
        >>> is_meta(torch.nn.Linear(2, 2, device="meta")), is_meta(torch.nn.Linear(2, 2))
        (True, False)
    """
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device``: moved, or (built on ``meta``) materialised and initialised there.

    Example:
        >>> a = to_device(torch.nn.Linear(3, 2, device="meta"), torch.device("cpu"))
        >>> b = to_device(torch.nn.Linear(3, 2, device="meta"), torch.device("cpu"))
        >>> a.weight.device.type, torch.equal(a.weight, b.weight)  # the same numbers every time
        ('cpu', True)
    """
    if not is_meta(model):
        return model.to(device)
    model.to_empty(device=device)
    tensors = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
    unfillable = [n for n, t in tensors.items() if not (t.is_floating_point() or t.is_complex())]
    if unfillable:
        raise _refusal(model, device, unfillable, "integer tensors whose values only its constructor knows")
    with torch.no_grad():
        for tensor in tensors.values():
            tensor.fill_(float("nan"))
    _initialise(model, device)
    with torch.no_grad():
        unset = [n for n, t in tensors.items() if bool(torch.isnan(t).any())]
    if unset:
        raise _refusal(model, device, unset, "tensors its initialisation does not write")
    return model


def _initialise(model: nn.Module, device: torch.device) -> None:
    """The model's own initialisation, seeded: transformers' ``init_weights`` where there is one,
    else every module's ``reset_parameters``."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(INIT_SEED)
        init_weights = getattr(model, "init_weights", None)
        if callable(init_weights) and hasattr(model, "config"):
            for module in model.modules():  # built on meta, the modules count as initialised already
                if hasattr(module, "_is_hf_initialized"):
                    module._is_hf_initialized = False
            init_weights()
            return
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()


def _refusal(model: nn.Module, device: torch.device, names: list[str], what: str) -> GradckptUsageError:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return GradckptUsageError(
        f"the model factory built {type(model).__name__} on the meta device, and materialising it on {device} "
        f"left {len(names)} {what} without values ({shown}); its weights cannot be recreated faithfully. Build it "
        f"on the CPU, or on the rank's device (in the factory: `with torch.device('cuda', "
        f"torch.cuda.current_device()):` on GPUs), or give those modules a reset_parameters() that sets them")
