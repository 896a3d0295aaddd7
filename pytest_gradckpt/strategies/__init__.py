"""Checkpoint strategies: one registry, one small function or class each.

A *checkpoint function* has :func:`torch.utils.checkpoint.checkpoint`'s
signature, ``fn(function, *args, **kwargs)``. The engine installs it on every
checkpoint unit (layer) the way transformers installs
``_gradient_checkpointing_func``: through the installed transformers' own
mechanism on transformers models, and for plain modules as
``fn(functools.partial(bound_layer_forward, **kwargs), *args)``. Either way
:func:`pytest_gradckpt.pipeline.units.layer_of` recovers the layer from ``function``.

Whole-model strategies subclass :class:`Strategy` and implement ``apply`` on the
engine's own copy of the model (which it discards after the step, so there is nothing to
undo). The package holds the registry (here), the checkpoint functions
(:mod:`~pytest_gradckpt.strategies.checkpoint_functions`), the built-in whole-model strategies
(:mod:`~pytest_gradckpt.strategies.builtins`), the libraries' own built-ins (``unsloth``,
``llamafactory``, ``deepspeed``) and ``compile_budget``. Torch is imported only inside strategy
bodies, so the pytest plugin can validate names without paying for torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.pipeline.registries import Registry
from pytest_gradckpt.strategies.base import (  # noqa: F401 - re-exported: the strategies' public face
    CheckpointFunctionStrategy,
    Strategy,
    Units,
    install_layer_call,
    units_of,
)
from pytest_gradckpt.strategies.builtins import (  # noqa: F401 - re-exported
    NativeSwitch,
    SequentialSegments,
    TorchWrapper,
    TransformersAPI,
    TransformersSwitch,
    builtin_strategies,
)
from pytest_gradckpt.strategies.checkpoint_functions import (  # noqa: F401 - re-exported
    non_reentrant_checkpoint,
    offload_checkpoint,
    reentrant_checkpoint,
    sac_checkpoint,
    sac_contexts,
    sac_offload_checkpoint,
    sac_offload_policy,
    sac_policy,
    selective_checkpoint,
)


_STRATEGIES: Registry[Strategy] = Registry("strategies", builtin_strategies(), name_of=lambda s: s.name)
#: Names of the built-in strategies that run by default, in registry order.
BUILTIN: tuple[str, ...] = tuple(s.name for s in _STRATEGIES.builtins if not s.opt_in)
#: Built-in strategies that run only when named (``sac_offload``, ``hf_every_2``, ``hf_offload``,
#: ``compile_budget``).
BUILTIN_OPT_IN: tuple[str, ...] = tuple(s.name for s in _STRATEGIES.builtins if s.opt_in)


def register_strategy(strategy: Strategy, *, replace: bool = False) -> Strategy:
    """Make ``strategy`` available by name to ``check()``, markers and options, for the rest of
    the current context (a test module's or conftest's registration lasts the session).

    Example:
        >>> import functools, torch.utils.checkpoint as cp
        >>> s = Strategy.from_checkpoint_fn("doc_example", functools.partial(cp.checkpoint, use_reentrant=False))
        >>> register_strategy(s, replace=True).name in available_strategies()
        True
        >>> unregister_strategy("doc_example") is s, "doc_example" in available_strategies()
        (True, False)
    """
    if not isinstance(strategy, Strategy):
        raise GradckptUsageError(
            f"register_strategy({strategy!r}): expected a Strategy; wrap a checkpoint function with "
            "Strategy.from_checkpoint_fn(name, fn)")
    if not strategy.name or not strategy.name.replace("_", "").replace("-", "").isalnum():
        raise GradckptUsageError(
            f"register_strategy: name {strategy.name!r} is not usable; use letters, digits, '_' or '-'")
    units_of(strategy)  # a usage error now, not a wrong verdict later
    found = _STRATEGIES.find(strategy.name)
    if found is not None and not replace and found is not strategy:
        raise GradckptUsageError(
            f"register_strategy: a strategy named {strategy.name!r} is already registered; "
            "pick another name or pass replace=True")
    return _STRATEGIES.register(strategy)


def unregister_strategy(name: str) -> Strategy:
    """Remove a strategy registered by :func:`register_strategy` (a test's own, say) and return it.
    Built-in strategies stay.

    Example:
        >>> unregister_strategy("reentrant")
        Traceback (most recent call last):
        ...
        pytest_gradckpt.errors.GradckptUsageError: unregister_strategy: 'reentrant' is built in; built-in strategies stay registered
    """
    refusal = _STRATEGIES.unregister_refusal(name, "unregister_strategy", "strategy", "strategies")
    if refusal:
        raise GradckptUsageError(refusal)
    return _STRATEGIES.unregister(name)


@contextlib.contextmanager
def using_strategies(*strategies: Strategy) -> Iterator[tuple[Strategy, ...]]:
    """Run the block with ``strategies`` registered as well; nothing outlives the block.

    Example:
        >>> import functools, torch.utils.checkpoint as cp
        >>> with using_strategies(Strategy.from_checkpoint_fn("scoped", cp.checkpoint)):
        ...     "scoped" in available_strategies()
        True
        >>> "scoped" in available_strategies()
        False
    """
    with _STRATEGIES.using():
        for strategy in strategies:
            register_strategy(strategy)
        yield _STRATEGIES.registered()


def is_builtin(strategy: Strategy) -> bool:
    """Whether ``strategy`` is one of the built-in strategy objects, not merely named like one.

    Example:
        >>> import torch.utils.checkpoint as cp
        >>> is_builtin(get_strategy("non_reentrant")), is_builtin(Strategy.from_checkpoint_fn("non_reentrant", cp.checkpoint))
        (True, False)
    """
    return any(strategy is builtin for builtin in _STRATEGIES.builtins)


def registered_strategies() -> dict[str, Strategy]:
    """Every strategy in force by name, built-ins first, opt-in ones included."""
    return {strategy.name: strategy for strategy in _STRATEGIES.registered()}


def available_strategies(opt_in: bool = False) -> list[str]:
    """Names of every registered strategy, built-ins first; with ``opt_in``, also those that
    run only when named (a strategy with ``opt_in = True``, e.g. ``compile_budget``).

    Example:
        >>> available_strategies()[:4]
        ['reentrant', 'non_reentrant', 'hf_reentrant', 'hf_non_reentrant']
    """
    return [s.name for s in _STRATEGIES.registered() if opt_in or not s.opt_in]


def get_strategy(name: str) -> Strategy:
    """Look a strategy up by name; unknown names list what is available."""
    found = _STRATEGIES.find(name)
    if found is None:
        raise GradckptUsageError(
            f"unknown strategy {name!r}; available: {', '.join(_STRATEGIES.names())} "
            "(register your own with pytest_gradckpt.register_strategy)")
    return found


def resolve_strategies(spec: Iterable[str | Strategy] | str | Strategy | None) -> list[Strategy]:
    """Turn names, Strategy objects or None (= all registered) into Strategy objects."""
    if spec is None:
        return [get_strategy(n) for n in available_strategies()]
    if isinstance(spec, (str, Strategy)):
        spec = [spec]
    resolved = []
    for item in spec:
        if isinstance(item, Strategy):
            resolved.append(item)
        elif isinstance(item, str):
            resolved.append(get_strategy(item))
        else:
            raise GradckptUsageError(
                f"strategies: {item!r} is neither a strategy name nor a Strategy; "
                f"pass names from {', '.join(_STRATEGIES.names())}")
    if not resolved:
        raise GradckptUsageError(f"strategies is empty; pass at least one of {', '.join(_STRATEGIES.names())}")
    return resolved
