"""A plain copy of a model that FSDP (``FullyShardedDataParallel`` or ``fully_shard``) has wrapped.

A model prepared for FSDP cannot be deep-copied (its state holds process groups, streams, the
``torch.cuda`` module), and the check runs every step on a private copy. The copy made here is the
module tree without FSDP: FSDP1 wrappers replaced by the modules they wrap (their parameters read
under ``summon_full_params``), FSDP2 modules given back their own class with their DTensor
parameters gathered (``full_tensor``), FSDP's hooks left behind. Checkpoint wrappers stay, so the
copy checkpoints exactly as the prepared model does; sharding itself is not part of the check.
Tied parameters stay tied; the prepared model is not changed.
"""

from __future__ import annotations

import contextlib
import copy
import types
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from pytest_gradckpt.errors import GradckptUsageError

_FSDP_MODULES = ("torch.distributed.fsdp", "torch.distributed._composable")


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP (1 or 2) wraps anything in ``model``.

    Example:
        >>> is_sharded(torch.nn.Linear(2, 2))
        False
    """
    return any(_fsdp1(m) or _fsdp2(m) for m in model.modules())


def _fsdp1(module: nn.Module) -> bool:
    return type(module).__name__ == "FullyShardedDataParallel" and hasattr(module, "_fsdp_wrapped_module")


def _fsdp2(module: nn.Module) -> bool:
    return any(c.__name__ == "FSDPModule" for c in type(module).__mro__[1:])


def unsharded_copy(model: nn.Module) -> nn.Module:
    """``model`` without FSDP, as a new module tree with its own parameters; ``model`` if unsharded.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> unsharded_copy(net) is net
        True
    """
    if not is_sharded(model):
        return model
    context: Any = contextlib.nullcontext()
    if any(_fsdp1(m) for m in model.modules()):
        from torch.distributed.fsdp import FullyShardedDataParallel

        context = FullyShardedDataParallel.summon_full_params(model, writeback=False)
    with context, torch.no_grad():
        twin = _plain(model, {})
    _refuse_uncopyable(twin)
    return twin


def _refuse_uncopyable(twin: nn.Module) -> None:
    """The check deep-copies the copy for every run: name the attribute that cannot be copied, if any,
    rather than let the first run fail as if the model did (the modules and tensors themselves are
    copied by their own rules, so the memo stops there)."""
    memo: dict[int, Any] = {id(x): x for x in [*twin.modules(), *twin.parameters(), *twin.buffers()]}
    for name, module in twin.named_modules():
        for key, value in vars(module).items():
            if key in ("_parameters", "_buffers", "_modules"):
                continue
            try:
                copy.deepcopy(value, dict(memo))
            except Exception as error:  # noqa: BLE001 - named in the usage error
                where = f"{name}.{key}" if name else key
                raise GradckptUsageError(
                    f"check_trainer: the FSDP-prepared model cannot be copied for the check: its attribute {where} "
                    f"({type(value).__name__}) fails to copy ({type(error).__name__}: {error}); remove or rebuild that "
                    "attribute, or check the model before FSDP wraps it") from error


def _full(tensor: torch.Tensor) -> torch.Tensor:
    full = getattr(tensor, "full_tensor", None)
    return (full() if callable(full) else tensor).detach().clone()


def _own_hooks(hooks: dict[Any, Any], original: nn.Module, twin: nn.Module) -> dict[Any, Any]:
    """The hooks that are not FSDP's; one bound to ``original`` (``_WrappedHook``) is bound to ``twin``."""
    from torch.nn.modules.module import _WrappedHook

    kept = type(hooks)() if isinstance(hooks, OrderedDict) else {}
    for key, hook in hooks.items():
        function = getattr(hook, "hook", None) if isinstance(hook, _WrappedHook) else hook
        function = getattr(function, "func", function)
        if str(getattr(function, "__module__", "")).startswith(_FSDP_MODULES):
            continue
        if isinstance(hook, _WrappedHook) and hook.with_module and hook.module() is original:
            hook = _WrappedHook(hook.hook, twin)
        kept[key] = hook
    return kept


def _rebind_own_methods(twin: nn.Module, original: nn.Module) -> None:
    """Instance attributes that are methods bound to ``original`` are bound to ``twin``: accelerate's
    mixed precision replaces ``forward`` (and keeps ``_original_forward``) with methods of the model it
    prepares; left bound there, the copy would run the prepared, sharded model's forward."""
    for key, value in list(vars(twin).items()):
        if isinstance(value, types.MethodType) and value.__self__ is original:
            twin.__dict__[key] = types.MethodType(value.__func__, twin)


def _plain(module: nn.Module, made: dict[int, Any]) -> nn.Module:
    if _fsdp1(module):
        return _plain(module._fsdp_wrapped_module, made)
    if id(module) in made:
        return made[id(module)]  # noqa: RET504 - a module met twice is copied once
    cls = type(module)
    if _fsdp2(module):  # fully_shard swapped the class; the first base that is not FSDP's is the module's own
        cls = next(c for c in cls.__mro__[1:] if c.__name__ != "FSDPModule"
                   and not any(b.__name__ == "FSDPModule" for b in c.__mro__[1:]))
    twin = object.__new__(cls)  # FSDPModule.__new__ would call __init__
    # fully_shard keeps its state under a '__composable_api_state_key_...' attribute: left behind
    twin.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__composable_api_state")})
    made[id(module)] = twin
    _rebind_own_methods(twin, module)
    for name, value in list(vars(module).items()):
        if name.endswith("hooks") or name.endswith("hooks_with_kwargs") or name.endswith("always_called"):
            twin.__dict__[name] = _own_hooks(value, module, twin) if isinstance(value, dict) else copy.copy(value)
    twin._parameters = {n: None if p is None else made.setdefault(id(p), nn.Parameter(_full(p), p.requires_grad))
                        for n, p in module._parameters.items()}
    twin._buffers = {n: None if b is None else _full(b) for n, b in module._buffers.items()}
    twin._modules = {n: None if c is None else _plain(c, made) for n, c in module._modules.items()}
    return twin
