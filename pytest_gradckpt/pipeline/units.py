"""Checkpoint units: finding them, instrumenting them, and finding one from a checkpoint call."""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pytest_gradckpt.compilation.optimized_module import is_optimized_module
from pytest_gradckpt.errors import GradckptUsageError
from pytest_gradckpt.probes.unit_counter import LayerCounter


def transformers_model_in(model: nn.Module) -> nn.Module | None:
    """The outermost transformers ``PreTrainedModel`` inside ``model`` (PEFT wrappers included), or None.

    transformers is not imported here: a model cannot be a transformers model
    unless the caller already imported it.

    Example:
        >>> transformers_model_in(torch.nn.Linear(2, 2)) is None
        True
    """
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return None
    pretrained = transformers.PreTrainedModel
    return next((m for m in model.modules() if isinstance(m, pretrained)), None)


def _outermost(modules: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    kept: list[tuple[str, nn.Module]] = []
    for name, module in modules:
        if not any(name.startswith(outer + ".") for outer, _ in kept):
            kept.append((name, module))
    return kept


def _transformers_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    modeling_layers = sys.modules.get("transformers.modeling_layers")
    found: list[tuple[str, nn.Module]] = []
    if modeling_layers is not None:
        base = modeling_layers.GradientCheckpointingLayer
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, base)]
    if not found:
        # Older per-stack style: a module with a `gradient_checkpointing` flag loops over a ModuleList.
        for name, module in model.named_modules():
            if hasattr(module, "gradient_checkpointing"):
                for child_name, child in module.named_children():
                    if isinstance(child, nn.ModuleList):
                        prefix = f"{name}.{child_name}" if name else child_name
                        found += [(f"{prefix}.{i}", block) for i, block in enumerate(child)]
    return _outermost(found)


#: A block list joins the checkpoint units when it holds at least this share of the
#: parameters of the largest one (UNets: down and up blocks; ResNets: the deep stages).
BLOCK_LIST_SHARE = 0.25


def _parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _repeated_blocks(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], str]:
    """The blocks a user would checkpoint: the children of the outermost block lists
    (``ModuleList``/``Sequential`` with two or more children holding parameters) that hold
    most of the parameters, and a sentence saying which lists were chosen and why."""
    candidates: list[tuple[str, list[tuple[str, nn.Module]], int]] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)):
            continue
        if any(name.startswith(outer + ".") or not outer for outer, _, _ in candidates):
            continue  # inside a list already chosen: its blocks are the units, not their parts
        blocks = [(f"{name}.{child}" if name else child, block) for child, block in module.named_children()
                  if any(True for _ in block.parameters())]
        if len(blocks) >= 2:
            candidates.append((name, blocks, sum(_parameter_count(b) for _, b in blocks)))
    if not candidates:
        return [], ""
    largest = max(size for _, _, size in candidates)
    chosen = [(name, blocks, size) for name, blocks, size in candidates if size >= BLOCK_LIST_SHARE * largest]
    total = _parameter_count(model) or 1
    share = sum(size for _, _, size in chosen) / total
    lists = ", ".join(name or "the model itself" for name, _, _ in chosen)
    return ([block for _, blocks, _ in chosen for block in blocks],
            f"repeated blocks: the blocks of {lists} ({share:.0%} of the parameters)")


def unit_stacks(names: list[str]) -> dict[str, int]:
    """How many checkpoint units each stack holds: a unit's stack is its name without the
    trailing index (a vision tower's blocks and a language model's layers count apart).

    Example:
        >>> unit_stacks(["model.vision_tower.layers.0", "model.vision_tower.layers.1", "model.language_model.layers.0"])
        {'model.vision_tower.layers': 2, 'model.language_model.layers': 1}
    """
    stacks: dict[str, int] = {}
    for name in names:
        stack, _, last = name.rpartition(".")
        key = stack if last.isdigit() and stack else name
        stacks[key] = stacks.get(key, 0) + 1
    return stacks


def find_layers(model: nn.Module, spec: Any = None, *, reference: nn.Module | None = None
                ) -> tuple[list[str], str]:
    """Resolve ``spec`` to checkpoint-unit names inside ``model``, and say how they were found.

    ``spec``: None (automatic), a dotted path (``"layers"``, ``"model.layers"``),
    a module class, or a list of modules of ``reference`` (the caller's model).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> find_layers(net)
        (['0', '1'], 'repeated blocks: the blocks of the model itself (100% of the parameters)')
        >>> find_layers(net, "1"), find_layers(net, torch.nn.Linear), find_layers(net, [net[1]])
        ((['1'], 'path'), (['0', '1'], 'class'), (['1'], 'modules'))
    """
    if spec is None:
        return _automatic_layers(model)
    if isinstance(spec, str):
        return _layers_at_path(model, spec), "path"
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return _layers_of_class(model, spec), "class"
    if isinstance(spec, (list, tuple)) and all(isinstance(m, nn.Module) for m in spec) and spec:
        # The modules are the caller's; ``model`` may be the engine's copy, so names come from ``reference``.
        return _layers_given(list(spec), reference if reference is not None else model), "modules"
    raise GradckptUsageError(
        f"layers={spec!r}: expected None, a dotted path like 'model.layers', an nn.Module subclass, "
        "or a non-empty list of modules")


def _automatic_layers(model: nn.Module) -> tuple[list[str], str]:
    """transformers' own checkpointing layers where the model has them, else the repeated blocks."""
    if transformers_model_in(model) is not None:
        found = _transformers_layers(model)
        if found:
            return [n for n, _ in found], "transformers"
    found, why = _repeated_blocks(model)
    if not found:
        raise GradckptUsageError(
            f"layers=None: found no repeated layers in {type(model).__name__} (no nn.ModuleList or "
            "nn.Sequential holds two or more blocks of one type with parameters); pass layers= as a "
            "dotted path such as 'blocks', a block class, or a list of modules")
    return [n for n, _ in found], why


def _layers_at_path(model: nn.Module, path: str) -> list[str]:
    """The children of the block list at ``path``, or the one module there."""
    try:
        target = model.get_submodule(path)
    except AttributeError:
        children = ", ".join(n for n, _ in model.named_children()) or "none"
        raise GradckptUsageError(
            f"layers={path!r}: {type(model).__name__} has no submodule at that path; top-level "
            f"children are: {children}") from None
    if isinstance(target, (nn.ModuleList, nn.Sequential)):
        return [f"{path}.{child}" for child, _ in target.named_children()]
    return [path]


def _layers_of_class(model: nn.Module, block: type[nn.Module]) -> list[str]:
    """The outermost submodules that are instances of ``block`` (the model itself is never a unit)."""
    found = _outermost([(n, m) for n, m in model.named_modules() if isinstance(m, block) and n])
    if not found:
        raise GradckptUsageError(
            f"layers={block.__name__}: no submodule of {type(model).__name__} is an instance of it")
    return [n for n, _ in found]


def _layers_given(modules: list[nn.Module], owner: nn.Module) -> list[str]:
    """The names of ``modules`` inside ``owner``, the model they were taken from."""
    names = {id(m): n for n, m in owner.named_modules()}
    missing = [type(m).__name__ for m in modules if id(m) not in names]
    if missing:
        raise GradckptUsageError(
            f"layers=[...]: {len(missing)} module(s) ({', '.join(missing)}) are not part of the model "
            "passed to check(); with a model factory, pass a dotted path or a class instead")
    return [names[id(m)] for m in modules]


# --------------------------------------------------------------------------- instrumentation


@dataclasses.dataclass
class Instrumented:
    """What the engine attaches to one checkpoint unit of its private copy (one record, under
    :data:`INSTRUMENTED`; the caller's modules never get one). The run that made the copy owns it:
    a checkpoint function, handed only the unit's forward, reaches the run's counter through it."""

    #: the unit's name in the original model
    name: str
    #: the run's recompute counter (its ``memory``: the run's saved-activation probe)
    counter: LayerCounter
    #: the forward set on the instance before instrumenting (an accelerate hook), or the body the
    #: check compiled (``compile_order='checkpoint_outside'``); None: the class's forward
    inner_forward: Callable[..., Any] | None = None
    #: the strategy's routing of the unit's calls, ``call(forward, args, kwargs)`` (:func:`install_layer_call`)
    call: Callable[..., Any] | None = None
    #: whether :attr:`inner_forward` is a body the check compiled
    compiled_body: bool = False
    #: whether the caller compiled the model around this unit (``compiled.Compilation.apply``); if
    #: not, a unit dynamo traces was compiled by the strategy's own checkpoint function
    caller_compiled: bool = False


#: The ``__dict__`` key of a unit's :class:`Instrumented` record.
INSTRUMENTED = "_gradckpt_instrumented"


def instrumented(module: Any) -> Instrumented | None:
    """The engine's record on ``module``, or None (a module the engine did not instrument).

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> instrumented(lin) is None
        True
        >>> instrument(lin, "lin", LayerCounter())
        >>> instrumented(lin).name
        'lin'
    """
    found = getattr(module, "__dict__", {}).get(INSTRUMENTED)
    return found if isinstance(found, Instrumented) else None


def install_layer_call(layer: Any, call: Callable[..., Any] | None) -> None:
    """Route an instrumented layer's calls through ``call(forward, args, kwargs)``; None restores it.
    A module the engine did not instrument has no calls to route: nothing changes."""
    record = instrumented(layer)
    if record is not None:
        record.call = call

@functools.lru_cache(maxsize=None)
def _instrumented_class(base: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``base`` whose forward counts executions and can be routed through a strategy.

    Counting lives in ``forward`` itself, not in module hooks, because
    checkpointing recomputes ``forward`` without ``__call__`` (transformers 5.23
    checkpoints ``partial(forward, layer)`` precisely so hooks do not run twice).
    Swapping the class of the engine's private copy, never the caller's module,
    makes ``type(layer).forward`` the counted one, whichever way it is reached.
    """

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _routed_forward(self, base, args, kwargs)

    def _gradckpt_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return _counted_body(self, base, args, kwargs)

    namespace = {"forward": forward, "_gradckpt_forward": _gradckpt_forward,
                 "__module__": base.__module__, "__qualname__": base.__qualname__}
    return type(base.__name__, (base,), namespace)


def _original_forward(layer: nn.Module, base: type[nn.Module]) -> Callable[..., Any]:
    """The forward ``layer`` ran before it was instrumented: one set on the instance (an accelerate hook) first."""
    inner = layer.__dict__[INSTRUMENTED].inner_forward
    return inner if inner is not None else functools.partial(base.forward, layer)


def _routed_forward(layer: nn.Module, base: type[nn.Module], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """An instrumented layer's forward: inputs shown to the memory probe, the counted body run through
    the strategy's call where one is set (else directly), the output shown to the recompute counter."""
    record: Instrumented = layer.__dict__[INSTRUMENTED]
    if torch.compiler.is_compiling():
        # Traced by dynamo: the probes' Python side effects would break the graph (and a checkpoint
        # around them would fall back to eager). The compiled program is the caller's, untouched.
        if not record.caller_compiled:
            # An eager model whose checkpoint function compiles the function it was handed, and that
            # function calls the unit's forward (transformers' switch hands over the layer's forward or
            # ``__call__``): count each run before the graph, as :func:`_counted_body` does.
            _hit_outside_graph(record.counter, record.name)
        return _compiled_forward(layer, base, args, kwargs)
    probe = record.counter.memory
    if probe is not None:
        probe.hold(args, kwargs)
    if record.call is not None:
        output = record.call(layer._gradckpt_forward, args, kwargs)
    else:
        output = layer._gradckpt_forward(*args, **kwargs)
    record.counter.saw_output(record.name, output)
    return output


def _counted_body(layer: nn.Module, base: type[nn.Module], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The layer's own forward, counted: the function a strategy checkpoints, so its recompute counts too."""
    record: Instrumented = layer.__dict__[INSTRUMENTED]
    counter = record.counter
    run = _original_forward(layer, base)
    if torch.compiler.is_compiling():
        # The caller's checkpoint function compiled the function it was handed: count before the
        # graph (dynamo replays side effects after it, and a non-reentrant recompute stops early,
        # inside it), and run the body as traced, with no dispatch mode that would make it eager.
        _hit_outside_graph(counter, record.name)
        return run(*args, **kwargs)
    counter.hit(record.name)
    # Compiled code in the body (compile_order='checkpoint_outside', or compiled submodules) must
    # recompute as it ran forward: dynamo runs nothing compiled under a dispatch mode, and checkpoint
    # would reject the eager recompute's saves.
    if (counter.memory is not None and torch._C._current_graph_task_id() != -1
            and not holds_compiled_code(layer)):
        with counter.memory.recompute():  # inside backward: this is a recompute; count what it holds
            return run(*args, **kwargs)
    return run(*args, **kwargs)


def holds_compiled_code(module: nn.Module) -> bool:
    """Whether running ``module`` runs compiled code: it or a module inside it
    :func:`runs_compiled` (a dispatch mode must not be active around it while dynamo traces).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> holds_compiled_code(net)
        False
        >>> net[0].compile(backend="eager")
        >>> holds_compiled_code(net)
        True
    """
    return any(runs_compiled(inner) for inner in module.modules())


class CompiledCall:
    """Marks a module of the engine's copy whose whole call the check compiled, in place, as the
    caller's ``torch.compile(block)`` did (:meth:`pytest_gradckpt.compilation.compiled.Compilation.apply`)."""


def runs_compiled(module: nn.Module) -> bool:
    """Whether calling ``module`` itself runs compiled code (a dispatch mode must not be active
    while dynamo traces): an ``OptimizedModule``, a compiled call (``module.compile()``, or the
    whole call compiled in place), or an engine unit whose body the check compiled below its eager
    checkpoint (``compile_order='checkpoint_outside'``).

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> runs_compiled(lin)
        False
        >>> lin.compile(backend="eager")
        >>> runs_compiled(lin)
        True
    """
    record = instrumented(module)
    return (is_optimized_module(module) or getattr(module, "_compiled_call_impl", None) is not None
            or isinstance(module, CompiledCall) or (record is not None and record.compiled_body))


@torch.compiler.disable
def _hit_outside_graph(counter: LayerCounter, name: str) -> None:
    """:meth:`LayerCounter.hit`, run eagerly from compiled code: a graph break before the body, whose
    operations all stay in the graph that follows (what runs compiled is the caller's program)."""
    counter.hit(name)


def _compiled_forward(layer: nn.Module, base: type[nn.Module], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """An instrumented layer's forward as dynamo sees it: the strategy's call, no counting."""
    run = _original_forward(layer, base)
    call = layer.__dict__[INSTRUMENTED].call
    return run(*args, **kwargs) if call is None else call(run, args, kwargs)


def instrument(layer: nn.Module, name: str, counter: LayerCounter) -> None:
    """Make ``layer`` (an engine-owned copy) count its forward executions into ``counter``."""
    inner = layer.__dict__.pop("forward", None)  # e.g. an accelerate hook set on the instance
    layer.__dict__[INSTRUMENTED] = Instrumented(name, counter, inner_forward=inner)
    layer.__class__ = _instrumented_class(layer.__class__)


def layer_of(function: Callable[..., Any]) -> nn.Module | None:
    """The layer a checkpoint function was handed, whichever calling convention was used.

    - transformers >= 5.23: ``partial(forward, layer, **kwargs)``
    - transformers <= 5.22 and this engine on plain modules: ``partial(layer.<bound method>, **kwargs)``
    - older per-stack transformers code: ``layer.__call__``

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> layer_of(functools.partial(lin.forward)) is lin
        True
        >>> layer_of(functools.partial(torch.nn.Linear.forward, lin)) is lin
        True
    """
    func = function
    if isinstance(func, functools.partial):
        owner = getattr(func.func, "__self__", None)
        if isinstance(owner, nn.Module):
            return owner
        if func.args and isinstance(func.args[0], nn.Module):
            return func.args[0]
        func = func.func
    owner = getattr(func, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def memory_probe_of(function: Callable[..., Any]) -> Any:
    """The saved-activation probe of the run that ``function``'s layer belongs to, or None
    (outside a check, or a layer the engine did not instrument). A checkpoint function uses it to
    declare what it keeps off the device, e.g. ``memory_probe_of(function).mark_offloaded(host)``:
    the probe belongs to this run alone, and built-in and user strategies reach it the same way.

    Example:
        >>> counter = LayerCounter()
        >>> lin = torch.nn.Linear(2, 2)
        >>> instrument(lin, "lin", counter)
        >>> counter.memory = "this run's probe"
        >>> memory_probe_of(functools.partial(lin.forward)), memory_probe_of(torch.nn.Linear(2, 2).forward)
        ("this run's probe", None)
    """
    record = instrumented(layer_of(function))
    return None if record is None else record.counter.memory


@dataclasses.dataclass
class ModelInfo:
    """What a strategy may know about the engine's copy of the model.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> info = ModelInfo(net, ["0", "1"], "repeated blocks: the blocks of the model itself")
        >>> len(info.layers), info.hf_model is None
        (2, True)
    """

    model: nn.Module
    layer_names: list[str]
    found_by: str = "path"
    #: How the caller's model is compiled (``Compilation.kind``: ``"whole"``, ``"per_block"``),
    #: None when it runs eager: set by the engine, read by strategies for compiled models only.
    compile_kind: str | None = None
    #: What a strategy asks the compiled run for: torch._functorch's ``activation_memory_budget``
    #: while the step compiles (``compile_budget``); None: the default.
    activation_memory_budget: float | None = None
    #: Per-run scratch space for a strategy's own records (the Strategy object itself is shared by all runs).
    state: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = [self.model.get_submodule(n) for n in self.layer_names]
        self.hf_model = transformers_model_in(self.model)

    @property
    def uses_transformers_mechanism(self) -> bool:
        """True when checkpoint functions go through transformers' own per-layer switch."""
        return self.hf_model is not None and self.found_by == "transformers"

    @staticmethod
    def has_trainable(layer: nn.Module) -> bool:
        """Whether any parameter of ``layer`` requires grad."""
        return any(p.requires_grad for p in layer.parameters())
