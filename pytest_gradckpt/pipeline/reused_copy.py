"""One private copy of the caller's module that serves every run of a check, restored between runs.

A deep copy of a billion-parameter PEFT model takes Python about a quarter of a second (tens of
thousands of objects: every module's dicts, hooks, adapter tables), and the copies it leaves behind
are what the cyclic collector then spends its time on. A check runs eight steps; the copies cost
more than the comparisons. So the first run's copy (:meth:`pytest_gradckpt.pipeline.subject.Subject.fresh_model`)
is kept, and before each later run it is put back as it was made:

- every module's class and ``__dict__`` (a strategy's wrappers, switched flags, hooks and the
  engine's instrumentation live there), and the dicts, lists and sets directly in it (``_modules``,
  ``_parameters``, the hook tables), restored in place, so handles that point into them stay valid;
- every parameter's ``requires_grad`` and attributes, its ``.grad`` dropped;
- every parameter's, buffer's and tensor attribute's values copied (``copy_``) from the caller's
  module, which is only read.

The copy is restored as soon as a run ends, so nothing the run left on it (a segment's outputs, the
probes) outlives the run. Whatever that cannot see makes the copy unfit, and the next run gets a new deep copy: a tensor that
moved to other memory (``.data =``), changed shape or dtype; a hook on a parameter; a run of a
strategy that is not built in (its code may change anything), a timed-out run. Compiled models,
models on the meta device and factories are copied per run as before (:meth:`Reuse.eligible`), except
in a rank, where a factory's product kept on the rank's device is the source the copy is refilled from.

A distributed run's wrap is undone too: ``fully_shard`` swaps module classes and parameter tables (put
back with the modules) and records each module in torch's table of composable-API state, which would
refuse the same module next run (dropped, :func:`_forget_composable_state`); after the restore every
parameter and buffer table must hold the tensors it was made with, or the copy is unfit. DDP's hooks on
the gradient accumulators are removed by the rank (``Parallel.unwrap``) before the restore.

Example:
    >>> import copy, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())
    >>> working = copy.deepcopy(net)
    >>> kept = ReusedCopy(net, working)
    >>> with torch.no_grad():
    ...     _ = working[0].weight.add_(1.0)
    >>> working[0].register_forward_hook(lambda *a: None) is not None
    True
    >>> kept.restore(), torch.equal(working[0].weight, net[0].weight), len(working[0]._forward_hooks)
    (True, True, 0)
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

_CONTAINERS = (dict, collections.OrderedDict, list, set)


class _Kept:
    """One module as it was: its class, its ``__dict__`` and the containers directly in it (the
    empty ones apart: most hook tables are empty, and emptying one that a run filled is all they need)."""

    __slots__ = ("module", "cls", "state", "empty", "dicts", "others", "tables")

    def __init__(self, module: nn.Module) -> None:
        self.module, self.cls, self.state = module, module.__class__, dict(module.__dict__)
        # the plain containers only: a subclass may refuse to change (diffusers' FrozenDict config)
        # or mean more than its items; such a value is put back as the same object, like any other
        containers = [v for v in self.state.values() if type(v) in _CONTAINERS]
        self.empty = [c for c in containers if not c]
        self.dicts = [(c, dict(c)) for c in containers if c and isinstance(c, dict)]
        self.others = [(c, list(c)) for c in containers if c and not isinstance(c, dict)]
        self.tables = [(name, dict(self.state[name])) for name in ("_parameters", "_buffers")
                       if isinstance(self.state.get(name), dict)]

    def holds_its_tensors(self) -> bool:
        """The module is of its class again and its parameter and buffer tables hold the tensors it was
        made with (not, say, the DTensors FSDP2 put there)."""
        module = self.module
        return module.__class__ is self.cls and all(
            _holds(module.__dict__[name], contents) for name, contents in self.tables)

    def restore(self) -> None:
        """Everything put back in place, unconditionally: cheaper than comparing first."""
        module = self.module
        if module.__class__ is not self.cls:
            module.__class__ = self.cls
        state = module.__dict__
        state.clear()
        state.update(self.state)
        for container in self.empty:
            if container:
                container.clear()
        for table, contents in self.dicts:
            table.clear()
            table.update(contents)
        for container, items in self.others:
            if isinstance(container, list):
                container[:] = items
            else:
                container.clear()
                container.update(items)


def _holds(container: dict[Any, Any], contents: dict[Any, Any]) -> bool:
    """``container`` holds exactly ``contents`` (the same objects; never ``==`` on values)."""
    return len(container) == len(contents) and all(container.get(k, _MISSING) is v for k, v in contents.items())


_MISSING = object()


class _KeptTensor:
    """A tensor of the working copy, the caller's tensor it is refilled from, and where it lived."""

    __slots__ = ("tensor", "source", "where")

    def __init__(self, tensor: torch.Tensor, source: torch.Tensor) -> None:
        self.tensor, self.source = tensor, source
        self.where = self._where(tensor)

    @staticmethod
    def _where(tensor: torch.Tensor) -> tuple[Any, ...]:
        return (tensor.data_ptr(), tensor.device, tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))

    def unchanged(self) -> bool:
        return self._where(self.tensor) == self.where


def _tensors(source: nn.Module, model: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs (working tensor, caller's tensor): parameters, buffers and tensor attributes, module by module."""
    for mine, theirs in zip(model.modules(), source.modules(), strict=True):
        for table in ("_parameters", "_buffers"):
            own, other = getattr(mine, table), getattr(theirs, table)
            for key, tensor in own.items():
                if tensor is not None:
                    yield tensor, other[key]
        for key, value in mine.__dict__.items():
            other = theirs.__dict__.get(key)
            if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor):
                yield value, other


def _same_shape(source: nn.Module, model: nn.Module) -> bool:
    """The copy has the caller's module tree: the same classes, names and tensor tables."""
    mine, theirs = list(model.named_modules()), list(source.named_modules())
    if len(mine) != len(theirs):
        return False
    pairs = zip(mine, theirs, strict=True)
    return all(a_name == b_name and type(a) is type(b) and a._parameters.keys() == b._parameters.keys()
               and a._buffers.keys() == b._buffers.keys() for (a_name, a), (b_name, b) in pairs)


def _forget_composable_state(modules: list[nn.Module]) -> bool:
    """torch.distributed's composable APIs (FSDP2's ``fully_shard``, ``replicate``) record each module they
    were applied to in a table of their own, beside the module's ``__dict__`` (which the restore put back).
    Applied again to the same module, they refuse ("Inserting ... more than once"). The restored modules'
    entries are dropped; False when one stays (a table this cannot reach: the copy is unfit).

    Example:
        >>> _forget_composable_state([torch.nn.Linear(1, 1)])
        True
    """
    import sys

    state = sys.modules.get("torch.distributed._composable_state")  # never imported: nothing was recorded
    table = getattr(state, "_module_state_mapping", None)
    if state is None:
        return True
    if table is None:
        return False
    for module in modules:
        table.pop(module, None)
    return not any(module in table for module in modules)


class ReusedCopy:
    """``model`` (a private copy of ``source``, on the check's device, not yet run) kept with what
    :meth:`restore` puts back. Raises ``ValueError`` when ``model`` is not a copy of ``source``'s shape."""

    def __init__(self, source: nn.Module, model: nn.Module) -> None:
        if not _same_shape(source, model):
            raise ValueError("the copy's module tree differs from the caller's")
        self.model = model
        self.modules = [_Kept(m) for m in model.modules()]
        seen: set[int] = set()
        self.tensors: list[_KeptTensor] = []
        for tensor, original in _tensors(source, model):
            if id(tensor) in seen:
                continue
            if not (isinstance(original, torch.Tensor) and tensor.shape == original.shape
                    and tensor.dtype == original.dtype):
                raise ValueError("a tensor of the copy has no counterpart of its shape and dtype in the caller's")
            seen.add(id(tensor))
            # the caller's own tensor is read, never written: refilling from it keeps no second copy
            self.tensors.append(_KeptTensor(tensor, original))
        self.parameters = [(p, p.requires_grad, dict(p.__dict__)) for p in model.parameters()]
        self.bytes = sum(k.tensor.untyped_storage().nbytes() for k in self.tensors)

    def restore(self) -> bool:
        """Put the copy back as it was made; False (the copy is unfit, nothing to rely on) when a
        run changed something this cannot put back, or putting it back failed."""
        try:
            return self._restore()
        except Exception:  # noqa: BLE001 - whatever went wrong, a new copy is the answer
            return False

    def _restore(self) -> bool:
        for module in self.modules:
            module.restore()
        if not _forget_composable_state([kept.module for kept in self.modules]):
            return False
        if not all(kept.holds_its_tensors() for kept in self.modules):
            return False
        for parameter, requires_grad, attributes in self.parameters:
            if getattr(parameter, "_backward_hooks", None) or getattr(parameter, "_post_accumulate_grad_hooks", None):
                return False
            parameter.grad = None
            if parameter.requires_grad != requires_grad:
                parameter.requires_grad_(requires_grad)
            if not _holds(parameter.__dict__, attributes):
                parameter.__dict__.clear()
                parameter.__dict__.update(attributes)
        if not all(tensor.unchanged() for tensor in self.tensors):
            return False
        try:
            with torch.no_grad():
                for tensor in self.tensors:
                    tensor.tensor.copy_(tensor.source)
        except RuntimeError:  # e.g. an expanded tensor attribute: copy per run instead
            return False
        return True


class Reuse:
    """The copies a :class:`~pytest_gradckpt.pipeline.runs.Stepper` hands its runs: a new one from ``fresh``
    (a deep copy) the first time, then the same one restored, while the runs leave it fit.

    Example:
        >>> import copy
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())
        >>> reuse = Reuse(net, lambda: copy.deepcopy(net), eligible=True)
        >>> first = reuse.take()
        >>> reuse.give_back(fit=True)
        >>> reuse.take() is first, first is not net
        (True, True)
        >>> reuse.give_back(fit=False)
        >>> reuse.take() is first
        False
    """

    def __init__(self, source: Any, fresh: Callable[[], nn.Module], eligible: bool) -> None:
        self.source, self.fresh, self.eligible = source, fresh, eligible
        self.kept: ReusedCopy | None = None
        self.made = False  # the last take made a new copy (its bytes stay allocated after the run)

    def take(self) -> nn.Module:
        """A copy for the next run: the kept one (restored when the last run gave it back), else a
        new one (kept when eligible)."""
        if self.kept is not None:
            self.made = False
            return self.kept.model
        model = self.fresh()
        self.made = True
        if self.eligible:
            try:
                self.kept = ReusedCopy(self.source, model)
            except (ValueError, RuntimeError):
                self.eligible = False  # not a copy of the caller's shape: copy per run from now on
        return model

    def give_back(self, fit: bool) -> None:
        """After a run: the copy restored at once (whatever the run left on it, its segments' outputs,
        its probes, goes now, not at the next run) when ``fit`` and restorable; else dropped."""
        if self.kept is not None and not (fit and self.kept.restore()):
            self.kept = None  # an unfit copy goes before the next is made: never two on the device

    def kept_bytes(self) -> int:
        """Device bytes of a copy this run made and the next will reuse (they stay allocated)."""
        return self.kept.bytes if self.kept is not None and self.made else 0

