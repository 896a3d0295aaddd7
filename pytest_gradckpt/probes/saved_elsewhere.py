"""Where saved activations went: modules whose forward ran while someone else's saved-tensor hooks
held what autograd saves (torch's ``save_on_cpu``, ``offload_wrapper``, a user's own offloading).

Such a module keeps its activations elsewhere instead of recomputing them, so a strategy need
not say so (``recomputes = False``): the engine sees it. Checkpointing's own hooks
(``torch.utils.checkpoint``) and the engine's memory probe are not "elsewhere": under them a
module is recomputed, or keeps its activations where they were. :class:`SavedElsewhereProbe` is
the probe (:mod:`pytest_gradckpt.probes.protocol`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from pytest_gradckpt.probes.backward_calls import in_backward
from pytest_gradckpt.probes.memory import MemoryProbe
from pytest_gradckpt.probes.protocol import Probe, ProbeEvidence, ProbeStep

#: Modules whose pack hooks do not move activations anywhere: checkpointing's bookkeeping.
_NOT_ELSEWHERE = ("torch.utils.checkpoint",)


def foreign_pack_hook(ours: Callable[..., Any] | None = None) -> Callable[..., Any] | None:
    """The innermost saved-tensor pack hook in force, unless it is ``ours`` or checkpointing's own.

    Example:
        >>> foreign_pack_hook() is None
        True
        >>> with torch.autograd.graph.save_on_cpu():
        ...     foreign_pack_hook().__qualname__
        'save_on_cpu.__init__.<locals>.pack_to_cpu'
    """
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if top is None:
        return None
    pack = top[0]
    if ours is not None and (pack == ours or getattr(pack, "__func__", None) is getattr(ours, "__func__", ours)):
        return None
    if getattr(pack, "__module__", "") in _NOT_ELSEWHERE:
        return None
    return pack


class SavedElsewhere:
    """Context manager: ``names`` collects the (original) names of modules called in forward while
    a foreign pack hook was in force. ``ours``: the engine's own pack hook, not foreign.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh())
        >>> with SavedElsewhere({id(m): n for n, m in net.named_modules()}) as seen:
        ...     with torch.autograd.graph.save_on_cpu():
        ...         _ = net[0](torch.ones(1, 2))
        ...     _ = net[1](torch.ones(1, 2))
        >>> sorted(seen.names)
        ['0']
    """

    def __init__(self, names_by_id: Mapping[int, str], ours: Callable[..., Any] | None = None):
        self.names_by_id, self.ours = names_by_id, ours
        self.names: set[str] = set()
        self._handle: Any = None

    def _hook(self, module: nn.Module, args: Any) -> None:
        # Traced by dynamo: reading autograd's hook stack would break the caller's graph, and a
        # compiled region's saved tensors are the compiler's, so compiled code is not observed here.
        if torch.compiler.is_compiling() or in_backward() or not torch.is_grad_enabled():
            return
        name = self.names_by_id.get(id(module))
        if name is not None and foreign_pack_hook(self.ours) is not None:
            self.names.add(name)

    def __enter__(self) -> SavedElsewhere:
        self._handle = nn.modules.module.register_module_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._handle.remove()


def units_saved_elsewhere(units: Iterable[str], seen: set[str]) -> list[str]:
    """The checkpoint units that ran (themselves or any module inside them) under a foreign pack hook.

    Example:
        >>> units_saved_elsewhere(["layers.0", "layers.1"], {"layers.1.mlp"})
        ['layers.1']
    """
    return [unit for unit in units if any(name == unit or name.startswith(unit + ".") for name in seen)]


@dataclasses.dataclass
class SavedElsewhereUnits:
    """Checkpoint units whose forward ran under someone else's saved-tensor hooks (activations offloaded)."""

    saved_elsewhere_units: list[str] = dataclasses.field(default_factory=list)


class SavedElsewhereProbe(Probe[SavedElsewhereUnits]):
    """The units that kept their activations elsewhere (:class:`SavedElsewhere`); the memory
    probe's own hook is not "elsewhere" (it is registered before this one)."""

    name = "saved_elsewhere"
    measurement = SavedElsewhereUnits
    metric_keys = ("saved_elsewhere_units",)

    def __init__(self, step: ProbeStep) -> None:
        super().__init__(step)
        self.seen = SavedElsewhere(step.module_names)

    @contextlib.contextmanager
    def around_step(self) -> Iterator[None]:
        self.seen.ours = self.step.probe(MemoryProbe).saved._pack
        with self.seen:
            yield

    def read(self) -> SavedElsewhereUnits:
        return SavedElsewhereUnits(units_saved_elsewhere(self.step.layer_names, self.seen.names))

    @classmethod
    def metrics(cls, evidence: ProbeEvidence) -> Mapping[str, Any]:
        return {"saved_elsewhere_units": evidence.run.of(cls).saved_elsewhere_units} if evidence.compared else {}
