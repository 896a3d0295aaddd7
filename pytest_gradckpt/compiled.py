"""Compiled subjects: a model the caller compiled stays compiled in every run of the check.

A deep copy drops per-block compilation silently (``nn.Module.__getstate__`` pops
``_compiled_call_impl``), and the engine's probes and checkpoint wrappers must see the eager
module underneath a top-level ``OptimizedModule``. So the check records *how* the caller
compiled (:class:`Compilation`), copies the eager modules, and compiles each copy again in the
same places with the caller's own ``torch.compile`` settings (the very dynamo context the
caller built: backend, mode, options). Three forms are recognised:

- ``whole``: ``torch.compile(model)``, an ``OptimizedModule``;
- ``per_block``: ``block.compile()`` on submodules (torchtitan's default);
- ``regional``: submodules replaced by ``torch.compile(block)`` (``OptimizedModule`` children).

Every compiled run resets dynamo first and counts what dynamo compiled for it
(:class:`CompiledRun`), so a run that executed no compiled frame is an error, never a silent
check of the eager model. See docs/compile.md for the judgement under compile.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import shutil
import sysconfig
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from pytest_gradckpt.errors import GradckptUsageError

WHOLE, PER_BLOCK, REGIONAL = "whole", "per_block", "regional"

#: Counters of :data:`torch._dynamo.utils.counters` reported per run.
_FRAMES, _BREAKS = "frames", "graph_break"


def _optimized_module_type() -> type:
    from torch._dynamo.eval_frame import OptimizedModule

    return OptimizedModule


def _dynamo_context(compiled_fn: Any) -> Any:
    """The ``_TorchDynamoContext`` a ``torch.compile``'d function was built by (kept in its closure)."""
    from torch._dynamo.eval_frame import _TorchDynamoContext

    for cell in getattr(compiled_fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, _TorchDynamoContext):
            return value
    raise GradckptUsageError(
        f"a compiled module's call ({compiled_fn!r}) does not come from torch.compile; the check cannot compile "
        "its copies the same way: compile with torch.compile(model) or module.compile()")


@dataclasses.dataclass
class Compilation:
    """Where and how the caller's model was compiled, by module name in the *eager* model
    (``OptimizedModule`` wrappers left out of the names).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
        >>> Compilation.of(net) is None
        True
        >>> net[0].compile(backend="aot_eager")
        >>> found = Compilation.of(net)
        >>> found.kind, sorted(found.blocks)
        ('per_block', ['0'])
    """

    kind: str
    #: module name -> the dynamo context that compiled it ("" is the whole model)
    blocks: dict[str, Any]

    @staticmethod
    def of(model: nn.Module) -> Compilation | None:
        """How ``model`` was compiled, or None when nothing in it is."""
        optimized = _optimized_module_type()
        blocks: dict[str, Any] = {}
        kind = None
        if isinstance(model, optimized):
            blocks[""], kind = model.dynamo_ctx, WHOLE
            model = model._orig_mod
        for name, module in _eager_named_modules(model):
            if isinstance(module, optimized):
                blocks[name] = module.dynamo_ctx
                kind = kind or REGIONAL
            elif module._compiled_call_impl is not None:
                blocks[name] = _dynamo_context(module._compiled_call_impl)
                kind = kind or PER_BLOCK
        return None if kind is None else Compilation(kind, blocks)

    def backend(self) -> str:
        """The compiler backend's name, e.g. ``inductor`` or ``aot_eager``."""
        from torch._dynamo.eval_frame import innermost_backend

        backend = innermost_backend(next(iter(self.blocks.values())).callback)
        backend = getattr(backend, "compiler_fn", backend)  # a backend with options wraps the function
        name = getattr(backend, "compiler_name", None) or getattr(backend, "__name__", None)
        return str(name or type(backend).__name__)

    def apply(self, modules: dict[str, nn.Module]) -> None:
        """Compile the engine's copies: ``modules`` maps each name of :attr:`blocks` to the copy's
        module of that name (looked up before a strategy renamed anything)."""
        for name, ctx in self.blocks.items():
            module = modules[name]
            module._compiled_call_impl = ctx(module._call_impl)


def _eager_named_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` with every ``OptimizedModule`` reported under its own name and its
    ``_orig_mod`` level left out of the names below it."""
    optimized = _optimized_module_type()
    for child_name, child in model.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        yield name, child
        yield from _eager_named_modules(child._orig_mod if isinstance(child, optimized) else child, name)


def eager_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every ``OptimizedModule`` replaced by the module it wraps
    and no compiled call left (the engine compiles again once its probes and strategy are in).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.compile(torch.nn.Linear(2, 2), backend="eager"))
        >>> type(eager_copy(net)[1]).__name__
        'Linear'
    """
    return strip(copy.deepcopy(model))


def strip(model: nn.Module) -> nn.Module:
    """``model`` (a private copy) without compilation: ``OptimizedModule`` wrappers replaced by
    what they wrap, compiled calls removed."""
    optimized = _optimized_module_type()
    if isinstance(model, optimized):
        model = model._orig_mod
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, optimized):
                setattr(module, child_name, child._orig_mod)
        module._compiled_call_impl = None
    return model


def eager_view(model: nn.Module) -> nn.Module:
    """The caller's own eager module under a top-level ``OptimizedModule`` (not a copy: the
    engine reads facts from it, never trains it); other models unchanged."""
    return model._orig_mod if isinstance(model, _optimized_module_type()) else model


def cxx_compiler() -> str | None:
    """The C++ compiler inductor would use on the CPU, or None (then only ``aot_eager`` runs there).

    Example:
        >>> cxx_compiler() is None or isinstance(cxx_compiler(), str)
        True
    """
    configured = torch._inductor.config.cpp.cxx[-1] if hasattr(torch, "_inductor") else None
    for candidate in (configured, sysconfig.get_config_var("CXX"), "g++", "c++", "clang++"):
        if candidate and shutil.which(str(candidate).split()[0]):
            return str(candidate)
    return None


def _counts() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {"frames": counters[_FRAMES]["ok"], "graph_breaks": sum(counters[_BREAKS].values())}


@contextlib.contextmanager
def compiled_run(compilation: Compilation, report: dict[str, Any]) -> Iterator[None]:
    """Run one step's compiled code from a clean dynamo cache, with dynamo's recompile limits
    lifted (each run compiles a fresh copy; past the limit dynamo would silently run eager),
    and fill ``report`` with what was compiled for it: frames and graph breaks.

    The step raises :class:`CompilationDropped` when no frame was compiled: its model ran eager.
    """
    import torch._dynamo

    torch._dynamo.reset()
    before = _counts()
    with torch._dynamo.config.patch(recompile_limit=1 << 20, accumulated_recompile_limit=1 << 20):
        yield
    after = _counts()
    report.update(kind=compilation.kind, backend=compilation.backend(), blocks=sorted(compilation.blocks),
                  **{key: after[key] - before[key] for key in after})
    if report["frames"] == 0:
        raise CompilationDropped(
            f"the caller's model is compiled ({compilation.kind}, {len(compilation.blocks)} place(s)), yet this "
            "run compiled no frame: its copy ran eager, so it was not checked; report this as a pytest-gradckpt bug")


class CompilationDropped(RuntimeError):
    """A run of a compiled subject executed no compiled frame."""
