"""Which modules really ran during backward: the checkpoint units a strategy actually used.

Whatever did the checkpointing (``torch.utils.checkpoint``, a wrapper module such as torch's
``checkpoint_wrapper``, a library's own switch, a custom ``autograd.Function``), a recompute
calls the unit's submodules again while autograd's engine is running. A global forward
pre-hook records those calls; :func:`recomputed_units` turns them into the outermost modules
that were recomputed whole. The unit's own ``forward`` may be reached without ``__call__``
(transformers 5.23 checkpoints ``partial(forward, layer)``), so hooks alone would miss it;
its children are called normally, and a module counts as recomputed when every child
holding parameters was. :class:`BackwardCallsProbe` is the probe (:mod:`pytest_gradckpt.probes.protocol`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from pytest_gradckpt.probes.protocol import Probe, ProbeEvidence, ProbeStep
from pytest_gradckpt.probes.recompute_counts import RecomputeProbe

_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


def in_backward() -> bool:
    """True while autograd's engine runs a backward pass on this thread.

    Example:
        >>> in_backward()
        False
    """
    return torch._C._current_graph_task_id() != -1


class BackwardCalls:
    """Context manager: ``names`` collects the (canonical) names of modules called during backward.

    ``names_by_id`` maps ``id(module)`` to the name it had before any strategy was applied,
    so wrapper modules a strategy inserts never rename what is reported.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())
        >>> from torch.utils.checkpoint import checkpoint
        >>> with BackwardCalls({id(m): n for n, m in net.named_modules()}) as seen:
        ...     checkpoint(net, torch.ones(1, 2, requires_grad=True), use_reentrant=False).sum().backward()
        >>> sorted(seen.names)
        ['', '0', '1']
    """

    def __init__(self, names_by_id: Mapping[int, str]):
        self.names_by_id = names_by_id
        self.names: set[str] = set()
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: Any) -> None:
        # Traced by dynamo (a compiled forward, or its recompute inside the compiled backward): reading
        # the graph task id would break the caller's graph, so compiled code is not observed here.
        if not torch.compiler.is_compiling() and in_backward():
            name = self.names_by_id.get(id(module))
            if name is not None:
                self.names.add(name)

    def __enter__(self) -> BackwardCalls:
        self._handle = nn.modules.module.register_module_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()

    def note_compiled_call(self, module: nn.Module) -> None:
        """Record a call of ``module``'s compiled ``__call__`` made from eager code, as the forward
        pre-hook records an eager call: the hook itself runs inside the compiled code, where it
        observes nothing. An eager checkpoint around a compiled block (transformers 5.17's switch
        checkpoints the block's ``__call__``) recomputes the block by calling it again during
        backward. The compiled call reaches the run's own block through the run's units
        (:attr:`pytest_gradckpt.probes.unit_counter.LayerCounter.backward_calls`), never through
        module state shared by all runs.

        Example:
            >>> net = torch.nn.Linear(2, 2)
            >>> with BackwardCalls({id(net): "net"}) as seen:
            ...     seen.note_compiled_call(net)  # not during backward: nothing recorded
            >>> seen.names
            set()
        """
        if torch.compiler.is_compiling() or not in_backward():
            return
        name = self.names_by_id.get(id(module))
        if name is not None:
            self.names.add(name)


def recomputed_units(modules: Iterable[tuple[str, nn.Module]], ran: set[str]) -> list[str]:
    """The outermost modules recomputed whole, given the names of modules that ran in backward.

    A module was recomputed when it ran in backward, or when each of its children that holds
    parameters was. Containers (``ModuleList``/``ModuleDict``) are never called, so the units
    are the outermost recomputed modules that are not containers, looking through containers.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ModuleList([torch.nn.Linear(2, 2)] * 1))
        >>> recomputed_units(net.named_modules(), {"1.0"})
        ['1.0']
    """
    modules = list(modules)
    by_name = dict(modules)
    done: dict[str, bool] = {}
    for name, module in sorted(modules, key=lambda item: -item[0].count(".") - bool(item[0])):
        holders = [f"{name}.{child}" if name else child for child, sub in module.named_children()
                   if any(True for _ in sub.parameters())]
        done[name] = name in ran or (bool(holders) and all(done.get(h, False) for h in holders))

    def parent_recomputed(name: str) -> bool:
        while name:
            name = name.rpartition(".")[0]
            module = by_name.get(name)
            if module is not None and not isinstance(module, _CONTAINERS):
                return done.get(name, False)
        return False

    return [name for name, module in modules if done.get(name) and not isinstance(module, _CONTAINERS)
            and not parent_recomputed(name) and any(True for _ in module.parameters())]


@dataclasses.dataclass
class RecomputedUnits:
    """The outermost modules that really ran again during backward, whoever checkpointed them."""

    recomputed_units: list[str] = dataclasses.field(default_factory=list)


class BackwardCallsProbe(Probe[RecomputedUnits]):
    """Which modules of the copy ran during backward (:class:`BackwardCalls`), as units."""

    name = "backward_calls"
    measurement = RecomputedUnits
    metric_keys = ("recomputed_units",)

    def __init__(self, step: ProbeStep) -> None:
        super().__init__(step)
        self.calls = BackwardCalls(step.module_names)

    @contextlib.contextmanager
    def around_step(self) -> Iterator[None]:
        # The run's units carry this run's block while its step runs: a compiled block's call, made
        # from eager code during backward, reports to it (compiled.Compilation.apply).
        recompute = self.step.probes.get(RecomputeProbe.name)
        counter = recompute.counter if isinstance(recompute, RecomputeProbe) else None
        with self.calls:
            if counter is not None:
                counter.backward_calls = self.calls
            try:
                yield
            finally:
                if counter is not None:
                    counter.backward_calls = None

    def read(self) -> RecomputedUnits:
        module_names = self.step.module_names
        original = [(module_names[id(m)], m) for m in self.step.model.modules() if id(m) in module_names]
        return RecomputedUnits(recomputed_units(original, self.calls.names))

    @classmethod
    def metrics(cls, evidence: ProbeEvidence) -> Mapping[str, Any]:
        return {"recomputed_units": evidence.run.of(cls).recomputed_units} if evidence.compared else {}
